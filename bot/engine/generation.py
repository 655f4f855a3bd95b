"""The generation engine: owns the model, serves every user's turn from one worker thread.

What it does for a chat server on one machine (the figures in docs/benchmarks.md come from
``make bench``):

- **Continuous batching.** Requests wait in a bounded queue (a full queue answers "busy" at once
  rather than letting everyone wait longer and longer). Between two decoding steps the worker
  admits whatever has arrived, up to ``MAX_BATCH`` rows; a row that finishes leaves at once. Each
  row keeps its own sampling settings (``bot.engine.sampling``), so a user's ``/temp`` holds
  inside a shared batch. On a CPU a decoding step is bound by reading the weights, so eight
  rows cost about twice one row, not eight times.
- **Chunked prefill.** A joining request's new prompt tokens are encoded in the same pass as the
  decoding rows' next tokens, at most ``prefill_chunk`` of them per step while rows are decoding
  (oldest request first), so a long prompt joins over several steps and the replies already
  streaming keep their pace. Rows being encoded hold slots after the decoding ones and move to
  slot ``i`` of the batch when their prompt is done (:meth:`GenerationEngine._join`).
- **Prefix caching.** After a reply the dialogue's keys/values stay in a
  :class:`~bot.engine.prefix_cache.PrefixCache` (LRU, ``KV_CACHE_MB``); the next turn encodes
  only the new user message. The persona exchange that opens every prompt is encoded once and
  shared by all dialogues. ``/reset`` drops the entry; when trimming the history changes the
  start of the prompt, the cache is used only up to where the prompts differ (the persona),
  which is why the history is trimmed in steps of several exchanges (``bot.memory``).
- **Two ways in.** :meth:`GenerationEngine.generate` takes a dialogue's turns and returns the
  bot's clean reply (what the bot calls, through :class:`~bot.engine.backend.ReplyBackend`);
  :meth:`GenerationEngine.complete` takes a raw prompt (text or token ids) with stop strings and
  stop tokens and returns a :class:`Completion` with its finish reason (what ``python -m bot
  serve`` calls for the OpenAI-compatible API). Both share the batch and the prefix cache: a
  request without a dialogue key reuses the cached entry whose text its prompt extends.
- **Streaming.** A request may pass ``on_text``; it is called on the event loop with the text so
  far whenever it grows (the handler throttles Telegram edits, the server sends the difference).
  Text that could still turn into a stop string, or an incomplete UTF-8 character, is held back.
- **Fallbacks.** Beam search (``NUM_BEAMS`` > 1) and models other than GPT-2 go through
  ``model.generate``, one request at a time, between decoding steps.

Every request has a timeout; a request that timed out (or all of them, at shutdown) is cancelled:
a queued one is skipped, a running one leaves the batch at the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import replace

import torch
from transformers import (
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from bot.engine.cpu_attention import DecodeAttention
from bot.engine.decoder import SlotDecoder, supports
from bot.engine.fallback import generate_apart
from bot.engine.openmp import StallWatch, context_switches, release_thread_pool
from bot.engine.prefix_cache import CachedDialogue, Prefix, PrefixCache, common_prefix
from bot.engine.requests import (
    Completion,
    ContextLengthError,
    EngineBusy,
    EngineClosed,
    EngineTimeout,
    Request,
    RequestStats,
    Row,
    stop_token_ids,
)
from bot.engine.sampling import SamplingParams, choose_tokens
from bot.engine.threads import ThreadTuner
from dataset_tools.dialogue_format import (
    parse_reply,
    render_dialogue,
    render_prompt,
)

logger = logging.getLogger(__name__)

#: A Unicode replacement character ends decoded text while a multi-byte character is split
#: between tokens: such a tail is not streamed until the next token completes it.
_PARTIAL = "\ufffd"

#: Steps kept in :attr:`GenerationEngine.step_log` (a few minutes of a busy engine's steps, ~1 MB).
STEP_LOG_SIZE = 10_000


class GenerationEngine:
    """Turns a list of dialogue turns into a reply; see the module docstring for how."""

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
        max_batch: int = 8,
        cache_mb: float = 1024,
        batched: bool = True,
        seed: int | None = None,
        threads: int | None = None,
        prefill_chunk: int | None = 64,
        attention: DecodeAttention | None = None,
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
        self.max_batch = max_batch
        self.threads = threads
        #: Picks the worker's thread count from its steps where ``threads`` does not fix it
        #: (set when the worker starts; see bot.engine.threads).
        self.thread_tuner: ThreadTuner | None = None
        #: Notices decoding steps that wait on another thread's OpenMP pool (bot.engine.openmp).
        self.stall_watch = StallWatch(getattr(model.config, "num_hidden_layers", None) or 1)
        self.prefill_chunk = prefill_chunk or None
        self._queue: queue.Queue[Request | None] = queue.Queue(maxsize=queue_size)
        self._thread: threading.Thread | None = None
        self._rows: list[Row] = []  # decoding, row i in slot i
        self._joining: list[Row] = []  # prompts being encoded, oldest first, each in its slot
        self._closed = False
        self._stop_ids = stop_token_ids(tokenizer)
        self.decoder = (
            SlotDecoder(model, self.context_tokens, attention=attention)
            if batched and supports(model)
            else None
        )
        self.prefix_cache = PrefixCache(int(cache_mb * 2**20))
        # The persona exchange opens every prompt: encoded once, shared by every dialogue's
        # first turn (and by any turn whose own entry was evicted or reset).
        self._persona_text = render_dialogue([], persona, add_eos=False) if persona else ""
        self._persona_entry: CachedDialogue | None = None
        self._vocab_size = model.get_input_embeddings().weight.shape[0]
        device = model.device
        self._generator = None
        if seed is not None:
            self._generator = torch.Generator(device=device).manual_seed(seed)
        self.replies = 0
        self.tokens = 0
        self.prefilled_tokens = 0
        self.reused_tokens = 0
        # Where the worker's time goes (seconds), for the bench and /stats-style diagnostics.
        self.busy_s = {"admit": 0.0, "step": 0.0, "finish": 0.0}
        self.steps = 0
        # The latest steps as (decoding rows, prompt tokens encoded in the step, positions the
        # decoding rows attend over, seconds): a step that also encodes a prompt chunk can take
        # several times a decoding-only one, so the mean of ``busy_s["step"]`` says little about
        # either (the bench reports them apart); the positions say how much of a decoding step's
        # time is its rows' context (attention reads every cached key and value once).
        self.step_log: deque[tuple[int, int, int, float]] = deque(maxlen=STEP_LOG_SIZE)
        self._warmed = threading.Event()
        self._warm_up_error: Exception | None = None

    @functools.cached_property
    def _stop_mask(self) -> torch.Tensor:
        """``[vocab]`` True at the stop tokens. Built by the worker on first use: a tensor this
        size is filled by a parallel loop, and the event loop's thread must not start an OpenMP
        team of its own (see :func:`run_in_own_thread`)."""
        device = self.model.device
        mask = torch.zeros(self._vocab_size, dtype=torch.bool, device=device)
        mask[torch.tensor(self._stop_ids, device=device)] = True
        return mask

    @property
    def prompt_budget(self) -> int:
        """Tokens the prompt may take: the context window minus the reply budget."""
        return self.context_tokens - self.reply_tokens

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    @property
    def active_rows(self) -> int:
        return len(self._rows)

    @property
    def worker_threads(self) -> int:
        """The thread count the worker decodes with now (ENGINE_THREADS, or what its
        :class:`~bot.engine.threads.ThreadTuner` chose; before the worker starts, torch's)."""
        if self.thread_tuner is not None:
            return self.thread_tuner.current
        return self.threads or torch.get_num_threads()

    @property
    def openmp_stalls(self) -> int:
        """How often decoding was found waiting on another thread's OpenMP pool."""
        return self.stall_watch.episodes

    def count_tokens(self, text: str) -> int:
        return len(self._tokenize(text))

    def _tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def start(self, *, warm_up: bool = False) -> None:
        """Start the worker thread; with ``warm_up`` it first serves :meth:`warm_up`.

        The worker is the only thread that runs the model while serving (see
        :func:`run_in_own_thread` for why no other thread should), so it does the warm-up too;
        :meth:`ready` waits for it. The calling thread's own OpenMP helpers, if an earlier
        parallel operation left it any, are freed first (``bot.engine.openmp``).
        """
        if self.model.device.type == "cpu":
            release_thread_pool()
        self._thread = threading.Thread(
            target=self._work, args=(warm_up,), name="generation", daemon=True
        )
        self._thread.start()

    async def ready(self) -> None:
        """Wait until the worker has warmed up; re-raise what made the warm-up fail."""
        await asyncio.to_thread(self._warmed.wait)
        if self._warm_up_error is not None:
            raise self._warm_up_error

    def warm_up(self) -> None:
        """Serve one short request in the calling thread (the worker, with ``start(warm_up=True)``)
        so that the first user pays neither for lazy initialisation nor for encoding the persona;
        raise what went wrong, so that a model that cannot serve fails the start, not users."""
        request = Request(
            render_prompt(["Привет"], self.persona),
            SamplingParams(max_new_tokens=2),
            None,
            None,
            None,
            stop_ids=frozenset(self._stop_ids),
            keep=False,
        )
        self._take([request])
        while self._rows or self._joining:
            self._step()
        if request.error is not None:  # a model that cannot serve fails the start, not users
            raise request.error
        self.reset_counters()

    def reset_counters(self) -> None:
        """Start the counters (replies, tokens, steps, busy time, the step log) from zero: what
        was served before (the warm-up; a benchmark's untimed part) is left out of them."""
        self.replies = self.tokens = self.prefilled_tokens = self.reused_tokens = self.steps = 0
        self.busy_s = dict.fromkeys(self.busy_s, 0.0)
        self.step_log.clear()

    def forget(self, key: Hashable) -> None:
        """Drop a dialogue's cached keys/values (its history was reset or deleted)."""
        self.prefix_cache.forget(key)

    async def generate(
        self,
        turns: list[str],
        params: SamplingParams,
        *,
        key: Hashable | None = None,
        on_text: Callable[[str], None] | None = None,
        stats: RequestStats | None = None,
    ) -> str:
        """The model's clean reply to ``turns`` (which end with the user's message).

        ``key`` names the dialogue whose cached prefix may be reused (``None``: the longest cached
        prefix of the prompt, if any); ``on_text`` receives the clean reply so far as it grows, on
        the event loop. The reply ends at EOS or at either speaker's tag.
        """
        prompt = render_prompt(turns, self.persona)
        logger.debug("prompt: %s", prompt)  # message texts are logged only at DEBUG
        shown = ""

        def show(raw: str) -> None:
            nonlocal shown
            text = parse_reply(raw, eos_token=self.tokenizer.eos_token)
            if text and text != shown and on_text is not None:
                shown = text
                on_text(text)

        completion = await self.complete(
            prompt,
            replace(params, max_new_tokens=min(params.max_new_tokens, self.reply_tokens)),
            key=key,
            stop_token_ids=self._stop_ids,
            on_text=show if on_text is not None else None,
            stats=stats,
            truncate=True,
        )
        return parse_reply(completion.text, eos_token=self.tokenizer.eos_token)

    async def complete(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        *,
        key: Hashable | None = None,
        stop: tuple[str, ...] = (),
        stop_token_ids: list[int] | None = None,
        on_text: Callable[[str], None] | None = None,
        stats: RequestStats | None = None,
        truncate: bool = False,
    ) -> Completion:
        """A raw completion of ``prompt`` (text, or token ids as they are).

        It ends at a token of ``stop_token_ids`` (default: EOS), at a string of ``stop`` (cut from
        the text), or after ``params.max_new_tokens``. A prompt that leaves no room for them
        raises :class:`ContextLengthError`, unless ``truncate`` keeps its end instead (the bot's
        history is trimmed to fit beforehand; this is only a safety net).
        """
        if self._closed:
            raise EngineClosed
        if isinstance(prompt, list) or not truncate:
            count = len(prompt) if isinstance(prompt, list) else self.count_tokens(prompt)
            if count + params.max_new_tokens > self.context_tokens:
                raise ContextLengthError(self.context_tokens, count, params.max_new_tokens)
        loop = asyncio.get_running_loop()
        request = Request(
            prompt,
            params,
            key,
            loop,
            loop.create_future(),
            on_text,
            stop_ids=frozenset(
                stop_token_ids if stop_token_ids is not None else [self.tokenizer.eos_token_id]
            ),
            stop=tuple(s for s in stop if s),
        )
        if stats is not None:
            request.stats = stats
        try:
            self._queue.put_nowait(request)
        except queue.Full:
            raise EngineBusy from None
        assert request.future is not None
        try:
            return await asyncio.wait_for(asyncio.shield(request.future), self.timeout_s)
        except TimeoutError:
            request.cancelled.set()
            raise EngineTimeout from None
        except asyncio.CancelledError:
            request.cancelled.set()
            raise

    async def aclose(self) -> None:
        """:meth:`close` off the event loop (the worker may take a step to stop)."""
        await asyncio.to_thread(self.close)

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
        for row in [*self._rows, *self._joining]:
            row.request.cancelled.set()
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout_s)

    # -- the worker -----------------------------------------------------------------------------
    def _work(self, warm_up: bool) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)
        elif self.model.device.type == "cpu" and torch.get_num_threads() > 1:
            self.thread_tuner = ThreadTuner(torch.get_num_threads())
        if warm_up:
            try:
                self.warm_up()
            except Exception as error:  # the operator sees it from ready(), at start-up
                self._warm_up_error = error
        self._warmed.set()
        while True:
            busy = len(self._rows) + len(self._joining)
            waiting = [] if busy else [self._queue.get()]
            while busy + len(waiting) < self.max_batch:  # join at this step
                try:
                    waiting.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            if not self._take(waiting):
                return
            if self._rows or self._joining:
                self._step()

    def _take(self, requests: list[Request | None]) -> bool:
        """Admit requests into the batch (or serve them apart); ``False`` means shut down."""
        if None in requests:
            for request in requests:
                if request is not None:
                    self._resolve(request, error=EngineClosed())
            for row in [*self._rows, *self._joining]:
                self._resolve(row.request, error=EngineClosed())
            self._rows.clear()
            self._joining.clear()
            return False
        batch = []
        for request in requests:
            assert request is not None
            if request.cancelled.is_set():
                continue
            if self.decoder is None or request.params.num_beams > 1:
                try:
                    self._serve_apart(request)
                except Exception as error:  # reported to the awaiting handler, not lost
                    logger.exception("generation failed")
                    self._resolve(request, error=error)
            else:
                batch.append(request)
        if batch:
            started = time.perf_counter()
            try:
                self._plan(batch)
            except Exception as error:
                logger.exception("generation failed")
                failed = {id(request) for request in batch}
                self._joining = [r for r in self._joining if id(r.request) not in failed]
                for request in batch:
                    self._resolve(request, error=error)
            finally:
                self.busy_s["admit"] += time.perf_counter() - started
        return True

    def _encode(self, request: Request, cached: CachedDialogue | None) -> list[int]:
        """The prompt's tokens, reusing the cached dialogue's own tokens where it is a prefix.

        The cached tokens are those the model produced, which a fresh tokenization of the same
        reply text often would not reproduce (BPE prefers its own merges): matching on text
        keeps the whole previous turn reusable. Anything else is tokenized afresh. Token ids
        given by the client are used as they are.
        """
        prompt = request.prompt
        if isinstance(prompt, list):
            return list(prompt)
        room = self.context_tokens - request.params.max_new_tokens
        if cached is not None and prompt.startswith(cached.text) and len(prompt) > len(cached.text):
            ids = cached.ids + self._tokenize(prompt[len(cached.text) :])
            if len(ids) <= room:
                return ids
        return self._tokenize(prompt)[-room:]

    def _shared_persona(self, slot: int) -> CachedDialogue | None:
        """The persona exchange's keys/values, computed once (in ``slot``, which is free)."""
        if self._persona_entry is None and self._persona_text and self.decoder is not None:
            ids = self._tokenize(self._persona_text)
            if 0 < len(ids) < self.prompt_budget:
                self.decoder.reserve(slot + 1, len(ids))
                with torch.inference_mode():
                    self.decoder.prefill(slot, ids, 0)
                past = self.decoder.save_slot(slot, 0, len(ids))
                # shared=1: the engine owns it; no dialogue's budget counts it again.
                self._persona_entry = CachedDialogue(self._persona_text, ids, (past,), shared=1)
        return self._persona_entry

    def _cached_start(self, request: Request, slot: int) -> CachedDialogue | None:
        """Where a request's prompt may start from: its dialogue's entry, else the longest
        cached entry its prompt extends (a client that names no dialogue), else the persona."""
        if request.key is not None:
            own = self.prefix_cache.take(request.key)
            if own is not None:
                return own
        found = self.prefix_cache.take_longest_prefix(request.prompt)
        return found or self._shared_persona(slot)

    def _plan(self, requests: list[Request]) -> None:
        """Give each request a free slot holding its reusable prefix; its new tokens are encoded
        by the following steps (:meth:`_step`), a chunk at a time while other rows decode."""
        assert self.decoder is not None
        for request in requests:
            slot = self._free_slot()
            cached = self._cached_start(request, slot)
            ids = self._encode(request, cached)
            reuse = 0
            if cached is not None:
                reuse = min(common_prefix(cached.ids[: cached.computed], ids), len(ids) - 1)
            max_new = request.params.max_new_tokens
            self.decoder.reserve(slot + 1, min(len(ids) + max_new, self.context_tokens))
            start = cached.prefix(reuse) if cached is not None and reuse else Prefix()
            self.decoder.load_slot(slot, start.chunks)
            request.stats.reused_tokens, request.stats.prompt_ids = reuse, list(ids)
            request.stats.prompt_tokens = len(ids)
            self.prefilled_tokens += len(ids) - reuse
            self.reused_tokens += reuse
            device = self.decoder.device
            seen = torch.zeros(self._vocab_size, dtype=torch.bool, device=device)
            seen[torch.tensor(ids, device=device)] = True
            generator = None
            if request.params.seed is not None:
                generator = torch.Generator(device=device).manual_seed(request.params.seed)
            row = Row(request, ids, len(ids), reuse, seen, start, generator, slot=slot)
            self._joining.append(row)

    def _free_slot(self) -> int:
        """The lowest slot after the decoding rows that no joining row holds."""
        taken = {row.slot for row in self._joining}
        slot = len(self._rows)
        while slot in taken:
            slot += 1
        return slot

    def _chunks(self) -> list[tuple[Row, int]]:
        """How many prompt tokens each joining row encodes in this step.

        While rows are decoding, at most ``prefill_chunk`` tokens in all, oldest request first,
        so a long prompt joining does not stall the replies already streaming; with no row
        decoding there is nobody to keep waiting, and every prompt is encoded whole.
        """
        for row in [r for r in self._joining if r.request.cancelled.is_set()]:
            self._joining.remove(row)  # its caller has gone (timeout, shutdown)
            self._resolve(row.request, error=EngineClosed())
        budget = self.prefill_chunk if self._rows else None
        chunks = []
        for row in self._joining:
            take = row.prompt_len - row.computed
            if budget is not None:
                take = min(take, budget)
                budget -= take
            if take <= 0:
                break
            chunks.append((row, take))
        return chunks

    def _step(self) -> None:
        """One pass of the model: every decoding row's next token, and the next chunk of the
        prompts being encoded (in the same matrix products: the weights are read once)."""
        assert self.decoder is not None
        started = time.perf_counter()
        self.steps += 1
        rows = self._rows
        device = self.decoder.device
        positions = sum(row.computed for row in rows)
        try:
            chunks = self._chunks()
            if not rows and not chunks:  # every joining request was cancelled
                return
            tuner = self.thread_tuner
            with torch.inference_mode():
                if not chunks:
                    tokens = torch.tensor([row.ids[-1] for row in rows], device=device)
                    lengths = torch.tensor([row.computed for row in rows], device=device)
                    if tuner is not None:
                        _use_threads(tuner.threads_for(len(rows)))
                    decoding, switches = time.perf_counter(), context_switches()
                    logits = self.decoder.decode(tokens, lengths)
                    if tuner is not None:
                        tuner.step_took(time.perf_counter() - decoding)
                    after = context_switches()
                    if switches is not None and after is not None and device.type == "cpu":
                        self._watch_stalls(after[0] - switches[0], after[1] - switches[1], rows)
                else:  # decoding rows are rows of one token; chunks want logits when done
                    if tuner is not None:
                        tuner.other_step()
                        _use_threads(tuner.current)
                    spans = [(i, [row.ids[-1]], row.computed) for i, row in enumerate(rows)]
                    spans += [
                        (r.slot, r.ids[r.computed : r.computed + n], r.computed) for r, n in chunks
                    ]
                    wanted = [True] * len(rows)
                    wanted += [row.computed + take == row.prompt_len for row, take in chunks]
                    logits = self.decoder.prefill_many(spans, wanted=wanted)
            for row in rows:
                row.computed += 1
                row.request.stats.batch_rows = max(row.request.stats.batch_rows, len(rows))
            for row, take in chunks:
                row.computed += take
            finished = self._choose(rows, logits[: len(rows)]) if rows else []
            joined = [row for row, _ in chunks if row.computed == row.prompt_len]
            took = time.perf_counter() - started
            self.busy_s["step" if rows else "admit"] += took
            self.step_log.append((len(rows), sum(take for _, take in chunks), positions, took))
        except Exception as error:
            logger.exception("generation failed")
            for row in [*rows, *self._joining]:
                self._resolve(row.request, error=error)
            rows.clear()
            self._joining.clear()
            return
        started = time.perf_counter()
        for index in sorted(finished, reverse=True):
            self._finish(index)
        self.busy_s["finish"] += time.perf_counter() - started
        if joined:
            self._join(joined, logits[len(logits) - len(joined) :])

    def _watch_stalls(self, voluntary: int, involuntary: int, rows: list[Row]) -> None:
        """Count a decoding step's context switches; when they show the worker's threads
        sleeping between products (``bot.engine.openmp``), say which cause is likelier, free
        the event loop thread's OpenMP pool (the usual culprit of one, harmless otherwise) and
        let the thread tuner try again (the answer to the other)."""
        watch = self.stall_watch
        if not watch.step(voluntary, involuntary, torch.get_num_threads()):
            return
        pool = (
            "a thread other than the engine's ran a multi-threaded torch operation and keeps its "
            "OpenMP pool (freeing the event loop's; if this comes back on idle cores, run such "
            "work in a thread that exits: bot.engine.run_in_own_thread)"
        )
        busy = "other processes take the cores (the engine's thread tuner tries fewer threads)"
        first, second = (busy, pool) if watch.busy_machine else (pool, busy)
        logger.warning(
            "decoding steps wait on sleeping OpenMP threads (%.0f voluntary context switches a "
            "step, ~0 on idle cores, %.0f or more mean this; %.1f preemptions a step): most "
            "likely %s; or %s",
            watch.mean,
            watch.threshold,
            watch.preempted,
            first,
            second,
        )
        for loop in {row.request.loop for row in rows if row.request.loop is not None}:
            with contextlib.suppress(RuntimeError):  # the loop is closed (shutdown)
                loop.call_soon_threadsafe(release_thread_pool)
        watch.restart()
        if self.thread_tuner is not None:
            self.thread_tuner.try_soon()  # two threads may pay again once the pool is gone

    def _join(self, joined: list[Row], logits: torch.Tensor) -> None:
        """Rows whose prompt is encoded join the decoding rows: slot i for row i, then each
        chooses its first token from its prompt's last logits."""
        assert self.decoder is not None
        first = len(self._rows)
        for row in joined:
            self._joining.remove(row)
            target = len(self._rows)
            if row.slot != target:
                other = next((r for r in self._joining if r.slot == target), None)
                if other is None:
                    self.decoder.move_slot(row.slot, target, row.computed)
                else:  # a later prompt's chunks sit there: trade places
                    self.decoder.swap_slots(row.slot, target, row.computed, other.computed)
                    other.slot = row.slot
                row.slot = target
            self._rows.append(row)
        for index in sorted(self._choose(joined, logits), reverse=True):
            self._finish(first + index)

    def _choose(self, rows: list[Row], logits: torch.Tensor) -> list[int]:
        """Append each row's next token; return the indices (into ``rows``) that are done."""
        params = [row.request.params for row in rows]
        ban = torch.tensor(
            [len(row.generated) < row.request.params.min_new_tokens for row in rows],
            device=logits.device,
        )
        generators = [row.generator or self._generator for row in rows]
        with torch.inference_mode():
            chosen = choose_tokens(
                logits,
                params,
                rows[0].seen[None] if len(rows) == 1 else torch.stack([r.seen for r in rows]),
                ban,
                self._stop_mask_for(rows),
                generators,
            ).tolist()
        now = time.perf_counter()
        done = []
        for index, (row, token) in enumerate(zip(rows, chosen, strict=True)):
            request = row.request
            if request.stats.first_token_at is None:
                request.stats.first_token_at = now
            if request.cancelled.is_set():
                done.append(index)
                continue
            if token in request.stop_ids:
                row.finish_reason = "stop"
                row.stop_reason = None if token == self.tokenizer.eos_token_id else token
                done.append(index)
                continue
            row.ids.append(token)
            row.seen[token] = True
            if (request.stop or request.on_text is not None) and self._read(row):
                done.append(index)
                continue
            max_new = request.params.max_new_tokens
            if len(row.generated) >= max_new or len(row.ids) >= self.context_tokens:
                done.append(index)  # finish_reason stays "length"
            elif request.on_text is not None:
                self._stream(row)
        return done

    def _stop_mask_for(self, rows: list[Row]) -> torch.Tensor:
        """``[vocab]`` or ``[rows, vocab]``: the stop tokens that rows under their minimum length
        may not choose. The engine's own set unless a request brought its own."""
        if all(row.request.stop_ids <= self._stop_set for row in rows):
            return self._stop_mask
        mask = torch.zeros(len(rows), self._vocab_size, dtype=torch.bool, device=self.model.device)
        for index, row in enumerate(rows):
            ids = [t for t in row.request.stop_ids if 0 <= t < self._vocab_size]
            if ids:
                mask[index, torch.tensor(ids, device=mask.device)] = True
        return mask

    @functools.cached_property
    def _stop_set(self) -> frozenset[int]:
        return frozenset(self._stop_ids)

    def _read(self, row: Row) -> bool:
        """Decode the row's reply so far; ``True`` when it now contains a stop string."""
        text = self._decode(row.generated)
        for stop in row.request.stop:
            # Only the tail can hold a new match (2 more characters: a split one may have changed).
            at = text.find(stop, max(0, len(row.text) - len(stop) - 2))
            if at >= 0:
                text, row.finish_reason, row.stop_reason = text[:at], "stop", stop
        row.text = text
        return row.finish_reason == "stop"

    def _stream(self, row: Row) -> None:
        """Show the text so far, less what may yet become a stop string or a whole character."""
        request = row.request
        text = row.text[: len(row.text) - request.holdback] if request.holdback else row.text
        text = text.rstrip(_PARTIAL)
        if text and text != row.shown and text.startswith(row.shown):
            row.shown = text
            callback = request.on_text
            loop = request.loop
            if callback is not None and loop is not None:
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(callback, text)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def _finish(self, index: int) -> None:
        """Resolve row ``index``, keep its keys/values for the next turn, free its slot."""
        assert self.decoder is not None
        row = self._rows[index]
        request = row.request
        generated = row.generated
        full = self._decode(generated)
        if request.keep and not request.cancelled.is_set():
            # Only the positions this turn computed are copied out; the rest it started from.
            # The entry's text is what its tokens spell, stop string included; a request that
            # names no dialogue is found again by that text (see PrefixCache.take_longest_prefix).
            new = self.decoder.save_slot(index, row.start.length, row.computed)
            prompt_text = (
                request.prompt
                if isinstance(request.prompt, str)
                else self._decode(row.ids[: row.prompt_len])
            )
            entry = row.start.extended(prompt_text + full, row.ids, new)
            self.prefix_cache.put(request.key if request.key is not None else object(), entry)
        last = len(self._rows) - 1
        if index != last:
            self.decoder.move_slot(last, index, self._rows[last].computed)
            self._rows[index] = self._rows[last]
        self._rows.pop()
        text = row.text if row.finish_reason == "stop" and row.stop_reason in request.stop else full
        self._deliver(request, row.ids[: row.prompt_len], generated, text, row)

    def _deliver(
        self,
        request: Request,
        prompt_ids: list[int],
        generated: list[int],
        text: str,
        row: Row | None,
    ) -> None:
        request.stats.reply_ids = list(generated)
        request.stats.prompt_tokens, request.stats.new_tokens = len(prompt_ids), len(generated)
        self.replies += 1
        self.tokens += len(generated)
        completion = Completion(
            text=text,
            token_ids=list(generated),
            finish_reason=row.finish_reason if row is not None else "stop",
            stop_reason=row.stop_reason if row is not None else None,
            prompt_tokens=len(prompt_ids),
            cached_tokens=request.stats.reused_tokens,
        )
        self._resolve(request, result=completion)

    def _serve_apart(self, request: Request) -> None:
        """Beam search, or a model the slot decoder does not cover: ``model.generate`` alone."""
        ids = self._encode(request, None)
        new = generate_apart(self.model, self.tokenizer, ids, request)
        generated = [t for t in new if t not in request.stop_ids]
        request.stats.prompt_ids = ids
        request.stats.first_token_at = request.stats.first_token_at or time.perf_counter()
        row = Row(request, ids + generated, len(ids), len(ids), torch.empty(0))
        row.finish_reason = "stop" if len(generated) < len(new) else "length"
        text = row.text if request.stop and self._read(row) else self._decode(generated)
        self._deliver(request, ids, generated, text, row)

    @staticmethod
    def _resolve(
        request: Request, result: Completion | None = None, error: BaseException | None = None
    ) -> None:
        if request.loop is None or request.future is None:
            request.result, request.error = result, error
            return
        future = request.future

        def settle() -> None:
            if future.done():
                return
            if error is not None:
                future.set_exception(error)
            else:
                assert result is not None
                future.set_result(result)

        with contextlib.suppress(RuntimeError):  # the loop is already closed (shutdown)
            request.loop.call_soon_threadsafe(settle)


def _use_threads(count: int) -> None:
    """Set the worker's thread count (a no-op when it already is)."""
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)
