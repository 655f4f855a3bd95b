"""The one interface the dialogue service talks to: "reply to these turns, streaming, keyed by
this dialogue".

Two implementations: :class:`~bot.engine.generation.GenerationEngine` (the model in this
process, the default) and :class:`~bot.engine.remote.RemoteBackend` (any OpenAI-compatible
server: ``python -m bot serve``, vLLM). The dialogue service, the handlers and the console never
know which one they have; both raise the same errors (:class:`EngineBusy`,
:class:`EngineTimeout`), which the handlers turn into the same Russian texts.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Protocol

from bot.engine.requests import RequestStats
from bot.engine.sampling import SamplingParams


class ReplyBackend(Protocol):
    """What answers a dialogue turn. Counters feed ``/stats`` and ``/metrics``."""

    persona: str | None
    context_tokens: int  # the model's window
    reply_tokens: int  # the most tokens a reply may take
    replies: int  # replies served so far
    tokens: int  # tokens generated so far

    @property
    def prompt_budget(self) -> int:
        """Tokens the rendered prompt may take (the history is trimmed to it)."""
        ...

    @property
    def queue_depth(self) -> int:
        """Requests waiting (local) or in flight (remote)."""
        ...

    def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` for the model's tokenizer (used to trim the history)."""
        ...

    async def generate(
        self,
        turns: list[str],
        params: SamplingParams,
        *,
        key: Hashable | None = None,
        on_text: Callable[[str], None] | None = None,
        stats: RequestStats | None = None,
    ) -> str:
        """The clean reply to ``turns`` (ending with the user's message); ``on_text`` gets the
        reply so far as it grows; ``key`` names the dialogue (for prefix caching)."""
        ...

    def forget(self, key: Hashable) -> None:
        """The dialogue's history is gone: drop what is cached for it."""
        ...

    async def aclose(self) -> None:
        """Release the model or the connections."""
        ...
