"""The engine's thread count follows its measured steps (bot.engine.threads).

The tuner is given step durations as a machine would report them; the clock is a plain counter
so that "later" needs no sleeping. The engine test runs the real worker on the trained tiny
model with trials forced at every request.
"""

import asyncio

import torch

from bot.engine import GenerationEngine, SamplingParams, load_model
from bot.engine.threads import STEPS_PER_CANDIDATE, ThreadTuner
from tests.conftest import CHATTY_PERSONA


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _run_trial(tuner: ThreadTuner, step_ms: dict[int, float], shape: int = 8) -> list[int]:
    """Decoding steps of one unchanged batch until the trial ends; the counts they ran with."""
    used = [tuner.threads_for(shape)]
    tuner.step_took(step_ms[used[-1]] / 1e3)
    while tuner.trying:
        used.append(tuner.threads_for(shape))
        tuner.step_took(step_ms[used[-1]] / 1e3)
    return used


def test_shared_cores_make_it_drop_to_one_thread_and_idle_ones_bring_two_back():
    clock = Clock()
    tuner = ThreadTuner(2, first_trial_s=2.0, clock=clock)
    assert tuner.candidates == [2, 1] and tuner.current == 2
    assert tuner.threads_for(8) == 2 and not tuner.trying  # no trial before the first is due
    clock.now = 2.0
    shared = {2: 133.0, 1: 66.0}  # another program holds a core: two threads collide
    used = _run_trial(tuner, shared)
    assert sorted(used) == [1] * STEPS_PER_CANDIDATE + [2] * STEPS_PER_CANDIDATE
    assert tuner.current == 2 and tuner.trying is False  # one trial proposes, ...
    _run_trial(tuner, shared)  # ... the next, at once (no clock change), confirms
    assert tuner.current == 1 and tuner.changes == 1 and tuner.trials == 2
    assert tuner.threads_for(8) == 1  # what the following steps run with

    clock.now += 2.0  # a change is checked again soon; the cores are idle again
    idle = {2: 45.0, 1: 82.0}
    _run_trial(tuner, idle)
    _run_trial(tuner, idle)
    assert tuner.current == 2 and tuner.changes == 2


def test_one_trial_misled_by_noise_changes_nothing():
    clock = Clock()
    tuner = ThreadTuner(2, first_trial_s=2.0, clock=clock)
    clock.now = 2.0
    _run_trial(tuner, {2: 60.0, 1: 45.0})  # a burst of memory traffic during the two-thread steps
    _run_trial(tuner, {2: 36.0, 1: 62.0})  # the repeat, at once, in quieter conditions
    assert tuner.current == 2 and tuner.changes == 0 and tuner.trials == 2
    assert tuner.threads_for(8) == 2 and not tuner.trying  # and no third trial straight away


def test_a_choice_that_holds_is_checked_less_and_less_often():
    clock = Clock()
    tuner = ThreadTuner(2, first_trial_s=2.0, longest_wait_s=10.0, clock=clock)
    idle = {2: 45.0, 1: 82.0}
    waits = []
    for _ in range(5):
        before = clock.now
        while not tuner.trying:  # steps go by until a trial starts
            clock.now += 0.5
            tuner.threads_for(8)
            if not tuner.trying:
                tuner.step_took(0.045)
        tuner.step_took(0.045)
        _run_trial(tuner, idle)
        waits.append(clock.now - before)
    assert waits == [2.0, 4.0, 8.0, 10.0, 10.0]
    assert tuner.current == 2 and tuner.changes == 0 and tuner.trials == 5


def test_a_gain_within_the_noise_changes_nothing():
    tuner = ThreadTuner(2, first_trial_s=0.0, clock=Clock())
    _run_trial(tuner, {2: 50.0, 1: 47.0})  # 6% faster: not the 10% a change needs
    assert tuner.current == 2 and tuner.trials == 1


def test_a_trial_whose_batch_changes_is_dropped():
    clock = Clock()
    tuner = ThreadTuner(2, first_trial_s=0.0, clock=clock)
    counts = [tuner.threads_for(8)]
    tuner.step_took(0.133 if counts[-1] == 2 else 0.066)
    assert tuner.trying
    assert tuner.threads_for(7) == 2  # a row finished: the timings would not compare
    assert not tuner.trying and tuner.trials == 0 and tuner.current == 2
    # a prompt's chunk riding along a step drops a trial too
    clock.now += 1.0
    tuner.threads_for(7)
    tuner.step_took(0.1)
    tuner.other_step()
    assert not tuner.trying and tuner.trials == 0


def test_more_cores_also_try_half_of_them():
    assert ThreadTuner(16).candidates == [16, 8, 1]
    assert ThreadTuner(3).candidates == [3, 1]


async def _greedy(engine: GenerationEngine, prompts: list[str]) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, repetition_penalty=1.0, max_new_tokens=12)
    replies = []
    for prompt in prompts:
        if engine.thread_tuner is not None:
            engine.thread_tuner.try_soon()  # every reply's steps switch thread counts
        done = await engine.complete(prompt, params, stop_token_ids=[])
        replies.append(done.token_ids)
    return replies


def test_the_engine_switching_threads_replies_as_with_a_fixed_count(chatty_model_dir):
    model, tokenizer = load_model(str(chatty_model_dir))
    prompts = ["Привет! Как дела?", "Что делаешь?", "Расскажи что-нибудь"]
    prompts = [f"{CHATTY_PERSONA}\n{p}" for p in prompts]
    threads_before = torch.get_num_threads()
    results = {}
    for threads in (1, None):  # ENGINE_THREADS=1, then the tuner (on this multi-core CPU)
        engine = GenerationEngine(model, tokenizer, persona=CHATTY_PERSONA, threads=threads)
        engine.start()
        try:
            results[threads] = asyncio.run(_greedy(engine, prompts))
            tuner = engine.thread_tuner
        finally:
            engine.close()
        torch.set_num_threads(threads_before)
    assert results[None] == results[1]
    if threads_before > 1:
        assert tuner is not None and tuner.trials >= len(prompts)
