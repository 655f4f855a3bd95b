"""The remote backend: each turn goes to an OpenAI-compatible server (``python -m bot serve``,
vLLM, llama.cpp's server) through the official ``openai`` client, streamed.

The bot keeps what it needs to stay in charge of the prompt: the tokenizer (``TOKENIZER_PATH``,
default ``MODEL_PATH``; the tokenizer files alone, no weights) to trim the history to the token
budget, and the dialogue format, so the server sees exactly the prompt the local engine would.
The server only completes text.

Rules, each from a failure seen with such servers (see ``SCALING.md``):

- every sampling value is sent explicitly: a server's own defaults (vLLM's ``max_tokens=16``,
  the checkpoint's ``generation_config.json``, llama.cpp's ``top_k=40``) never apply;
- explicit timeouts (``LLM_CONNECT_TIMEOUT_S``, ``LLM_TIMEOUT_S`` between chunks) instead of the
  client's 10 minutes, and at most one retry, made by the client before the first chunk only:
  a reply that has started streaming is never asked for twice;
- 429 and 503 (the server's queue is full, or it is starting) → :class:`EngineBusy`, the "busy"
  text; a timeout → :class:`EngineTimeout`; a 400 because the prompt is too long for the server
  (another tokenizer, a shorter ``--max-model-len``) → the history is trimmed to three quarters
  and sent once more; an error inside the stream → :class:`RemoteError`, the apology;
- the dialogue key goes as ``user``, so the server can keep the dialogue's keys/values between
  turns (``bot serve`` matches on it; vLLM matches 16-token blocks by content anyway);
- cancelling the reply (the bot's request timeout) closes the stream, which makes the server
  drop the request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Hashable
from typing import Any

import openai
from openai import AsyncOpenAI
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from bot.engine.requests import EngineBusy, EngineTimeout, RequestStats, stop_token_ids
from bot.engine.sampling import SamplingParams
from bot.memory import fit_turns
from dataset_tools.dialogue_format import SPEAKER_TAGS, parse_reply, render_prompt
from models.hub import HubUnreachable, pretrained_source
from models.loading import ModelLoadError

logger = logging.getLogger(__name__)

#: How much of the prompt is kept when the server says it is too long (once per reply).
RETRIM_FRACTION = 0.75


class RemoteError(Exception):
    """The server failed in a way a retry will not fix (its message is for the log)."""


def is_length_error(error: openai.BadRequestError) -> bool:
    """Whether a 400 says the prompt does not fit (vLLM's and ``bot serve``'s wording)."""
    return "context length" in str(error.message).lower()


class RemoteBackend:
    """A :class:`~bot.engine.backend.ReplyBackend` over an OpenAI-compatible server."""

    def __init__(
        self,
        client: AsyncOpenAI,
        model: str,
        tokenizer: PreTrainedTokenizerBase,
        *,
        persona: str | None,
        context_tokens: int,
        reply_tokens: int = 64,
    ) -> None:
        self.client = client
        self.model = model
        self.tokenizer = tokenizer
        self.persona = persona
        self.context_tokens = context_tokens
        self.reply_tokens = min(reply_tokens, context_tokens // 2)
        self._stop_ids = stop_token_ids(tokenizer)
        self.replies = 0
        self.tokens = 0
        self.prefilled_tokens = 0  # prompt tokens the server computed
        self.reused_tokens = 0  # prompt tokens the server took from its prefix cache
        self._in_flight = 0

    @classmethod
    async def connect(
        cls,
        base_url: str,
        *,
        api_key: str | None,
        model: str | None,
        tokenizer_path: str,
        persona: str | None,
        context_tokens: int | None,
        reply_tokens: int,
        timeout_s: float,
        connect_timeout_s: float,
    ) -> RemoteBackend:
        """Load the tokenizer, ask the server for its model and window; one clear line if not."""
        try:
            source = await asyncio.to_thread(pretrained_source, tokenizer_path)
            tokenizer = await asyncio.to_thread(
                AutoTokenizer.from_pretrained, tokenizer_path, **source.tokenizer_kwargs
            )
        except (OSError, ValueError) as error:
            why = str(error) if isinstance(error, HubUnreachable) else error.__class__.__name__
            raise ModelLoadError(
                f"cannot load the tokenizer from {tokenizer_path!r} ({why}):"
                " set TOKENIZER_PATH to the served model's directory (its tokenizer files)"
            ) from None
        client = AsyncOpenAI(
            base_url=base_url,
            api_key=api_key or "none",  # the client insists on one; an open server ignores it
            timeout=openai.Timeout(timeout_s, connect=connect_timeout_s),
            max_retries=1,
        )
        try:
            listed = [m async for m in client.models.list()]
        except openai.APIError as error:
            await client.close()
            raise ModelLoadError(
                f"the model server at LLM_BASE_URL={base_url} did not answer GET /models "
                f"({error.__class__.__name__}): start it (`python -m bot serve`, `vllm serve`) "
                "or fix LLM_BASE_URL / LLM_API_KEY"
            ) from None
        served = {m.id: m for m in listed}
        name = model or (listed[0].id if listed else "")
        if name not in served:
            await client.close()
            raise ModelLoadError(
                f"the server at {base_url} does not serve {name!r} (it serves "
                f"{sorted(served) or 'nothing'}): set LLM_MODEL to one of them"
            )
        window = context_tokens or (served[name].model_extra or {}).get("max_model_len")
        if not isinstance(window, int):
            window = getattr(tokenizer, "model_max_length", 0)
            if not 0 < window < 1_000_000:  # "no limit" sentinel of tokenizers without one
                await client.close()
                raise ModelLoadError(
                    f"the server at {base_url} does not say its context length: set CONTEXT_TOKENS"
                )
        logger.info("remote model %s at %s: context %d tokens", name, base_url, window)
        return cls(
            client,
            name,
            tokenizer,
            persona=persona,
            context_tokens=window,
            reply_tokens=reply_tokens,
        )

    @property
    def prompt_budget(self) -> int:
        return self.context_tokens - self.reply_tokens

    @property
    def queue_depth(self) -> int:
        return self._in_flight

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def forget(self, key: Hashable) -> None:
        """Nothing to drop here: the server's cache is matched by content, so a reset dialogue's
        old entry is simply never extended again and ages out."""

    async def aclose(self) -> None:
        await self.client.close()

    def _request(self, prompt: str, params: SamplingParams, key: Hashable | None) -> dict[str, Any]:
        """Every sampling value, explicitly; vLLM's extras in ``extra_body``."""
        request: dict[str, Any] = {
            "model": self.model,
            "prompt": prompt,
            "max_tokens": min(params.max_new_tokens, self.reply_tokens),
            "temperature": params.temperature,
            "top_p": params.top_p,
            "stop": list(SPEAKER_TAGS),
            "stream": True,
            "stream_options": {"include_usage": True},
            "extra_body": {
                "top_k": params.top_k if params.top_k > 0 else -1,
                "repetition_penalty": params.repetition_penalty,
                "min_tokens": params.min_new_tokens,
                "stop_token_ids": self._stop_ids,
            },
        }
        if key is not None:
            request["user"] = str(key)
        if params.seed is not None:
            request["seed"] = params.seed
        return request

    async def generate(
        self,
        turns: list[str],
        params: SamplingParams,
        *,
        key: Hashable | None = None,
        on_text: Callable[[str], None] | None = None,
        stats: RequestStats | None = None,
    ) -> str:
        """The clean reply to ``turns``, streamed from the server (see the module docstring)."""
        stats = stats if stats is not None else RequestStats()
        self._in_flight += 1
        try:
            prompt = render_prompt(turns, self.persona)
            logger.debug("prompt: %s", prompt)  # message texts are logged only at DEBUG
            try:
                stream = await self._open(prompt, params, key)
            except openai.BadRequestError as error:
                if not is_length_error(error):
                    raise RemoteError(f"the model server refused the request: {error}") from None
                budget = int(self.count_tokens(prompt) * RETRIM_FRACTION)
                logger.warning("the server found the prompt too long: trimmed to %d tokens", budget)
                turns = fit_turns(turns, self.count_tokens, budget, self.persona)
                prompt = render_prompt(turns, self.persona)
                try:
                    stream = await self._open(prompt, params, key)
                except openai.BadRequestError as again:
                    raise RemoteError(f"the model server refused the request: {again}") from None
            return await self._read(stream, on_text, stats)
        finally:
            self._in_flight -= 1

    async def _open(self, prompt: str, params: SamplingParams, key: Hashable | None) -> Any:
        """Send the request; what the server says before streaming, in the bot's terms."""
        try:
            return await self.client.completions.create(**self._request(prompt, params, key))
        except openai.APITimeoutError:
            raise EngineTimeout from None
        except (openai.RateLimitError, openai.APIConnectionError) as error:
            logger.warning("model server busy or unreachable: %s", error.__class__.__name__)
            raise EngineBusy from None
        except openai.APIStatusError as error:
            if error.status_code == 503:
                raise EngineBusy from None
            if isinstance(error, openai.BadRequestError):
                raise
            raise RemoteError(f"the model server answered {error.status_code}") from None

    async def _read(
        self, stream: Any, on_text: Callable[[str], None] | None, stats: RequestStats
    ) -> str:
        """Collect the streamed text; show the clean reply so far; count what the server says."""
        eos = self.tokenizer.eos_token
        text = shown = ""
        try:
            async for chunk in stream:
                if chunk.choices:
                    delta = chunk.choices[0].text or ""
                    if delta and stats.first_token_at is None:
                        stats.first_token_at = time.perf_counter()
                    text += delta
                    clean = parse_reply(text, eos_token=eos)
                    if on_text is not None and clean and clean != shown:
                        shown = clean
                        on_text(clean)
                if chunk.usage is not None:
                    self._count(chunk.usage, stats)
        except openai.APITimeoutError:
            raise EngineTimeout from None
        except Exception as error:  # an error event, a dropped connection, a broken chunk
            raise RemoteError(
                f"the model server failed mid-reply: {error.__class__.__name__}: {error}"
            ) from None
        finally:
            await stream.close()  # on cancellation too: the server drops the request
        self.replies += 1
        return parse_reply(text, eos_token=eos)

    def _count(self, usage: Any, stats: RequestStats) -> None:
        details = getattr(usage, "prompt_tokens_details", None)
        cached = (getattr(details, "cached_tokens", None) or 0) if details is not None else 0
        stats.prompt_tokens, stats.new_tokens = usage.prompt_tokens, usage.completion_tokens
        stats.reused_tokens = cached
        self.tokens += usage.completion_tokens
        self.reused_tokens += cached
        self.prefilled_tokens += usage.prompt_tokens - cached
