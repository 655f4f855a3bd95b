"""The generation engine: owns the model, runs it in a worker thread, never on the event loop.

Requests go into a bounded queue; a full queue answers "busy" at once instead of making everyone
wait longer and longer, and each request has a timeout. A request that timed out (or the whole
engine, at shutdown) is cancelled: a queued one is skipped, a running one stops at the next token.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
)

from bot.quantize import load_int8_low_memory, quantize_int8
from dataset_tools.dialogue_format import BOT_TAG, USER_TAG, parse_reply, render_prompt

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(Exception):
    """The model cannot be loaded; the message is one line telling the operator what to set."""


class EngineBusy(Exception):
    """The queue is full."""


class EngineTimeout(Exception):
    """The reply did not come within the request timeout."""


class EngineClosed(Exception):
    """The engine is shutting down."""


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling: each user has their own temperature."""

    temperature: float = 0.8
    top_p: float = 0.9
    top_k: int = 50
    repetition_penalty: float = 1.15
    max_new_tokens: int = 64


@dataclass
class _Request:
    prompt_ids: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[str]
    cancelled: threading.Event = field(default_factory=threading.Event)


class _Cancelled(StoppingCriteria):
    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> bool:  # type: ignore[override]
        return self.event.is_set()


def pick_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def load_model(
    path: str, device: str = "auto", dtype: str = "float32", quantize: str = "none"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load any Hugging Face causal-LM directory or hub id, or fail with one clear line.

    ``quantize="int8"`` converts the projections to dynamic int8 (CPU only, see bot.quantize).
    """
    local = Path(path)
    looks_local = local.is_absolute() or path.startswith(".") or local.parent.exists()
    if not local.exists() and (looks_local or path.count("/") != 1):  # not a hub id either
        raise ModelLoadError(
            f"no model at {path!r}: train one (`make finetune PROFILE=tiny-scratch`) or set "
            "MODEL_PATH to a Hugging Face model directory or hub id"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        # int8 from local safetensors: quantized while loading, the float32 model never whole
        model = load_int8_low_memory(local) if quantize == "int8" and local.is_dir() else None
        already_int8 = model is not None
        if model is None:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype])
    except (OSError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelLoadError(
            f"cannot load the model from MODEL_PATH={path!r}: {reason}. Set MODEL_PATH to a "
            "Hugging Face model directory (e.g. checkpoints/latest after `make finetune`)"
        ) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    target = pick_device(device)
    if quantize == "int8":
        if target.type != "cpu":
            raise ModelLoadError(
                "MODEL_QUANTIZE=int8 is for CPUs; on a GPU use MODEL_DTYPE=bfloat16"
            )
        if dtype != "float32":
            raise ModelLoadError("MODEL_QUANTIZE=int8 needs MODEL_DTYPE=float32")
        if not already_int8:
            quantize_int8(model)
    model.to(target)
    model.eval()
    return model, tokenizer


class GenerationEngine:
    """Turns a list of dialogue turns into a reply, one request at a time in a worker thread."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        persona: str | None,
        context_tokens: int | None = None,
        reply_tokens: int = 64,
        queue_size: int = 32,
        timeout_s: float = 60.0,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.persona = persona
        window = getattr(model.config, "n_positions", None) or getattr(
            model.config, "max_position_embeddings", 1024
        )
        self.context_tokens = min(context_tokens or window, window)
        self.reply_tokens = min(reply_tokens, self.context_tokens // 2)
        self.timeout_s = timeout_s
        self._queue: queue.Queue[_Request | None] = queue.Queue(maxsize=queue_size)
        self._thread: threading.Thread | None = None
        self._current: _Request | None = None
        self._closed = False
        vocab = tokenizer.get_vocab()
        self._stop_ids = [tokenizer.eos_token_id] + [
            vocab[t] for t in (USER_TAG, BOT_TAG) if t in vocab
        ]
        self.replies = 0
        self.tokens = 0

    @property
    def prompt_budget(self) -> int:
        """Tokens the prompt may take: the context window minus the reply budget."""
        return self.context_tokens - self.reply_tokens

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="generation", daemon=True)
        self._thread.start()

    def warm_up(self) -> None:
        """One short generation so the first user does not pay for lazy initialisation."""
        ids = self.tokenizer(render_prompt(["Привет"], self.persona), add_special_tokens=False)
        self._generate_ids(ids["input_ids"], SamplingParams(max_new_tokens=2), threading.Event())

    async def generate(self, turns: list[str], params: SamplingParams) -> str:
        """The model's clean reply to ``turns`` (which end with the user's message)."""
        if self._closed:
            raise EngineClosed
        prompt = render_prompt(turns, self.persona)
        logger.debug("prompt: %s", prompt)  # message texts are logged only at DEBUG
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"][-self.prompt_budget :]
        loop = asyncio.get_running_loop()
        request = _Request(ids, params, loop, loop.create_future())
        try:
            self._queue.put_nowait(request)
        except queue.Full:
            raise EngineBusy from None
        try:
            return await asyncio.wait_for(asyncio.shield(request.future), self.timeout_s)
        except TimeoutError:
            request.cancelled.set()
            raise EngineTimeout from None
        except asyncio.CancelledError:
            request.cancelled.set()
            raise

    def close(self, timeout_s: float = 5.0) -> None:
        """Cancel queued and running work and stop the worker (within ``timeout_s``)."""
        self._closed = True
        while True:
            try:
                pending = self._queue.get_nowait()
            except queue.Empty:
                break
            if pending is not None:
                pending.cancelled.set()
                self._resolve(pending, error=EngineClosed())
        if self._current is not None:
            self._current.cancelled.set()
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout_s)

    def _generate_ids(
        self, prompt_ids: list[int], params: SamplingParams, cancelled: threading.Event
    ) -> list[int]:
        device = self.model.device
        input_ids = torch.tensor([prompt_ids], device=device)
        with torch.inference_mode():
            output = self.model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                do_sample=True,
                temperature=params.temperature,
                top_p=params.top_p,
                top_k=params.top_k,
                repetition_penalty=params.repetition_penalty,
                max_new_tokens=min(params.max_new_tokens, self.reply_tokens),
                eos_token_id=self._stop_ids,
                pad_token_id=self.tokenizer.pad_token_id,
                stopping_criteria=StoppingCriteriaList([_Cancelled(cancelled)]),
            )
        return output[0, len(prompt_ids) :].tolist()

    def _work(self) -> None:
        while True:
            request = self._queue.get()
            if request is None:
                return
            if request.cancelled.is_set():
                continue
            self._current = request
            started = time.perf_counter()
            try:
                new_ids = self._generate_ids(request.prompt_ids, request.params, request.cancelled)
                text = self.tokenizer.decode(new_ids, skip_special_tokens=False)
                reply = parse_reply(text, eos_token=self.tokenizer.eos_token)
                self.replies += 1
                self.tokens += len(new_ids)
                logger.debug(
                    "generated %d tokens in %.2f s", len(new_ids), time.perf_counter() - started
                )
                self._resolve(request, result=reply)
            except Exception as error:  # reported to the awaiting handler, not lost in a thread
                logger.exception("generation failed")
                self._resolve(request, error=error)
            finally:
                self._current = None

    @staticmethod
    def _resolve(
        request: _Request, result: str | None = None, error: BaseException | None = None
    ) -> None:
        def settle() -> None:
            if request.future.done():
                return
            if error is not None:
                request.future.set_exception(error)
            else:
                request.future.set_result(result or "")

        with contextlib.suppress(RuntimeError):  # the loop is already closed (shutdown)
            request.loop.call_soon_threadsafe(settle)
