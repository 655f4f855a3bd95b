"""What goes into the engine and what comes out: a request, the row it becomes while it is
decoded, its completion, what serving it took, and the ways the engine refuses one.

Shared by the engine (:mod:`bot.engine.generation`), the front ends over it (the server, the
remote backend) and the benchmarks, none of which need the engine's scheduling to read them.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedTokenizerBase

from bot.engine.prefix_cache import Prefix
from bot.engine.sampling import SamplingParams
from dataset_tools.dialogue_format import BOT_TAG, USER_TAG


class EngineBusy(Exception):
    """The queue is full."""


class EngineTimeout(Exception):
    """The reply did not come within the request timeout."""


class EngineClosed(Exception):
    """The engine is shutting down."""


class ContextLengthError(ValueError):
    """The prompt and the tokens asked for do not fit the context window."""

    def __init__(self, context: int, prompt_tokens: int, max_tokens: int) -> None:
        # vLLM's wording: clients that already handle vLLM's 400 recognise it.
        super().__init__(
            f"This model's maximum context length is {context} tokens. However, your request has "
            f"{prompt_tokens} input tokens plus {max_tokens} 'max_tokens' "
            f"({prompt_tokens + max_tokens} in all). Please reduce the length of the input "
            "or of max_tokens."
        )
        self.context, self.prompt_tokens, self.max_tokens = context, prompt_tokens, max_tokens


@dataclass(frozen=True)
class Completion:
    """A raw completion: the generated text (cut at a stop string) and why it ended."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (a stop token or string) or "length" (max tokens or context)
    stop_reason: str | int | None  # the stop string or token that ended it; None for EOS/length
    prompt_tokens: int
    cached_tokens: int  # prompt tokens whose keys/values came from the prefix cache


@dataclass
class RequestStats:
    """What serving one request took (filled in by the worker; read by the bench and tests)."""

    reused_tokens: int = 0  # prompt tokens whose keys/values came from the prefix cache
    first_token_at: float | None = None  # time.perf_counter() when the first token was chosen
    batch_rows: int = 0  # the most rows decoded together while this one was active
    prompt_ids: list[int] = field(default_factory=list)  # the tokens the model was given
    reply_ids: list[int] = field(default_factory=list)  # the tokens it chose (no stop token)
    prompt_tokens: int = 0  # how many: a remote server reports counts, not ids
    new_tokens: int = 0


@dataclass
class Request:
    prompt: str | list[int]  # text, or token ids as given
    params: SamplingParams
    key: Hashable | None
    loop: asyncio.AbstractEventLoop | None
    future: asyncio.Future[Completion] | None
    on_text: Callable[[str], None] | None = None
    stop_ids: frozenset[int] = frozenset()
    stop: tuple[str, ...] = ()
    stats: RequestStats = field(default_factory=RequestStats)
    cancelled: threading.Event = field(default_factory=threading.Event)
    keep: bool = True  # keep its keys/values in the prefix cache when it finishes
    result: Completion | None = None  # for requests served without an event loop (warm-up)
    error: BaseException | None = None  # likewise

    @property
    def holdback(self) -> int:
        """Characters kept from the stream: the start of a stop string may be arriving."""
        return max((len(s) for s in self.stop), default=1) - 1


@dataclass
class Row:
    """A request being decoded; it occupies the decoder slot of its index in the batch."""

    request: Request
    ids: list[int]  # the prompt and the reply so far; the last one is not yet fed to the model
    prompt_len: int
    computed: int  # tokens whose keys/values are in the slot
    seen: torch.Tensor  # [vocab] tokens in this row, for the repetition penalty
    start: Prefix = field(default_factory=Prefix)  # cached keys/values it was started from
    generator: torch.Generator | None = None  # the request's own, when it gave a seed
    slot: int = -1  # its decoder slot while its prompt is being encoded (then: its index)
    text: str = ""  # the reply decoded so far, up to a stop string
    shown: str = ""
    finish_reason: str = "length"
    stop_reason: str | int | None = None

    @property
    def generated(self) -> list[int]:
        return self.ids[self.prompt_len :]


def stop_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Where a reply ends: EOS, or either speaker's tag when the tokenizer has it as a token."""
    vocab = tokenizer.get_vocab()
    return [tokenizer.eos_token_id] + [vocab[t] for t in (USER_TAG, BOT_TAG) if t in vocab]
