"""The Telegram bot: aiogram handlers, per-user memory in a database, the generation engine."""

import os

# OpenMP threads that finish their share of a matrix product wait for the others. By default
# they spin, which is best on idle cores and a collapse on shared ones: when another program
# takes a core, the spinning thread burns the time the descheduled one needs. Measured with
# RuGPT-3 medium's shape, 8 users, one busy process beside the bot on the 2 cores: the engine's
# batch step went from ~183 ms to 558 ms spinning, to 344 ms sleeping (2.02x -> 3.15x the naive
# design's tokens/s); on idle cores the step time did not change measurably. libgomp reads this
# once, when torch is first imported, so it is set here, before any module of the bot imports
# torch; an operator's own OMP_WAIT_POLICY wins. README, "A shared CPU".
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
