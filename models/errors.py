"""One-line errors for operators: what every command line (the bot, the trainer, the data tools)
prints of a cause instead of a traceback."""

from __future__ import annotations


def error_line(error: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none): what a
    one-line error for the operator quotes of the cause."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
