"""The compiled CPU decoding attention (bot.engine.cpu_attention) against PyTorch's attention.

The reference is ``scaled_dot_product_attention`` over the same positions, and for whole
replies Hugging Face's ``model.generate``: the kernel is checked against the library, not
itself. Skipped where the kernel cannot be had (a CPU without AVX2, no compiler), with the
reason; the engine then runs PyTorch's attention, which the rest of the suite covers. The
kernel's own tests run both builds an AVX-512 CPU can run: this CPU's (``native``) and the
AVX2 one (``x86-64-v3``), as an AVX2-only CPU builds it.
"""

import asyncio
import logging

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from bot.config import Settings
from bot.engine import GenerationEngine, cpu_attention, load_model
from bot.engine.cpu_attention import KernelUnavailable, decode_attention_for
from bot.engine.decoder import SlotDecoder
from tests.bot.test_batching import DIALOGUES, GREEDY, PERSONA, ask, persona_tokens, reference

REASON = cpu_attention.unavailable_reason()


@pytest.fixture(scope="module")
def kernel():
    if REASON is not None:
        pytest.skip(f"no CPU attention kernel: {REASON}")
    return cpu_attention.load()


@pytest.fixture(scope="module", params=["native", "x86-64-v3"])
def any_build(request, kernel):
    """The kernel as built for this CPU, then as built for AVX2 (8-lane vectors)."""
    if request.param == "native":
        return kernel
    try:
        return cpu_attention.load(request.param)
    except KernelUnavailable as error:  # a compiler too old for the name; native still runs
        pytest.skip(f"no {request.param} build here: {error}")


def _expected(queries, keys, values, slots, ends, scale, starts=None, prefixes=None, layer=0):
    """PyTorch's attention, one row at a time, in float32, over each row's prefix chunks (if
    any) and then its slot."""
    rows = []
    for row, (slot, end) in enumerate(zip(slots, ends, strict=True)):
        start = starts[row] if starts else 0
        chunks = prefixes[row] if prefixes else []
        own = slice(0, end - start)  # the slot holds position p at index p - start
        row_keys = torch.cat([c[layer, 0] for c in chunks] + [keys[slot, :, own]], dim=1)
        row_values = torch.cat([c[layer, 1] for c in chunks] + [values[slot, :, own]], dim=1)
        rows.append(
            F.scaled_dot_product_attention(
                queries[row : row + 1, :, None].float(),
                row_keys[None].float(),
                row_values[None].float(),
                scale=scale,
            )[:, :, 0]
        )
    return torch.cat(rows)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [8, 12, 16, 64, 80])
def test_the_kernel_attends_as_pytorch_does_and_stores_the_new_keys(any_build, dtype, head_dim):
    """Rows of lengths around the kernel's 16-position blocks, in slots out of order, heads of
    the vectorised widths (8 and 16 lanes), multiples of them, and not a multiple of them (12;
    8 with AVX-512: the scalar path)."""
    torch.manual_seed(head_dim)
    slots_total, heads, capacity = 6, 3, 80
    keys = torch.randn(slots_total, heads, capacity, head_dim).to(dtype)
    values = torch.randn(slots_total, heads, capacity, head_dim).to(dtype)
    slots, ends = [4, 0, 2, 5, 1], [1, 16, 17, 33, 80]
    new = [torch.randn(len(slots), heads, head_dim).to(dtype) for _ in range(3)]
    queries, new_keys, new_values = new
    expected_keys, expected_values = keys.clone(), values.clone()
    for row, (slot, end) in enumerate(zip(slots, ends, strict=True)):
        expected_keys[slot, :, end - 1] = new_keys[row]
        expected_values[slot, :, end - 1] = new_values[row]
    scale = head_dim**-0.5
    starts, none = [0] * len(slots), [[] for _ in slots]
    got = any_build(
        queries, new_keys, new_values, keys, values, slots, starts, ends, none, 0, scale
    )
    assert torch.equal(keys, expected_keys) and torch.equal(values, expected_values)
    assert got.dtype == torch.float32 and got.shape == (len(slots), heads, head_dim)
    wanted = _expected(queries, keys, values, slots, ends, scale)
    torch.testing.assert_close(got, wanted, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_kernel_reads_a_rows_prefix_where_the_prefix_cache_keeps_it(any_build, dtype):
    """A row's first positions in chunks of another tensor (as a cached dialogue keeps them,
    one per turn, all layers), the rest at the start of its slot: the same attention as over
    one tensor."""
    torch.manual_seed(1)
    layers, heads, dim, capacity = 3, 2, 32, 64
    keys = torch.zeros(4, heads, capacity, dim, dtype=dtype)
    values = torch.zeros(4, heads, capacity, dim, dtype=dtype)
    keys[:, :, :, :] = torch.randn(4, heads, capacity, dim).to(dtype)
    values[:, :, :, :] = torch.randn(4, heads, capacity, dim).to(dtype)
    chunk = lambda n: torch.randn(layers, 2, heads, n, dim).to(dtype)  # noqa: E731
    prefixes = [[chunk(5), chunk(17)], [], [chunk(40)]]
    starts = [22, 0, 40]
    slots, ends = [3, 0, 1], [30, 9, 41]
    queries, new_keys, new_values = (torch.randn(3, heads, dim).to(dtype) for _ in range(3))
    got = any_build(
        queries, new_keys, new_values, keys, values, slots, starts, ends, prefixes, 2, 0.2
    )
    assert torch.equal(keys[3, :, 7], new_keys[0])  # position 29, after 22 in the prefix
    assert torch.equal(keys[1, :, 0], new_keys[2])
    wanted = _expected(queries, keys, values, slots, ends, 0.2, starts, prefixes, layer=2)
    torch.testing.assert_close(got, wanted, rtol=1e-5, atol=1e-5)


def test_the_kernel_refuses_what_it_cannot_read(kernel):
    keys = torch.zeros(2, 2, 8, 16)
    q = torch.zeros(1, 2, 16)

    def call(keys=keys, slots=(0,), starts=(0,), ends=(1,), prefixes=((),)):  # type: ignore[no-untyped-def]
        kernel(
            q,
            q,
            q,
            keys,
            keys.clone(),
            list(slots),
            list(starts),
            list(ends),
            [list(p) for p in prefixes],
            0,
            1.0,
        )

    with pytest.raises(RuntimeError, match="end out of range"):
        call(ends=(9,))
    with pytest.raises(RuntimeError, match="slot out of range"):
        call(slots=(2,))
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        call(keys=keys.half())
    with pytest.raises(RuntimeError, match="one after another"):
        call(keys=torch.zeros(2, 2, 16, 8).transpose(2, 3))
    with pytest.raises(RuntimeError, match="first start positions"):
        call(starts=(3,), ends=(5,), prefixes=((torch.zeros(1, 2, 2, 2, 16),),))
    with pytest.raises(RuntimeError, match="cache's dtype"):
        call(starts=(2,), ends=(5,), prefixes=((torch.zeros(1, 2, 2, 2, 16).double(),),))


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(str(tiny_model_dir))


def test_the_decoder_gives_the_same_logits_with_and_without_the_kernel(tiny, any_build):
    """Decoding steps and a pass that decodes rows and encodes a prompt's chunk together; two
    rows start from saved prefixes (attached with the kernel, copied in without it), and rows
    move and trade slots as the engine moves them."""
    model, _ = tiny
    lengths = [3, 70, 9, 140]
    results = []
    for attention in (any_build, None):
        decoder = SlotDecoder(model, 1024, initial_capacity=16, attention=attention)
        torch.manual_seed(0)
        with torch.inference_mode():
            decoder.reserve(6, 60)
            decoder.prefill(5, torch.randint(5, 200, (60,)).tolist(), 0)
            saved = (decoder.save_slot(5, 0, 25), decoder.save_slot(5, 25, 60))
            decoder.reserve(6, max(lengths) + 4)  # grows: rows keep their positions
            for slot, length in enumerate(lengths):
                if slot in (1, 3):  # a dialogue's next turn: its history from the cache
                    decoder.load_slot(slot, saved)
                    ids = torch.randint(5, 200, (length - 60,)).tolist()
                    decoder.prefill(slot, ids, 60)
                else:
                    decoder.prefill(slot, torch.randint(5, 200, (length,)).tolist(), 0)
            decoder.swap_slots(1, 4, lengths[1], 0)
            decoder.move_slot(4, 1, lengths[1])
            steps = [decoder.decode(torch.tensor([7, 8, 9, 10]), torch.tensor(lengths))]
            ends = [n + 1 for n in lengths]
            steps.append(decoder.decode(torch.tensor([11, 12, 13, 14]), torch.tensor(ends)))
            mixed = [(slot, [15 + slot], n + 1) for slot, n in enumerate(ends)]
            steps.append(decoder.prefill_many([*mixed, (4, list(range(20, 45)), 0)]))
            after = torch.tensor([*(n + 2 for n in ends), 25])
            steps.append(decoder.decode(torch.tensor([1, 2, 3, 4, 5]), after))
        results.append(steps)
    for with_kernel, without in zip(*results, strict=True):
        torch.testing.assert_close(with_kernel, without, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("projections", ["onednn", "int8"])
def test_the_kernel_path_calls_packed_projections_bare_with_the_modules_results(
    tiny_model_dir, kernel, projections
):
    """With the kernel, a decoding step calls oneDNN's and int8's kernels directly (not through
    their modules); the logits are those of the path through the modules."""
    int8 = projections == "int8"
    model, _ = load_model(str(tiny_model_dir), "cpu", "float32", "int8" if int8 else "none", True)
    block = model.transformer.h[0]
    for module in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj):
        assert callable(getattr(module, "direct", None))
    lengths = [5, 33, 12]
    results = []
    for attention in (kernel, None):
        decoder = SlotDecoder(model, 1024, attention=attention)
        torch.manual_seed(0)
        with torch.inference_mode():
            decoder.reserve(3, 64)
            for slot, length in enumerate(lengths):
                decoder.prefill(slot, torch.randint(5, 200, (length,)).tolist(), 0)
            first = decoder.decode(torch.tensor([7, 8, 9]), torch.tensor(lengths))
            ends = torch.tensor(lengths) + 1
            results.append((first, decoder.decode(torch.tensor([1, 2, 3]), ends)))
    for with_kernel, without in zip(*results, strict=True):
        torch.testing.assert_close(with_kernel, without, rtol=1e-5, atol=1e-5)


async def test_replies_through_the_kernel_are_model_generates(tiny, kernel):
    """Four dialogues decoded together through the kernel, each reply token for token what
    ``model.generate`` gives for its prompt alone."""
    model, tokenizer = tiny
    engine = GenerationEngine(model, tokenizer, persona=PERSONA, attention=kernel)
    engine.start()
    try:
        prompts = [
            engine.tokenizer(text, add_special_tokens=False)["input_ids"]
            for text in ("Привет!", "Как дела у тебя сегодня?", "Что нового", "Расскажи анекдот")
        ]
        done = await asyncio.gather(
            *(engine.complete(ids, GREEDY, stop_token_ids=[]) for ids in prompts)
        )
        assert engine.decoder is not None and engine.decoder.attention is kernel
        for ids, stats in zip(prompts, done, strict=True):
            assert stats.token_ids == reference(engine, ids, GREEDY)
    finally:
        engine.close()


def test_the_setting_takes_auto_on_off_only(monkeypatch):
    assert Settings(_env_file=None).cpu_attention_kernel == "auto"
    monkeypatch.setenv("CPU_ATTENTION_KERNEL", "fast")
    with pytest.raises(ValidationError, match="auto, on or off"):
        Settings(_env_file=None)


def test_auto_falls_back_with_one_warning_and_on_refuses_in_one_line(tiny, monkeypatch, caplog):
    """Where no compiler is installed: ``auto`` serves with PyTorch's attention and says why,
    ``on`` stops the start with the reason."""
    model, _ = tiny
    monkeypatch.setattr(cpu_attention.shutil, "which", lambda name: None)
    monkeypatch.setattr(cpu_attention.torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    cpu_attention._build.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="bot.engine.cpu_attention"):
            assert decode_attention_for(model, "auto") is None
        assert "no C++ compiler" in caplog.text
        with pytest.raises(KernelUnavailable) as refused:
            decode_attention_for(model, "on")
        assert "\n" not in str(refused.value)
        assert "CPU_ATTENTION_KERNEL=on" in str(refused.value)
        assert decode_attention_for(model, "off") is None
    finally:
        cpu_attention._build.cache_clear()


def test_a_cpu_without_avx2_is_told_why_the_kernel_is_not_used(monkeypatch):
    for capability, usable in (("AVX512", True), ("AVX2", True), ("DEFAULT", False)):
        monkeypatch.setattr(
            cpu_attention.torch.backends.cpu, "get_cpu_capability", lambda c=capability: c
        )
        reason = cpu_attention.unavailable_reason() or ""
        assert ("vectorised for AVX-512 and AVX2" not in reason) is usable, reason


async def test_a_dialogues_next_turn_reads_its_history_from_the_cache_and_replies_as_generate(
    tiny, kernel
):
    """Three turns of four dialogues decoded together: each turn starts from the keys/values
    its previous turn left (attached, not copied into the slot), and each reply is what
    ``model.generate`` gives for the whole prompt."""
    model, tokenizer = tiny
    engine = GenerationEngine(model, tokenizer, persona=PERSONA, attention=kernel)
    engine.start()
    try:
        dialogues = [list(turns) for turns in DIALOGUES]
        for turn in range(3):
            done = await asyncio.gather(
                *(ask(engine, turns, key=f"user{i}") for i, turns in enumerate(dialogues))
            )
            for turns, (reply, stats) in zip(dialogues, done, strict=True):
                assert stats.reply_ids == reference(engine, stats.prompt_ids, GREEDY)
                if turn:  # more than the persona: the dialogue's own previous turn
                    assert stats.reused_tokens > persona_tokens(engine)
                turns += [reply or "…", f"А потом {turn}?"]
        assert engine.decoder is not None and engine.decoder.paged
    finally:
        engine.close()


async def test_the_engine_the_bot_starts_follows_the_setting(tiny_model_dir, monkeypatch):
    """What ``open_local_engine`` (the bot, the console, ``python -m bot serve``) builds: the
    kernel under ``auto`` where it can be had, none with ``off``, and with ``on`` where it cannot
    be had the start stops with the reason."""
    from bot.engine.factory import open_local_engine
    from models.loading import ModelLoadError

    def engine_for(mode: str):  # type: ignore[no-untyped-def]
        settings = Settings(
            _env_file=None, model_path=str(tiny_model_dir), cpu_attention_kernel=mode
        )
        return open_local_engine(settings)

    engine = await engine_for("off")
    engine.close()
    assert engine.decoder is not None and engine.decoder.attention is None
    if REASON is None:
        engine = await engine_for("auto")
        engine.close()
        assert engine.decoder is not None and engine.decoder.paged
    monkeypatch.setattr(cpu_attention.torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    cpu_attention._build.cache_clear()
    try:
        with pytest.raises(ModelLoadError, match="CPU_ATTENTION_KERNEL=on, but it is vectorised"):
            await engine_for("on")
    finally:
        cpu_attention._build.cache_clear()
