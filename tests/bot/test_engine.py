"""The generation engine: worker thread, bounded queue, timeouts, clean replies."""

import asyncio

import pytest

from bot.engine import EngineBusy, EngineTimeout, GenerationEngine, SamplingParams, load_model


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(str(tiny_model_dir))


def _engine(tiny, **kwargs) -> GenerationEngine:
    model, tokenizer = tiny
    return GenerationEngine(model, tokenizer, persona="Я бот.", **kwargs)


async def test_reply_is_a_clean_string_and_the_event_loop_stays_free(tiny):
    engine = _engine(tiny)
    engine.start()
    try:
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.001)
                ticks += 1

        task = asyncio.create_task(ticker())
        reply = await engine.generate(["Привет!"], SamplingParams(max_new_tokens=30))
        task.cancel()
        assert isinstance(reply, str) and "@@" not in reply
        assert ticks > 3  # the loop kept running while the model worked
    finally:
        engine.close()


async def test_full_queue_answers_busy_at_once(tiny):
    engine = _engine(tiny, queue_size=1)  # worker not started: nothing drains the queue
    first = asyncio.create_task(engine.generate(["раз"], SamplingParams()))
    await asyncio.sleep(0.01)
    with pytest.raises(EngineBusy):
        await engine.generate(["два"], SamplingParams())
    first.cancel()
    engine.close()


async def test_a_request_that_takes_too_long_times_out(tiny):
    engine = _engine(tiny, timeout_s=0.05)  # never started: it can only time out
    with pytest.raises(EngineTimeout):
        await engine.generate(["раз"], SamplingParams())
    engine.close()


def test_prompt_budget_leaves_room_for_the_reply(tiny):
    engine = _engine(tiny, context_tokens=100, reply_tokens=30)
    assert engine.prompt_budget == 70
    assert _engine(tiny, context_tokens=10_000).context_tokens == 1024  # capped by the model
