"""A multi-threaded torch operation outside the engine's worker no longer slows decoding for good
(bot.engine.openmp): the worker notices its threads sleeping between products, says so, and the
event loop's thread frees the OpenMP pool that caused it.

The watch is given per-step context switches as the worker measures them; the engine test runs
the real worker (in a process of its own) on a small random model, with a real matrix product in
the event loop's thread.
"""

import asyncio
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

from bot.engine import GenerationEngine, SamplingParams, load_model, run_in_own_thread
from bot.engine.cpu_attention import decode_attention_for
from bot.engine.openmp import StallWatch, context_switches, release_thread_pool
from tests.conftest import CHATTY_PERSONA


def test_a_stall_is_reported_once_per_episode_and_single_thread_steps_say_nothing():
    watch = StallWatch(layers=24, window=4)
    assert not any(watch.step(0, 0, threads=2) for _ in range(8))  # a healthy worker
    assert not any(watch.step(110, 0, threads=1) for _ in range(8))  # no team: not counted
    verdicts = [watch.step(110, 0, threads=2) for _ in range(8)]
    # the window's mean: 27.5, then 55 (>= 48 switches, two a layer): reported once
    assert verdicts == [False, True, False, False, False, False, False, False]
    assert watch.stalled and watch.episodes == 1 and watch.mean == 110
    watch.restart()  # after a cure, only new steps count
    for _ in range(3):
        watch.step(0, 0, threads=2)
        assert watch.stalled  # a few quiet steps are not yet a recovery
    watch.step(0, 0, threads=2)  # a full window of them is
    assert not watch.stalled
    assert [watch.step(110, 0, threads=2) for _ in range(4)] == [False, True, False, False]
    assert watch.episodes == 2


def test_a_busy_neighbour_level_of_switches_is_not_a_stall():
    watch = StallWatch(layers=4, window=16)
    assert not any(watch.step(6, 2, threads=2) for _ in range(64))  # 1.5 a layer: below the line


def test_sleeps_that_come_with_preemptions_are_told_apart():
    """Measured on the medium shape, 8 users: one busy process beside the engine, 117 voluntary
    and 65 involuntary switches a step; another thread's pool on idle cores, 161 and 0.5."""
    busy, pool = StallWatch(layers=24, window=16), StallWatch(layers=24, window=16)
    assert sum(busy.step(117, 65, threads=2) for _ in range(64)) == 1
    assert sum(pool.step(161, 0, threads=2) for _ in range(64)) == 1
    assert busy.busy_machine and not pool.busy_machine
    assert not StallWatch(layers=24).busy_machine  # nothing seen yet


def test_a_busy_machine_is_named_as_the_likely_cause(tiny_model_dir, caplog, monkeypatch):
    """The warning once blamed another thread's OpenMP pool for every episode, sending the
    operator of a shared CPU after a thread that was not there."""
    model, tokenizer = load_model(str(tiny_model_dir), "cpu", "float32", "none")
    engine = GenerationEngine(model, tokenizer, persona=CHATTY_PERSONA)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # a two-thread team's steps
    threshold = int(engine.stall_watch.threshold)
    with caplog.at_level(logging.WARNING, logger="bot.engine.generation"):
        for _ in range(16):
            engine._watch_stalls(threshold * 2, threshold, [])
    (warning,) = [r.getMessage() for r in caplog.records if "sleeping OpenMP" in r.getMessage()]
    assert "most likely other processes take the cores" in warning
    assert engine.openmp_stalls == 1


def test_the_calling_thread_can_free_its_pool():
    if context_switches() is None:
        pytest.skip("no per-thread context switch counts on this platform")
    torch.randn(300, 300) @ torch.randn(300, 300)
    assert release_thread_pool()  # PyTorch's Linux wheels run on libgomp
    assert release_thread_pool()  # nothing left to free is no error


@pytest.fixture(scope="module")
def wide_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """Random weights, 4 layers 256 wide: enough products a step for the slowdown to show
    plainly (5 to 21 switches a step measured; the 64-wide tiny model shows 1 or 2)."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = GPT2Config(
        n_layer=4,
        n_embd=256,
        n_head=4,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("wide-model")
    GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs two cores for a two-thread team")
def test_a_parallel_operation_in_the_event_loop_is_noticed_and_its_pool_freed(wide_model_dir):
    """In a process of its own, as the bot runs the engine: inside the full suite the same
    scenario once counted only 4.7 switches a step after the product (no stall reported, 8 being
    the line for 4 layers), from a process state this test does not control; alone, 15 to 21."""
    # The stall shows as sleeping threads, which only a core free for the team can show: with
    # the other test worker's load on the second core the product once left 6.7 switches a
    # step (8 is the line), and beside two busy processes (make test-stress) the cured steps
    # once still slept 10 a step, the machine's doing, not the pool's. So the scenario gets
    # three tries to be seen, noticed and cured, on a core free for it.
    tries = []
    for _ in range(3):
        done = subprocess.run(
            [sys.executable, "-m", "tests.bot.test_openmp", str(wide_model_dir)],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        result = json.loads(done.stdout.strip().splitlines()[-1])
        tries.append(result)
        if result["noticed"] and not result["still_stalled"]:
            break
    # A busy machine may add an episode of its own; the one the product caused comes first.
    assert result["noticed"] >= 1, tries
    assert "sleeping OpenMP threads" in done.stderr and "run_in_own_thread" in done.stderr
    assert not result["still_stalled"], tries  # cured: the steps stopped sleeping


async def _scenario(model_dir: str) -> dict[str, object]:
    """The bot's engine on ``model_dir``; a two-thread product in the event loop's thread after
    it started; replies until the worker notices, then until the loop's freed pool shows."""
    model, tokenizer, attention = await load_as_the_bot_does(model_dir)
    engine = GenerationEngine(
        model, tokenizer, persona=CHATTY_PERSONA, threads=2, attention=attention
    )
    params = SamplingParams(temperature=0.0, max_new_tokens=48, min_new_tokens=48)
    prompt = f"{CHATTY_PERSONA}\nПривет! Как дела?"
    engine.start()
    try:
        await engine.complete(prompt, params, stop_token_ids=[])
        before = engine.stall_watch.mean
        torch.set_num_threads(2)
        torch.randn(600, 600) @ torch.randn(600, 600)  # this thread now keeps an OpenMP pool
        for _ in range(40):  # until the worker has seen enough slow steps (a few replies)
            await engine.complete(prompt, params, stop_token_ids=[])
            if engine.openmp_stalls:
                break
        noticed = engine.openmp_stalls
        for _ in range(40):  # the loop's thread has freed its pool: steps stop sleeping
            await engine.complete(prompt, params, stop_token_ids=[])
            if not engine.stall_watch.stalled:
                break
        return {
            "mean_before": before,
            "noticed": noticed,
            "still_stalled": engine.stall_watch.stalled,
            "mean_after": engine.stall_watch.mean,
        }
    finally:
        engine.close()


async def load_as_the_bot_does(path: str):
    """The model with oneDNN projections and the attention kernel, loaded in a thread that exits
    (``bot.engine.factory``), so that loading leaves this thread no OpenMP pool."""
    model, tokenizer = await run_in_own_thread(load_model, path, "cpu", "float32", "none", True)
    return model, tokenizer, await run_in_own_thread(decode_attention_for, model, "auto")


if __name__ == "__main__":  # the engine test's own process
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    print(json.dumps(asyncio.run(_scenario(sys.argv[1]))))
