"""The serving engine: batched decoding, per-row sampling and the per-dialogue prefix cache.

The reference for every greedy reply is Hugging Face's own ``model.generate`` on the same tokens,
so the slot decoder, the cache and the batching are checked against the library, not themselves.
"""

import asyncio
import shutil
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from bot.engine import GenerationEngine, RequestStats, SamplingParams, load_model
from bot.engine.decoder import SlotDecoder
from dataset_tools.dialogue_format import render_dialogue

GREEDY = SamplingParams(
    temperature=0.0, repetition_penalty=1.0, max_new_tokens=12, min_new_tokens=12
)
PERSONA = "Я бот."


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(str(tiny_model_dir))


@pytest.fixture(scope="module")
def chatty(chatty_model_dir):
    return load_model(str(chatty_model_dir))


def _engine(tiny, **kwargs) -> GenerationEngine:
    model, tokenizer = tiny
    return GenerationEngine(model, tokenizer, persona=PERSONA, **kwargs)


def reference(engine: GenerationEngine, prompt_ids: list[int], params: SamplingParams) -> list[int]:
    """Greedy tokens from ``model.generate`` (stop tokens removed, as the engine reports them)."""
    ids = torch.tensor([prompt_ids])
    with torch.inference_mode():
        out = engine.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            repetition_penalty=params.repetition_penalty,
            max_new_tokens=params.max_new_tokens,
            min_new_tokens=params.min_new_tokens,
            eos_token_id=engine._stop_ids,
            pad_token_id=engine.tokenizer.pad_token_id,
        )
    return [t for t in out[0, len(prompt_ids) :].tolist() if t not in engine._stop_ids]


def persona_tokens(engine: GenerationEngine) -> int:
    return engine.count_tokens(render_dialogue([], PERSONA, add_eos=False))


async def until(predicate, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    """Wait for a state of the engine (the very one the test relies on next)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting for the engine"
        await asyncio.sleep(0.001)


async def ask(engine, turns, params=GREEDY, key=None, on_text=None) -> tuple[str, RequestStats]:
    stats = RequestStats()
    reply = await engine.generate(turns, params, key=key, on_text=on_text, stats=stats)
    return reply, stats


DIALOGUES = [["Привет!"], ["Как дела?"], ["Что посмотреть вечером?"], ["Расскажи анекдот"]]


async def test_greedy_replies_match_generate_alone_and_inside_a_batch(tiny):
    engine = _engine(tiny)
    engine.start()
    try:
        alone = [await ask(engine, turns) for turns in DIALOGUES]
    finally:
        engine.close()
    batched_engine = _engine(tiny)  # queued first, then started: all four share every step
    tasks = [asyncio.create_task(ask(batched_engine, turns)) for turns in DIALOGUES]
    await until(lambda: batched_engine.queue_depth == len(DIALOGUES))
    batched_engine.start()
    try:
        together = await asyncio.gather(*tasks)
    finally:
        batched_engine.close()
    for (_, solo), (_, shared) in zip(alone, together, strict=True):
        assert shared.batch_rows == len(DIALOGUES)
        assert solo.prompt_ids == shared.prompt_ids
        assert solo.reply_ids == shared.reply_ids == reference(engine, solo.prompt_ids, GREEDY)
        assert solo.reply_ids  # something was generated, so the comparison means something


async def test_the_next_turn_reuses_the_cache_and_gives_the_same_greedy_reply(chatty):
    engine = _engine(chatty)
    engine.start()
    until_stop = SamplingParams(temperature=0.0, repetition_penalty=1.0, max_new_tokens=30)
    try:
        turns = ["Привет!"]
        first, first_stats = await ask(engine, turns, until_stop, key="alice")
        assert first == "Привет, как дела?"  # what it learned; it ended with a speaker tag
        assert "alice" in engine.prefix_cache
        turns += [first, "Хорошо, а у тебя?"]
        second, stats = await ask(engine, turns, until_stop, key="alice")
        assert second == "Отлично, спасибо."
        # Only the new message was encoded: the previous prompt and reply came from the cache.
        assert stats.reused_tokens == first_stats.prompt_tokens + len(first_stats.reply_ids)
        assert stats.reply_ids == reference(engine, stats.prompt_ids, until_stop)
        assert stats.prompt_ids[: first_stats.prompt_tokens] == first_stats.prompt_ids
        # The same prompt without the dialogue's cache (only the shared persona): the very same
        # tokens out.
        _, fresh = await ask(engine, turns, until_stop)
        assert fresh.reused_tokens == persona_tokens(engine)
        assert fresh.reply_ids == stats.reply_ids
    finally:
        engine.close()


async def test_forget_and_history_trimming_invalidate_the_cache(tiny):
    engine = _engine(tiny)
    engine.start()
    try:
        turns = ["Привет!"]
        reply, _ = await ask(engine, turns, key="bob")
        turns += [reply, "Второй вопрос"]
        reply, _ = await ask(engine, turns, key="bob")
        engine.forget("bob")  # what /reset and /forget do
        assert "bob" not in engine.prefix_cache
        _, after_reset = await ask(engine, turns, key="bob")
        assert after_reset.reused_tokens == persona_tokens(engine)  # shared by all dialogues

        # Trimming drops the first exchange: only the persona is still a common prefix.
        trimmed = turns[2:]
        _, stats = await ask(engine, trimmed, key="bob")
        # (+1: the tag that opens the next user turn is common to both prompts too)
        assert persona_tokens(engine) <= stats.reused_tokens <= persona_tokens(engine) + 1
        assert stats.reply_ids == reference(engine, stats.prompt_ids, GREEDY)
    finally:
        engine.close()


async def test_the_memory_budget_evicts_the_least_recently_used_dialogue(tiny):
    model, _ = tiny
    per_token = 2 * model.config.n_layer * model.config.n_embd * 4
    # Room for ~40 tokens: one dialogue's own (~25 here, past the shared persona), not two.
    engine = _engine(tiny, cache_mb=40 * per_token / 2**20)
    engine.start()
    try:
        _, first = await ask(engine, ["Первый пользователь"], key=1)
        assert 1 in engine.prefix_cache
        # The persona every dialogue starts with is kept once, by the engine: not counted here.
        own = first.prompt_tokens + len(first.reply_ids) - persona_tokens(engine)
        assert engine.prefix_cache.used_bytes <= own * per_token
        await ask(engine, ["Второй пользователь"], key=2)
        assert 2 in engine.prefix_cache and 1 not in engine.prefix_cache
        assert engine.prefix_cache.evictions == 1
        assert engine.prefix_cache.used_bytes <= engine.prefix_cache.budget_bytes
        _, stats = await ask(engine, ["Первый пользователь", "ответ", "ещё"], key=1)
        assert stats.reused_tokens == persona_tokens(engine)
    finally:
        engine.close()


async def test_each_row_keeps_its_own_temperature_inside_one_batch(tiny):
    engine = _engine(tiny, seed=0)
    cold = SamplingParams(
        temperature=1e-4,
        top_k=0,
        top_p=1.0,
        repetition_penalty=1.0,
        max_new_tokens=20,
        min_new_tokens=20,
    )
    hot = SamplingParams(
        temperature=3.0,
        top_k=0,
        top_p=1.0,
        repetition_penalty=1.0,
        max_new_tokens=20,
        min_new_tokens=20,
    )
    turns = ["Одинаковый вопрос"]
    tasks = [asyncio.create_task(ask(engine, turns, params)) for params in (cold, hot)]
    await until(lambda: engine.queue_depth == 2)
    engine.start()
    try:
        (_, cold_stats), (_, hot_stats) = await asyncio.gather(*tasks)
    finally:
        engine.close()
    assert cold_stats.batch_rows == hot_stats.batch_rows == 2
    assert cold_stats.reply_ids == reference(engine, cold_stats.prompt_ids, cold)
    assert len(hot_stats.reply_ids) == 20
    assert hot_stats.reply_ids != cold_stats.reply_ids


async def test_a_request_arriving_mid_batch_joins_and_is_answered(tiny):
    engine = _engine(tiny, reply_tokens=400)
    engine.start()
    try:
        long = SamplingParams(temperature=0.0, max_new_tokens=400, min_new_tokens=400)
        first = asyncio.create_task(ask(engine, ["Длинный ответ, пожалуйста"], long))
        while engine.active_rows == 0:
            await asyncio.sleep(0.001)
        _reply, stats = await ask(engine, ["Короткий вопрос"])
        assert not first.done()  # answered while the long one was still decoding
        assert stats.batch_rows == 2
        assert stats.reply_ids == reference(engine, stats.prompt_ids, GREEDY)
        _, long_stats = await first
        assert len(long_stats.reply_ids) == 400
    finally:
        engine.close()


def _prompt(engine: GenerationEngine, tokens: int, seed: int) -> list[int]:
    """``tokens`` token ids of ordinary text (no stop token), different for each seed."""
    words = [w for d in DIALOGUES for w in d[0].split()] * 400
    ids = engine.tokenizer(" ".join(words[seed:]), add_special_tokens=False)["input_ids"]
    return [t for t in ids if t not in engine._stop_ids][:tokens]


async def test_a_long_prompt_joins_in_chunks_while_a_reply_keeps_streaming(tiny):
    engine = _engine(tiny, prefill_chunk=16)
    engine.start()
    passes: list[list[tuple[int, int]]] = []  # per pass of the model: (slot, tokens) per row
    encode = engine.decoder.prefill_many

    def recording(rows, wanted=None):  # type: ignore[no-untyped-def]
        passes.append([(slot, len(ids)) for slot, ids, _ in rows])
        return encode(rows, wanted)

    engine.decoder.prefill_many = recording  # the real pass, its arguments written down
    first_prompt, shown = _prompt(engine, 20, 0), [""]
    try:
        # Far longer than the long prompt's ~38 chunks take, however late this coroutine gets
        # to send it on a busy machine; stopped once the long prompt has its reply.
        streaming = SamplingParams(temperature=0.0, max_new_tokens=900, min_new_tokens=900)
        first = asyncio.create_task(
            engine.complete(first_prompt, streaming, stop_token_ids=[], on_text=shown.append)
        )
        await until(lambda: engine.active_rows == 1)
        passes.clear()
        long_prompt = _prompt(engine, 600, 1)
        params = replace(GREEDY, max_new_tokens=8, min_new_tokens=8)
        stats = RequestStats()
        joined = await engine.complete(long_prompt, params, stop_token_ids=[], stats=stats)
        assert not first.done()  # the first reply was still streaming when the long one ended
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
    finally:
        engine.close()
    # Every pass that encoded part of the long prompt also gave the streaming row its next token
    # (a row of one token in slot 0), and encoded at most the chunk.
    chunks = [[n for slot, n in rows if slot != 0] for rows in passes]
    encoding = [rows for rows, chunk in zip(passes, chunks, strict=True) if chunk]
    assert sum(sum(chunk) for chunk in chunks) == len(long_prompt)
    assert len(encoding) >= len(long_prompt) // 16
    assert all((0, 1) in rows and sum(n for _, n in rows) <= 16 + 1 for rows in encoding)
    # Encoding in chunks changes nothing in either reply (the first one: as far as it streamed).
    assert joined.token_ids == reference(engine, long_prompt, params)
    expected = reference(
        engine, first_prompt, replace(streaming, max_new_tokens=120, min_new_tokens=120)
    )
    expected_text = engine.tokenizer.decode(expected)
    assert len(shown[-1]) > 20
    assert expected_text.startswith(shown[-1]) or shown[-1].startswith(expected_text)
    assert stats.batch_rows == 2


async def test_prompts_joining_and_leaving_in_any_order_keep_their_own_rows(tiny):
    """Rows finish while prompts are still being encoded and prompts finish encoding out of
    arrival order: each reply must still be the one its own prompt gives alone."""
    engine = _engine(tiny, reply_tokens=60, max_batch=4, prefill_chunk=24)
    engine.start()
    shapes = [(300, 5), (40, 30), (250, 8), (10, 40), (120, 3), (500, 10), (60, 20), (5, 2)]
    try:

        async def one(index: int, tokens: int, new: int) -> tuple[list[int], list[int]]:
            await asyncio.sleep(0.01 * index)
            ids = _prompt(engine, tokens, index)
            params = replace(GREEDY, max_new_tokens=new, min_new_tokens=new)
            done = await engine.complete(ids, params, stop_token_ids=[])
            return done.token_ids, reference(engine, ids, params)

        results = await asyncio.gather(*(one(i, *shape) for i, shape in enumerate(shapes)))
    finally:
        engine.close()
    for got, expected in results:
        assert got == expected


async def test_streaming_sends_growing_text_that_ends_in_the_reply(chatty):
    engine = _engine(chatty)
    engine.start()
    seen: list[str] = []
    try:
        params = SamplingParams(temperature=0.0, max_new_tokens=30)
        # The worker schedules each on_text before it settles the reply, on the same loop:
        # every callback has run by the time the reply is returned.
        reply, _ = await ask(engine, ["Привет!"], params, on_text=seen.append)
    finally:
        engine.close()
    assert len(seen) > 1
    assert all(reply.startswith(text) for text in seen)
    assert seen[-1] == reply == "Привет, как дела?"


async def test_beam_search_is_served_apart_and_matches_generate(tiny):
    engine = _engine(tiny)
    engine.start()
    try:
        params = SamplingParams(
            temperature=0.0, repetition_penalty=1.0, max_new_tokens=10, num_beams=3
        )
        _, stats = await ask(engine, ["Привет!"], params)
    finally:
        engine.close()
    ids = torch.tensor([stats.prompt_ids])
    out = engine.model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        num_beams=3,
        do_sample=False,
        max_new_tokens=10,
        eos_token_id=engine._stop_ids,
        pad_token_id=engine.tokenizer.pad_token_id,
    )
    expected = [t for t in out[0, ids.shape[1] :].tolist() if t not in engine._stop_ids]
    assert stats.reply_ids == expected


def test_the_slot_cache_grows_without_losing_rows(tiny):
    """Regression: asking for longer rows after the slots had grown used to shrink the slots
    (a crash as 32 users' second turns arrived on the GPU)."""
    model, _ = tiny
    decoder = SlotDecoder(model, 1024, initial_capacity=16)
    with torch.inference_mode():
        decoder.reserve(1, 10)
        decoder.prefill(0, list(range(5, 15)), 0)
        decoder.reserve(20, 10)
        decoder.prefill(19, list(range(20, 30)), 0)
        before = [decoder.save_slot(slot, 0, 10) for slot in (0, 19)]
        decoder.reserve(2, 200)  # longer rows, and far fewer slots than it has
    assert decoder.slots >= 20 and decoder.capacity >= 200
    for slot, saved in zip((0, 19), before, strict=True):
        assert torch.equal(decoder.save_slot(slot, 0, 10), saved)


def test_rows_moved_and_swapped_keep_their_keys_when_the_cache_grows(tiny):
    """Growing copies only the positions each slot holds (the rest of a CPU cache is never
    written): after rows moved and swapped slots, each row's keys/values survive the copy."""
    model, _ = tiny
    decoder = SlotDecoder(model, 1024, initial_capacity=16)
    with torch.inference_mode():
        decoder.reserve(4, 16)
        for slot, length in enumerate((5, 12, 9)):
            decoder.prefill(slot, list(range(30 + slot, 30 + slot + length)), 0)
        rows = [decoder.save_slot(slot, 0, n) for slot, n in enumerate((5, 12, 9))]
        decoder.swap_slots(0, 1, 5, 12)  # the 12-position row now in the slot that held 5
        decoder.move_slot(2, 3, 9)  # into a slot nothing was written to
        decoder.reserve(5, 300)
        assert decoder.capacity >= 300
        assert torch.equal(decoder.save_slot(0, 0, 12), rows[1])
        assert torch.equal(decoder.save_slot(1, 0, 5), rows[0])
        assert torch.equal(decoder.save_slot(3, 0, 9), rows[2])


def test_both_ways_of_reading_the_slots_give_the_same_logits(tiny):
    """Rows of very different lengths: attention over each row's exact positions (the CPU's
    way, over an uninitialised cache) equals one masked call over zero-padded slots (the GPU's
    way), for decoding steps and for a pass that also encodes a prompt's chunk."""
    model, _ = tiny
    lengths = [3, 70, 9, 140]
    results = []
    for exact in (True, False):
        decoder = SlotDecoder(model, 1024, initial_capacity=16)
        decoder.exact_keys = exact
        torch.manual_seed(0)
        with torch.inference_mode():
            decoder.reserve(5, max(lengths) + 4)
            for slot, length in enumerate(lengths):
                decoder.prefill(slot, torch.randint(5, 200, (length,)).tolist(), 0)
            steps = [decoder.decode(torch.tensor([7, 8, 9, 10]), torch.tensor(lengths))]
            ends = [n + 1 for n in lengths]
            steps.append(decoder.decode(torch.tensor([11, 12, 13, 14]), torch.tensor(ends)))
            mixed = [(slot, [15 + slot], n + 1) for slot, n in enumerate(ends)]
            steps.append(decoder.prefill_many([*mixed, (4, list(range(20, 45)), 0)]))
        results.append(steps)
    assert not decoder.exact_keys and decoder.cache[:, :, 0, :, 200:].abs().sum() == 0
    for exact_step, padded_step in zip(*results, strict=True):
        assert torch.isfinite(exact_step).all()
        torch.testing.assert_close(exact_step, padded_step, rtol=1e-5, atol=1e-5)


async def test_onednn_projections_give_the_same_greedy_replies(tiny_model_dir, tiny):
    """MODEL_CPU_ONEDNN: a kernel choice, not a different model."""
    fast = _engine(load_model(str(tiny_model_dir), "cpu", "float32", "none", cpu_onednn=True))
    assert "OneDNN" in type(fast.model.transformer.h[0].attn.c_attn).__name__
    assert isinstance(fast.model.transformer.h[0].mlp.act, torch.nn.Identity)  # GELU fused
    plain = _engine(tiny)
    fast.start()
    try:
        for turns in DIALOGUES:
            _, stats = await ask(fast, turns)
            assert stats.reply_ids == reference(plain, stats.prompt_ids, GREEDY)
    finally:
        fast.close()


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads Linux's /proc")
def test_onednn_model_does_not_keep_the_checkpoint_mapped(tiny_model_dir, tmp_path):
    """Every page of the memory-mapped checkpoint that the conversion read stays resident while
    any tensor still views it (a bias did): the medium model took 3.5 GB instead of 2.0."""
    own_copy = shutil.copytree(tiny_model_dir, tmp_path / "model")  # no other test maps it
    model, _ = load_model(str(own_copy), "cpu", "float32", "none", cpu_onednn=True)
    checkpoint = str((own_copy / "model.safetensors").resolve())
    maps = Path("/proc/self/maps").read_text().splitlines()
    assert model is not None
    assert [line for line in maps if checkpoint in line] == []
