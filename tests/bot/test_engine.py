"""The generation engine: worker thread, bounded queue, timeouts, clean replies."""

import asyncio
import threading

import pytest

from bot.engine import (
    EngineBusy,
    EngineTimeout,
    GenerationEngine,
    SamplingParams,
    load_model,
    run_in_own_thread,
)


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
    while engine.queue_depth < 1:  # the first request has taken the only place
        await asyncio.sleep(0.001)
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


async def test_the_model_runs_only_in_the_worker_thread_warm_up_included(tiny):
    """The event loop's thread never runs the model (a second OpenMP team would slow every
    step of the worker's), and the warm-up happens before ``ready`` returns."""
    model, _ = tiny
    threads: set[str] = set()
    hook = model.transformer.h[0].attn.c_attn.register_forward_pre_hook(
        lambda *_: threads.add(threading.current_thread().name)
    )
    engine = _engine(tiny)
    try:
        engine.start(warm_up=True)
        await engine.ready()
        assert threads == {"generation"}  # warmed up, by the worker
        assert engine.replies == 0  # the warm-up is not counted as served
        await engine.generate(["Привет!"], SamplingParams(max_new_tokens=5))
        assert threads == {"generation"}
        assert engine.replies == 1
    finally:
        hook.remove()
        engine.close()


async def test_a_failed_warm_up_is_reported_by_ready(tiny):
    engine = _engine(tiny)

    def out_of_memory(*_):
        raise RuntimeError("not enough memory")

    assert engine.decoder is not None
    engine.decoder.prefill_many = out_of_memory  # type: ignore[method-assign]
    engine.start(warm_up=True)
    try:
        with pytest.raises(RuntimeError, match="not enough memory"):
            await engine.ready()
    finally:
        engine.close()


async def test_run_in_own_thread_returns_raises_and_leaves_no_thread():
    before = threading.active_count()
    assert await run_in_own_thread(sum, [1, 2, 3]) == 6
    with pytest.raises(ZeroDivisionError):
        await run_in_own_thread(divmod, 1, 0)
    assert threading.active_count() == before  # each call's thread has ended


async def test_a_model_never_tuned_on_the_dialogue_format_is_named_at_start(
    tiny_model_dir, tmp_path, caplog
):
    """Pointing MODEL_PATH at a base model (RuGPT-3 as downloaded) gave replies that ran on,
    speaking for both sides, and nothing said why. Now one warning at start says so; a model
    the trainer made starts without it."""
    import logging

    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from bot.config import Settings
    from bot.engine.factory import open_local_engine
    from dataset_tools.sample_data import generate_dialogues
    from trainer.modeling import build_scratch_model

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    texts = (" ".join(dialogue) for dialogue in generate_dialogues())  # no tags: a base model
    bpe.train_from_iterator(
        texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"])
    )
    base_tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")
    torch.manual_seed(0)
    base = build_scratch_model(base_tokenizer, {"n_layer": 1, "n_embd": 32, "n_head": 2})
    base_dir = tmp_path / "base-model"
    base.save_pretrained(base_dir)
    base_tokenizer.save_pretrained(base_dir)

    for model_dir, warned in ((base_dir, True), (tiny_model_dir, False)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="bot.engine.factory"):
            engine = await open_local_engine(Settings(_env_file=None, model_path=str(model_dir)))
        engine.close()
        lines = [r.getMessage() for r in caplog.records if "not fine-tuned" in r.getMessage()]
        assert len(lines) == warned, lines
        if warned:
            assert f"MODEL_PATH={model_dir}" in lines[0] and "@@ПЕРВЫЙ@@" in lines[0]
