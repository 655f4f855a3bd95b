"""The Mini App: a web page for the user's conversation and memory, served by the bot's own
aiohttp server (:mod:`bot.webapp.api`), who is asking told only by Telegram's signed launch
data (:mod:`bot.webapp.auth`)."""
