"""``make bench``: many users chatting at once, the naive design against the engine.

Simulated load: N users, each holding a T-turn conversation (persona ≈ 60 tokens, user messages
≈ 20 tokens, replies forced to a fixed length with ``min_new_tokens``; the history grows turn by
turn), all users active at once. The same messages go to:

- **naive**: the design this product replaces. Every turn re-encodes the whole context and calls
  ``model.generate`` from ``loop.run_in_executor(None, ...)`` (the default executor: min(32,
  cores + 4) threads sharing the cores);
- **engine**: ``bot.engine.GenerationEngine`` (continuous batching, per-dialogue prefix cache);
- **remote**: the bot's remote backend (``bot.engine.remote``, the ``openai`` client, streamed)
  over HTTP to a ``python -m bot serve`` process on 127.0.0.1 with the same engine settings:
  what a bot pointed at a model server pays for the network hop. Its peak RSS is the server's.

A design may name a variant after a colon, run in the same process tree as the others so that
the ratios come from one run: ``engine:int8`` (``MODEL_QUANTIZE=int8``), ``engine:bfloat16`` (any
``MODEL_DTYPE``), ``engine:threads=1`` (the worker's thread count), ``engine:chunk=0`` (each new
prompt encoded whole, ``PREFILL_CHUNK_TOKENS=0``), ``engine:omp=active`` (OpenMP threads spin while
they wait, ``OMP_WAIT_POLICY=ACTIVE``; see ``bot/__init__.py``), ``engine:spin=N`` (they spin N
times before they sleep, ``GOMP_SPINCOUNT=N``), ``engine:attention=off`` (PyTorch's attention
instead of the compiled CPU kernel, ``CPU_ATTENTION_KERNEL=off``), ``engine:memory=end`` and
``engine:memory=start`` (every prompt carries the user's facts and a recalled old exchange,
placed as the bot places them, or at the prompt's start: what each placement costs the prefix
cache; ``engine:memory=facts``: the facts alone, a dialogue in which nothing is recalled);
e.g. ``--designs naive,engine,engine:int8``.
``--join-tokens N`` then measures, per engine design, the streaming replies' token gaps while an
N-token prompt joins them.

``--background-load N`` starts N busy processes of the bench's own (each spins one core, N at most
twice the cores, all stopped when the bench ends) before the first design and keeps them running
through every design: what each design keeps of its speed when another program competes for the
CPU.

Each design runs in its own child process (peak RSS is per process) on the same model, built
from a config with random weights (``--shape medium`` is RuGPT-3 medium's: 24 layers, 1024 wide,
vocab 50264), so the figures need no download. Printed: wall time, aggregate new tokens/s, p50
and p95 turn latency (to the whole reply and to the first token), peak RSS, and the ratios; per
engine design, its worker's steps: those that only decoded, at the largest batch they reached
(median and p90: the "batch-N step"), apart from those that also encoded a prompt chunk.
``--json FILE`` writes ``{"benchmark": "serving", "machine": {...}, "settings": {...},
"designs": {"naive": {...}, "engine": {...}}}``: the machine it ran on
(:func:`benchmarks.machine.describe_machine`), the workload, and per design the stable keys
``tokens_per_s``, ``p50_s``, ``p95_s``, ``first_token_p50_s``, ``peak_rss_mb``. A run worth
keeping goes in ``benchmarks/results/``; ``make bench-report`` renders the tables from them.

The vocabulary: a BPE trained on the project's sample dialogues, filled up to the model's size
with placeholder tokens spelled with a leading space (as most words of a real GPT-2 vocabulary
are), so that a random model's replies are text that round-trips through the tokenizer as a
trained model's does.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bot.engine.bench_model import SHAPES, build, peak_rss_kb

DESIGNS = ("naive", "engine", "remote")
DTYPE_CHOICES = ("float32", "bfloat16", "float16", "auto")
KEYS = ("tokens_per_s", "p50_s", "p95_s", "first_token_p50_s", "peak_rss_mb")
PERSONA_TOKENS = 60
MESSAGE_TOKENS = 20


def conversations(
    tokenizer: Any, users: int, turns: int, history: int = 0, reply_tokens: int = 0
) -> tuple[str, list[list[str]], list[list[str]]]:
    """The persona, each user's messages, and each user's ``history`` earlier exchanges (user
    message, ``reply_tokens``-token reply, ...; empty lists for 0), cut from the sample
    dialogues to the target sizes."""
    from dataset_tools.sample_data import generate_dialogues

    def sized(words: list[str], tokens: int) -> str:
        text = ""
        for word in words:
            longer = f"{text} {word}".strip()
            if len(tokenizer(longer, add_special_tokens=False)["input_ids"]) > tokens:
                break
            text = longer
        return text

    dialogues = [d for d in generate_dialogues() if len(d) >= 2]
    pool = [w for d in dialogues for t in d for w in t.split()]
    persona = sized(pool[: PERSONA_TOKENS * 2], PERSONA_TOKENS)
    messages, histories = [], []
    for user in range(users):
        own = []
        for turn in range(turns):
            start = (user * turns + turn) * 37 % max(len(pool) - 80, 1)
            own.append(sized(pool[start : start + 80], MESSAGE_TOKENS))
        messages.append(own)
        earlier = []
        for turn in range(history):
            start = ((users + user) * history + turn) * 53 % max(len(pool) - 160, 1)
            earlier.append(sized(pool[start : start + 80], MESSAGE_TOKENS))
            earlier.append(sized(pool[start + 80 : start + 160], reply_tokens))
        histories.append(earlier)
    return persona, messages, histories


def summarise(
    latencies: list[float], firsts: list[float], tokens: int, wall: float, per_turn: list[float]
) -> dict[str, Any]:
    ordered = sorted(latencies)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return {
        "wall_s": round(wall, 2),
        "new_tokens": tokens,
        "tokens_per_s": round(tokens / wall, 2),
        "p50_s": round(statistics.median(latencies), 3),
        "p95_s": round(p95, 3),
        "first_token_p50_s": round(statistics.median(firsts), 3),
        "turn_latency_s": [round(x, 3) for x in per_turn],
        "peak_rss_mb": round(peak_rss_kb() / 1024, 1),
    }


class Tally:
    """Each turn's latency, time to first token and new tokens, per turn index."""

    def __init__(self, turns: int) -> None:
        self.latencies: list[float] = []
        self.firsts: list[float] = []
        self.per_turn: list[list[float]] = [[] for _ in range(turns)]
        self.produced = 0

    def record(self, turn: int, took: float, first: float, tokens: int) -> None:
        self.latencies.append(took)
        self.per_turn[turn].append(took)
        self.firsts.append(first)
        self.produced += tokens

    def summary(self, wall: float) -> dict[str, Any]:
        means = [statistics.mean(t) for t in self.per_turn]
        return summarise(self.latencies, self.firsts, self.produced, wall, means)


#: The memory a ``memory=`` design adds to every prompt: the user's facts as the bot renders
#: them (bot.facts.facts_exchange), and one recalled old exchange, a different one each turn.
FACTS_EXCHANGE = [
    "Что ты обо мне помнишь?",
    "Тебя зовут Аня. Тебе 21 год. Ты живёшь в городе Казань. Ты работаешь: программист.",
]


def with_memory(
    turns: list[str], recalled: list[str], placement: str | None, kept: list[str] | None = None
) -> list[str]:
    """The prompt's turns with memory placed as the bot places it (``end``: the facts after the
    persona, the exchange recalled for each message right before it, kept there in the later
    prompts (``kept``: the turns so far with theirs), so that a prompt only grows at its end
    and the dialogue's cached keys/values stay good) or at the start (``start``: facts and
    this turn's recalled exchange first, as vector-memory front ends insert them: the prompt's
    start changes every turn); ``facts``: the facts alone (nothing recalled)."""
    if placement == "end":
        return FACTS_EXCHANGE + (kept if kept is not None else turns[:-1]) + recalled + turns[-1:]
    if placement == "start":
        return FACTS_EXCHANGE + recalled + turns
    if placement == "facts":  # the facts alone: a dialogue in which nothing is recalled
        return FACTS_EXCHANGE + turns
    return turns


async def converse(
    backend: Any,
    messages: list[list[str]],
    params: Any,
    tally: Tally,
    memory: str | None = None,
    recall_every: int = 1,
    histories: list[list[str]] | None = None,
    on_clock: Callable[[], None] | None = None,
) -> float:
    """Every user's conversation at once through a ReplyBackend (the bot's own call), with
    ``memory`` placed in each prompt (:func:`with_memory`), an old exchange recalled on every
    ``recall_every``-th turn (1: on each, the worst case; the bot recalls only when the
    message is about one: ``benchmarks.memory_set``'s ordinary messages measure how often);
    the wall time it took.

    ``histories``: each user's earlier exchanges, the conversation the timed turns continue
    (a bot's users are mostly in the middle of one). Before the clock starts, each user's last
    earlier message is answered through the backend, so the dialogue's cache holds the
    conversation so far, as it does for a user who keeps talking; ``on_clock`` is called as
    the clock starts (the engine's counters then leave that out)."""
    from bot.engine import RequestStats

    earlier = histories or [[] for _ in messages]
    warmed, everyone_warm, clock = 0, asyncio.Event(), [time.perf_counter()]

    async def user(index: int) -> None:
        nonlocal warmed
        turns: list[str] = list(earlier[index][:-1])
        kept: list[str] = list(earlier[index][:-2])
        if turns:  # the conversation so far, its last reply written now (not timed)
            prompt = with_memory(turns, [], memory, kept)
            text = await backend.generate(prompt, params, key=index, stats=RequestStats())
            kept = [*turns, text or "…"]
            turns.append(text or "…")
        warmed += 1
        if warmed == len(messages):  # the clock starts when the last one is ready
            if on_clock is not None:
                on_clock()
            clock[0] = time.perf_counter()
            everyone_warm.set()
        await everyone_warm.wait()
        for turn, message in enumerate(messages[index]):
            turns.append(message)
            stats = RequestStats()
            started = time.perf_counter()
            other = messages[(index + turn + 1) % len(messages)][turn]
            recalls = (turn + 1) % recall_every == 0
            recalled = [other, "Да, ты мне это рассказывал."] if recalls else []
            prompt = with_memory(turns, recalled, memory, kept)
            text = await backend.generate(prompt, params, key=index, stats=stats)
            first = (stats.first_token_at or started) - started
            tally.record(turn, time.perf_counter() - started, first, stats.new_tokens)
            turns.append(text or "…")
            kept += [*recalled, message, text or "…"]

    await asyncio.gather(*(user(i) for i in range(len(messages))))
    return time.perf_counter() - clock[0]


async def measure_join(engine: Any, tokens: int, rows: int, reply: int) -> dict[str, Any]:
    """Token gaps while ``rows`` replies stream and a ``tokens``-token prompt joins them.

    The replies' token gaps are read from their streamed text (each callback is a new token, or
    a few when a character spans tokens); the figures are the median gap before the long prompt
    arrives, and the median and longest ones between its arrival and its first token (the longest
    includes growing the slot cache to the long row's length, once)."""
    from bot.engine import RequestStats, SamplingParams, stop_token_ids

    stamps: list[list[float]] = [[] for _ in range(rows)]
    params = SamplingParams(max_new_tokens=reply, min_new_tokens=reply)
    vocab = engine.tokenizer.vocab_size
    stop = set(stop_token_ids(engine.tokenizer))

    def stamp(row: int) -> Any:
        return lambda _text: stamps[row].append(time.perf_counter())

    streaming = [
        asyncio.create_task(
            engine.complete([1000 + 7 * row], params, stop_token_ids=[], on_text=stamp(row))
        )
        for row in range(rows)
    ]
    while min(len(s) for s in stamps) < 5:
        await asyncio.sleep(0.005)
    long_prompt = [t % vocab for t in range(3000, 3000 + tokens) if t % vocab not in stop]
    stats = RequestStats()
    arrived = time.perf_counter()
    await engine.complete(long_prompt, SamplingParams(max_new_tokens=1), stats=stats)
    joined = stats.first_token_at or time.perf_counter()
    for task in streaming:
        task.cancel()
    await asyncio.gather(*streaming, return_exceptions=True)
    before = [b - a for s in stamps for a, b in itertools.pairwise(s) if b <= arrived]
    during = [b - a for s in stamps for a, b in itertools.pairwise(s) if b > arrived and a < joined]
    return {
        "join_prompt_tokens": len(long_prompt),
        "join_wait_s": round(joined - arrived, 3),
        "gap_before_p50_s": round(statistics.median(before), 3) if before else None,
        "gap_during_p50_s": round(statistics.median(during), 3) if during else None,
        "gap_during_max_s": round(max(during), 3) if during else None,
    }


async def run_remote(args: argparse.Namespace) -> dict[str, Any]:
    """The remote design: a ``bot serve`` child with the engine, users here on the backend."""
    import signal
    import urllib.request

    from transformers import AutoTokenizer

    from bot.engine import SamplingParams
    from bot.engine.remote import RemoteBackend

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    reply = args.reply_tokens
    persona, messages, histories = conversations(
        tokenizer, args.users, args.turns, args.history, reply
    )
    port = free_port()
    env = os.environ | {
        "MODEL_PATH": str(args.model),
        "MODEL_DEVICE": args.device,
        "MODEL_DTYPE": args.dtype,
        "MODEL_QUANTIZE": args.quantize,
        "MODEL_CPU_ONEDNN": str(args.cpu_onednn).lower(),
        "MAX_BATCH": str(args.max_batch),
        "KV_CACHE_MB": str(args.cache_mb),
        "QUEUE_SIZE": str(args.users * 2),
        "REQUEST_TIMEOUT_S": "3600",
        "SYSTEM_PROMPT": persona,
        "LOG_LEVEL": "WARNING",
    }
    server = subprocess.Popen(
        [sys.executable, "-m", "bot", "serve", "--port", str(port)],
        env=env,
        stdin=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 600
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5):
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("bot serve did not start") from None
                await asyncio.sleep(0.2)
        backend = await RemoteBackend.connect(
            f"http://127.0.0.1:{port}/v1",
            api_key=None,
            model=None,
            tokenizer_path=str(args.model),
            persona=persona,
            context_tokens=None,
            reply_tokens=reply,
            timeout_s=3600,
            connect_timeout_s=5,
        )
        params = SamplingParams(max_new_tokens=reply, min_new_tokens=reply)
        tally = Tally(args.turns)
        wall = await converse(backend, messages, params, tally, histories=histories)
        await backend.aclose()
        server_peak_mb = process_peak_rss_mb(server.pid)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)
    result = tally.summary(wall)
    result["client_peak_rss_mb"] = result["peak_rss_mb"]
    result["peak_rss_mb"] = server_peak_mb
    total = backend.prefilled_tokens + backend.reused_tokens
    result["prompt_tokens_reused"] = round(backend.reused_tokens / max(total, 1), 3)
    return result


def split_design(spec: str) -> tuple[str, dict[str, str]]:
    """``engine:int8:threads=1`` → ``("engine", {"quantize": "int8", "threads": "1"})``."""
    name, *variants = spec.split(":")
    if name not in DESIGNS:
        raise ValueError(f"unknown design {name!r}: choose from {', '.join(DESIGNS)}")
    options: dict[str, str] = {}
    for variant in variants:
        if variant == "int8":
            options["quantize"] = "int8"
        elif variant in DTYPE_CHOICES:
            options["dtype"] = variant
        elif variant.startswith("threads=") and variant[8:].isdigit() and int(variant[8:]) > 0:
            options["threads"] = variant[8:]
        elif variant.startswith("chunk=") and variant[6:].isdigit():
            options["prefill-chunk"] = variant[6:]
        elif variant in ("omp=active", "omp=passive"):
            options["omp"] = variant[4:].upper()
        elif variant.startswith("spin=") and variant[5:].isdigit():
            options["spin"] = variant[5:]
        elif variant in ("attention=auto", "attention=on", "attention=off"):
            options["attention"] = variant[10:]
        elif variant in ("memory=end", "memory=start", "memory=facts"):
            options["memory"] = variant[7:]
        else:
            raise ValueError(
                f"unknown variant {variant!r} in {spec!r}: use int8, a dtype "
                f"({', '.join(DTYPE_CHOICES)}), threads=N, chunk=N, omp=active|passive, spin=N, "
                "attention=auto|on|off or memory=end|start|facts"
            )
    return name, options


class BackgroundLoad:
    """N busy processes competing for the CPU while the designs run; stopped on exit."""

    def __init__(self, processes: int) -> None:
        self.processes = processes
        self._children: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> BackgroundLoad:
        spin = "while True: pass"
        for _ in range(self.processes):
            self._children.append(
                subprocess.Popen([sys.executable, "-c", spin], stdin=subprocess.DEVNULL)
            )
        return self

    def __exit__(self, *exc: object) -> None:
        for child in self._children:
            child.kill()
        for child in self._children:
            child.wait()


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def process_peak_rss_mb(pid: int) -> float:
    """Another process's peak resident memory (``VmHWM``), read while it still runs."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


async def run_design(args: argparse.Namespace) -> dict[str, Any]:
    """One design, in this process: load, warm up, serve every user's conversation."""
    if args.only == "remote":
        return await run_remote(args)
    from transformers.generation.streamers import BaseStreamer

    from bot.engine import (
        GenerationEngine,
        SamplingParams,
        load_model,
        run_in_own_thread,
        stop_token_ids,
    )
    from bot.engine.cpu_attention import decode_attention_for
    from dataset_tools.dialogue_format import render_prompt

    onednn = args.only == "engine" and args.cpu_onednn
    load = (str(args.model), args.device, args.dtype, args.quantize, onednn)
    if args.only == "engine":  # as the bot does (bot.app): see run_in_own_thread for why
        model, tokenizer = await run_in_own_thread(load_model, *load)
    else:  # the naive design loads where it runs its event loop, as it always did
        model, tokenizer = load_model(*load)
    reply = args.reply_tokens
    persona, messages, histories = conversations(
        tokenizer, args.users, args.turns, args.history, reply
    )
    params = SamplingParams(max_new_tokens=reply, min_new_tokens=reply)
    torch.manual_seed(1)
    tally = Tally(args.turns)
    stop_ids = stop_token_ids(tokenizer)

    class FirstToken(BaseStreamer):
        """Records when ``generate`` produces its first new token (its first ``put`` is the
        prompt)."""

        def __init__(self) -> None:
            self.calls, self.at = 0, 0.0

        def put(self, value: torch.Tensor) -> None:
            self.calls += 1
            if self.calls == 2:
                self.at = time.perf_counter()

        def end(self) -> None:
            pass

    def naive_generate(prompt: str, streamer: FirstToken) -> tuple[str, int]:
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        ids = ids.to(model.device)
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=True,
                temperature=params.temperature,
                top_p=params.top_p,
                top_k=params.top_k,
                repetition_penalty=params.repetition_penalty,
                max_new_tokens=reply,
                min_new_tokens=reply,
                eos_token_id=stop_ids,
                pad_token_id=tokenizer.pad_token_id,
                streamer=streamer,
            )
        new = out[0, ids.shape[1] :].tolist()
        return tokenizer.decode(new, skip_special_tokens=False), len(new)

    async def naive_user(index: int) -> None:
        from dataset_tools.dialogue_format import parse_reply

        loop = asyncio.get_running_loop()
        turns: list[str] = list(histories[index])  # re-encoded every turn anyway: nothing to warm
        for turn, message in enumerate(messages[index]):
            turns.append(message)
            streamer = FirstToken()
            started = time.perf_counter()
            text, count = await loop.run_in_executor(
                None, naive_generate, render_prompt(turns, persona), streamer
            )
            tally.record(turn, time.perf_counter() - started, streamer.at - started, count)
            turns.append(parse_reply(text, eos_token=tokenizer.eos_token) or "…")

    engine = None
    if args.only == "engine":
        engine = GenerationEngine(
            model,
            tokenizer,
            persona=persona,
            reply_tokens=reply,
            queue_size=args.users * 2,
            timeout_s=3600,
            max_batch=args.max_batch,
            cache_mb=args.cache_mb,
            threads=args.threads,
            prefill_chunk=args.prefill_chunk,
            attention=await run_in_own_thread(decode_attention_for, model, args.attention),
        )
        engine.start(warm_up=True)
        await engine.ready()
        wall = await converse(  # what the engine did for the earlier exchanges is left out
            engine,
            messages,
            params,
            tally,
            args.memory,
            args.recall_every,
            histories,
            engine.reset_counters,
        )
        if args.join_tokens:
            joining = await measure_join(engine, args.join_tokens, args.users - 1, 400)
    else:
        if args.threads:
            torch.set_num_threads(args.threads)
        naive_generate(render_prompt(["Привет"], persona), FirstToken())  # the same warm-up
        started = time.perf_counter()
        await asyncio.gather(*(naive_user(i) for i in range(args.users)))
        wall = time.perf_counter() - started
    result = tally.summary(wall)
    if engine is not None and args.join_tokens:
        result |= joining
    if engine is not None:
        engine.close()
        total = engine.prefilled_tokens + engine.reused_tokens
        result["prompt_tokens_reused"] = round(engine.reused_tokens / max(total, 1), 3)
        result["engine_busy_s"] = {k: round(v, 2) for k, v in engine.busy_s.items()}
        result["engine_steps"] = engine.steps
        result |= step_figures(engine.step_log)
        result["engine_threads"] = engine.worker_threads
        result["engine_thread_changes"] = engine.thread_tuner.changes if engine.thread_tuner else 0
        result["engine_openmp_stalls"] = engine.openmp_stalls
    return result


def step_figures(log: Any) -> dict[str, Any]:
    """The engine's decoding-only steps at the largest batch they reached (the "batch-N step" of
    the benchmark tables: N rows' next tokens, weights read once), and apart from them the steps
    that also encoded a prompt chunk, which take several times as long and would otherwise pass
    for slow decoding in the mean. ``decode_positions_mean``: the positions those decoding steps'
    rows attended over, summed over the rows: two designs' steps compare only at similar
    contexts (memory makes every prompt longer)."""
    decoding = [(rows, at, took) for rows, prompt, at, took in log if rows and not prompt]
    mixed = [took for rows, prompt, _, took in log if rows and prompt]
    figures: dict[str, Any] = {"mixed_steps": len(mixed)}
    if mixed:
        figures["mixed_step_mean_ms"] = round(1000 * statistics.mean(mixed), 1)
    if decoding:
        full = max(rows for rows, _, _ in decoding)
        steps = [(positions, took) for rows, positions, took in decoding if rows == full]
        times = sorted(took for _, took in steps)
        figures["decode_rows"] = full
        figures["decode_steps"] = len(times)
        figures["decode_step_p50_ms"] = round(1000 * statistics.median(times), 1)
        figures["decode_step_p90_ms"] = round(1000 * times[round(0.9 * (len(times) - 1))], 1)
        figures["decode_positions_mean"] = round(statistics.mean(p for p, _ in steps))
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bot.engine.bench", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument(
        "--history",
        type=int,
        default=0,
        help="earlier exchanges each user's conversation already holds when the timed turns "
        "begin (default 0: every conversation starts with the first turn)",
    )
    parser.add_argument("--reply-tokens", type=int, default=40)
    parser.add_argument("--max-batch", type=int, default=None, help="default: --users")
    parser.add_argument("--cache-mb", type=float, default=4096)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float32", choices=DTYPE_CHOICES)
    parser.add_argument("--quantize", default="none", choices=["none", "int8"])
    parser.add_argument(
        "--no-cpu-onednn",
        dest="cpu_onednn",
        action="store_false",
        help="the engine keeps PyTorch's default CPU GEMM (MODEL_CPU_ONEDNN=false)",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="the engine's threads (ENGINE_THREADS)"
    )
    parser.add_argument(
        "--attention",
        choices=["auto", "on", "off"],
        default="auto",
        help="the engine's compiled CPU decoding attention (CPU_ATTENTION_KERNEL)",
    )
    parser.add_argument(
        "--prefill-chunk",
        type=int,
        default=64,
        help="prompt tokens encoded per step while replies stream (PREFILL_CHUNK_TOKENS; 0: all)",
    )
    parser.add_argument(
        "--memory",
        choices=["end", "start", "facts"],
        help="add the user's facts and a recalled exchange to every prompt, placed as the bot "
        "does (end) or at the prompt's start (start), or the facts alone (facts); designs "
        "engine:memory=end|start|facts",
    )
    parser.add_argument(
        "--recall-every",
        type=int,
        default=1,
        metavar="N",
        help="memory designs recall an old exchange on every N-th turn (default 1: each turn)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        metavar="N",
        help="run the designs N times in turn (A B A B ...); each design's figures are those of "
        "its run with the median tokens/s",
    )
    parser.add_argument(
        "--join-tokens",
        type=int,
        default=0,
        metavar="N",
        help="after the conversations: users-1 replies stream while an N-token prompt joins; "
        "prints their token gaps before and while it joins",
    )
    parser.add_argument(
        "--background-load",
        type=int,
        default=0,
        metavar="N",
        help="N busy processes of the bench's own compete for the CPU throughout",
    )
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument(
        "--designs",
        default="naive,engine",
        help="naive, engine, remote, each optionally with :int8, :<dtype>, :threads=N "
        "(the naive one is slow at scale)",
    )
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)  # set for the children
    parser.add_argument("--only", choices=["naive", "engine", "remote"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.max_batch = args.max_batch or args.users
    cores = os.cpu_count() or 1
    if args.recall_every < 1 or args.repeat < 1:
        parser.error("--recall-every and --repeat must be at least 1")
    if args.history < 0:
        parser.error("--history must be 0 or more")
    if not 0 <= args.background_load <= 2 * cores:
        parser.error(f"--background-load must be 0..{2 * cores} (twice the cores)")
    try:
        designs = [(spec, *split_design(spec)) for spec in args.designs.split(",")]
    except ValueError as error:
        parser.error(str(error))

    if args.only:  # a child: one design, JSON on the last line
        print(json.dumps(asyncio.run(run_design(args))), flush=True)
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        print(f"building a random {args.shape} model ...", flush=True)
        build(args.shape, model_dir)
        results: dict[str, dict[str, Any]] = {}
        if args.background_load:
            print(f"{args.background_load} busy process(es) compete for {cores} cores", flush=True)
        runs: dict[str, list[dict[str, Any]]] = {}
        with BackgroundLoad(args.background_load):
            # In turn rather than each design's runs together: a machine that slows down for a
            # while then slows every design alike, not the one that happened to run then.
            for round_, (spec, name, options) in itertools.product(range(args.repeat), designs):
                count = f" (run {round_ + 1} of {args.repeat})" if args.repeat > 1 else ""
                print(f"{spec}: {args.users} users x {args.turns} turns{count} ...", flush=True)
                child = [sys.executable, "-m", "bot.engine.bench", *(argv or sys.argv[1:])]
                child += ["--model", str(model_dir), "--only", name, "--background-load", "0"]
                env = os.environ.copy()
                for option, value in options.items():
                    if option == "omp":  # read by OpenMP when torch loads: the child's own
                        env["OMP_WAIT_POLICY"] = value
                        env.pop("GOMP_SPINCOUNT", None)  # the bot's default would override it
                    elif option == "spin":
                        env["GOMP_SPINCOUNT"] = value
                    else:
                        child += [f"--{option}", value]
                done = subprocess.run(child, capture_output=True, text=True, env=env, check=False)
                if done.returncode != 0:
                    sys.stderr.write(done.stderr)
                    return done.returncode
                runs.setdefault(spec, []).append(json.loads(done.stdout.strip().splitlines()[-1]))
        for spec, tried in runs.items():
            by_speed = sorted(tried, key=lambda run: run["tokens_per_s"])
            results[spec] = by_speed[(len(by_speed) - 1) // 2]
            if len(tried) > 1:
                results[spec]["tokens_per_s_runs"] = [run["tokens_per_s"] for run in tried]
                if all("decode_step_p50_ms" in run for run in tried):
                    results[spec]["decode_step_p50_ms_runs"] = [
                        run["decode_step_p50_ms"] for run in tried
                    ]
    print_table(args, results)
    if args.json:
        from benchmarks.machine import describe_machine

        document = {
            "benchmark": "serving",
            "machine": describe_machine(),
            "settings": {
                "shape": args.shape,
                "users": args.users,
                "turns": args.turns,
                "reply_tokens": args.reply_tokens,
                "dtype": args.dtype,
                "quantize": args.quantize,
                "background_load": args.background_load,
                **({"recall_every": args.recall_every} if args.recall_every != 1 else {}),
                **({"history": args.history} if args.history else {}),
                **({"repeat": args.repeat} if args.repeat != 1 else {}),
            },
            "designs": results,
        }
        args.json.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    return 0


def print_table(args: argparse.Namespace, results: dict[str, dict[str, Any]]) -> None:
    """One column per design, then each design against the first one run (a ratio)."""
    names = list(results)
    base = names[0]
    print(
        f"\n{args.shape} shape, {args.users} users x {args.turns} turns"
        + (f" after {args.history} earlier exchanges" if args.history else "")
        + f", {args.reply_tokens}-token replies, {args.dtype}, quantize={args.quantize}"
        + (f", {args.background_load} busy process(es) beside it" if args.background_load else "")
    )
    rows = [
        ("wall time, s", "wall_s"),
        ("new tokens / s", "tokens_per_s"),
        ("turn latency p50, s", "p50_s"),
        ("turn latency p95, s", "p95_s"),
        ("first token p50, s", "first_token_p50_s"),
        ("peak RSS, MB", "peak_rss_mb"),
    ]
    ratios = [f"{name}/{base}" for name in names[1:]]
    # Columns as wide as their headings (design variants have long names), two spaces apart.
    widths = [max(10, len(n) + 2) for n in names]
    ratio_widths = [max(16, len(r) + 2) for r in ratios]
    print(
        f"{'':24}"
        + "".join(f"{n:>{w}}" for n, w in zip(names, widths, strict=True))
        + "".join(f"{r:>{w}}" for r, w in zip(ratios, ratio_widths, strict=True))
    )
    for label, key in rows:
        values = "".join(f"{results[n][key]:>{w}}" for n, w in zip(names, widths, strict=True))
        against = "".join(
            f"{results[n][key] / results[base][key]:>{w - 1}.2f}x"
            if results[base][key]
            else " " * w
            for n, w in zip(names[1:], ratio_widths, strict=True)
        )
        print(f"{label:24}{values}{against}")
    for name in names:
        if "tokens_per_s_runs" in results[name]:
            print(f"new tokens / s of each run, {name}: {results[name]['tokens_per_s_runs']}")
        print(f"mean latency per turn, {name}: {results[name]['turn_latency_s']}")
        if "prompt_tokens_reused" in results[name]:
            share = results[name]["prompt_tokens_reused"]
            print(f"prompt tokens served from the prefix cache, {name}: {share:.0%}")
    for name, result in results.items():
        if "join_wait_s" in result:
            print(
                f"{name}: a {result['join_prompt_tokens']}-token prompt joined "
                f"{args.users - 1} streaming replies in {result['join_wait_s']} s; their token "
                f"gap: {result['gap_before_p50_s']} s before (median), "
                f"{result['gap_during_p50_s']} s (median) and {result['gap_during_max_s']} s "
                "(longest) while it joined"
            )
        if "engine_steps" in result:
            steps, busy = result["engine_steps"], result["engine_busy_s"]
            step_ms = 1000 * busy["step"] / max(steps, 1)
            threads = result.get("engine_threads", "?")
            changes = result.get("engine_thread_changes", 0)
            stalls = result.get("engine_openmp_stalls", 0)
            print(
                f"{name} worker: {steps} steps ({step_ms:.0f} ms each), busy (s): {busy}, "
                f"threads at the end: {threads} ({changes} changes)"
                + (f", OpenMP stalls: {stalls} (bot.engine.openmp)" if stalls else "")
            )
        if "decode_steps" in result:
            mixed = result["mixed_steps"]
            print(
                f"{name} steps decoding {result['decode_rows']} rows and nothing else: "
                f"{result['decode_steps']}, median {result['decode_step_p50_ms']} ms (p90 "
                f"{result['decode_step_p90_ms']}) over {result['decode_positions_mean']} "
                "positions on average; steps that also encoded a prompt chunk: "
                + (f"{mixed}, mean {result['mixed_step_mean_ms']} ms" if mixed else "none")
            )
    if "remote" in results:
        client = results["remote"]["client_peak_rss_mb"]
        print(f"remote: peak RSS is the server's; the bot side's: {client} MB")


if __name__ == "__main__":
    sys.exit(main())
