"""The Telegram bot: aiogram handlers, per-user memory in a database, the generation engine."""
