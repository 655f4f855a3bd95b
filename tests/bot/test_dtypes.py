"""Which dtype the engine serves in, and what bfloat16 changes in its replies.

bfloat16 through oneDNN runs only on CPUs with AVX512_BF16 or AMX; elsewhere it is refused. The
engine's own bfloat16 handling (keys/values and logits in float32 on a CPU) is the
same whichever kernels do the projections, so it is checked on every machine with PyTorch's
default bfloat16 kernels (slow on an AVX2 CPU, fine for the tiny model), and the packed oneDNN
path on top of that where the CPU has the instructions.
"""

import pytest
import torch
from pydantic import ValidationError
from transformers import AutoModelForCausalLM, AutoTokenizer

from bot.config import Settings
from bot.engine import GenerationEngine, SamplingParams, cpu_attention, load_model
from models import onednn
from models.loading import ModelLoadError, count_parameters, pick_dtype
from tests.bot.test_batching import ask
from tests.conftest import CHATTY_DIALOGUES, CHATTY_PERSONA

CPU = torch.device("cpu")
NO_BF16 = onednn.bfloat16_support()
KERNEL_MISSING = cpu_attention.unavailable_reason()
needs_bf16_cpu = pytest.mark.skipif(
    NO_BF16 is not None, reason=f"bfloat16 through oneDNN: {NO_BF16}"
)
PROMPTS = [
    *(dialogue[0] for dialogue in CHATTY_DIALOGUES),
    "Что делаешь?",
    "Расскажи что-нибудь",
    "Хорошо, а у тебя?",
]


def test_auto_picks_bfloat16_only_where_the_cpu_runs_it_fast():
    expected = "bfloat16" if NO_BF16 is None else "float32"
    assert pick_dtype("auto", CPU) == expected
    assert pick_dtype("auto", CPU, quantize="int8") == "float32"  # int8 quantizes float32
    assert pick_dtype("float32", CPU) == "float32"


@pytest.mark.skipif(NO_BF16 is None, reason="this CPU runs bfloat16: nothing to refuse")
def test_bfloat16_on_a_cpu_without_the_instructions_is_refused_in_one_line(tiny_model_dir):
    with pytest.raises(ModelLoadError) as refused:
        load_model(str(tiny_model_dir), "cpu", "bfloat16")
    message = str(refused.value)
    assert "\n" not in message
    assert "AVX512_BF16 or AMX" in message and "MODEL_DTYPE=float32" in message


def test_float16_on_a_cpu_and_int8_with_bfloat16_are_refused(tiny_model_dir):
    with pytest.raises(ModelLoadError, match="for GPUs"):
        load_model(str(tiny_model_dir), "cpu", "float16")
    with pytest.raises(ModelLoadError, match="needs MODEL_DTYPE=float32"):
        load_model(str(tiny_model_dir), "cpu", "bfloat16", "int8")


def test_dtype_setting_accepts_auto_and_rejects_the_unknown(monkeypatch):
    monkeypatch.setenv("MODEL_DTYPE", "auto")
    assert Settings(_env_file=None).model_dtype == "auto"
    monkeypatch.setenv("MODEL_DTYPE", "int4")
    with pytest.raises(ValidationError):
        Settings(_env_file=None)


async def _greedy_replies(model, tokenizer, new_tokens=12, attention=None) -> list[list[int]]:  # type: ignore[no-untyped-def]
    engine = GenerationEngine(
        model, tokenizer, persona=CHATTY_PERSONA, reply_tokens=new_tokens, attention=attention
    )
    engine.start()
    params = SamplingParams(temperature=0.0, repetition_penalty=1.0, max_new_tokens=new_tokens)
    try:
        replies = []
        for prompt in PROMPTS:
            done = await engine.complete(_prompt_ids(tokenizer, prompt), params, stop_token_ids=[])
            replies.append(done.token_ids)
        if engine.decoder is not None:
            # keys/values in float32 on a CPU with PyTorch's attention, else the model's dtype
            cpu = model.device.type == "cpu"
            wanted = torch.float32 if cpu and attention is None else model.dtype
            assert engine.decoder.cache.dtype == wanted
        return replies
    finally:
        engine.close()


def _prompt_ids(tokenizer, prompt: str) -> list[int]:  # type: ignore[no-untyped-def]
    from dataset_tools.dialogue_format import render_prompt

    text = render_prompt([prompt], CHATTY_PERSONA)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _explain_divergence(reference, tokenizer, prompt: str, wanted: list[int], got: list[int]):  # type: ignore[no-untyped-def]
    """Equal replies, or a first difference where float32 itself barely preferred its token:
    its logit above bfloat16's choice by less than 2% of the largest logit, the order of
    bfloat16's own rounding of the activations."""
    if wanted == got:
        return
    at = next(i for i, (a, b) in enumerate(zip(wanted, got, strict=False)) if a != b)
    ids = torch.tensor([_prompt_ids(tokenizer, prompt) + wanted[:at]])
    with torch.inference_mode():
        logits = reference(ids).logits[0, -1]
    margin = (logits[wanted[at]] - logits[got[at]]).item()
    assert margin <= 0.02 * logits.abs().max().item(), (prompt, at, margin)


def _check_against_float32(chatty_model_dir, model, attention=None) -> int:  # type: ignore[no-untyped-def]
    import asyncio

    tokenizer = AutoTokenizer.from_pretrained(chatty_model_dir)
    reference = AutoModelForCausalLM.from_pretrained(chatty_model_dir).eval()
    wanted = asyncio.run(_greedy_replies(reference, tokenizer))
    got = asyncio.run(_greedy_replies(model, tokenizer, attention=attention))
    for prompt, a, b in zip(PROMPTS, wanted, got, strict=True):
        _explain_divergence(reference, tokenizer, prompt, a, b)
    return sum(a == b for a, b in zip(wanted, got, strict=True))


def test_bfloat16_replies_equal_float32_or_part_where_float32_was_unsure(chatty_model_dir):
    """The engine's bfloat16 handling with PyTorch's default kernels (any CPU)."""
    model = AutoModelForCausalLM.from_pretrained(chatty_model_dir, dtype=torch.bfloat16).eval()
    with torch.inference_mode():
        logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.dtype == torch.bfloat16  # the model's own head; the engine turns them float32
    equal = _check_against_float32(chatty_model_dir, model)
    assert equal >= len(PROMPTS) - 1  # the learned replies are far from any tie


@needs_bf16_cpu
def test_packed_bfloat16_projections_and_their_replies(chatty_model_dir):
    model, _ = load_model(str(chatty_model_dir), "cpu", "auto", "none", cpu_onednn=True)
    assert model.dtype == torch.bfloat16
    projections = [m for m in model.modules() if isinstance(m, onednn.OneDNNLinear)]
    assert len(projections) == 2 * 4 + 1
    assert all(p.weight.dtype == torch.bfloat16 for p in projections)
    equal = _check_against_float32(chatty_model_dir, model)
    assert equal >= len(PROMPTS) - 1


def test_packed_while_loading_equals_packing_a_loaded_model(tiny_model_dir):
    """A local checkpoint is packed projection by projection as it is read (never whole in
    memory); a hub model is packed after loading. Both are the same model."""
    loaded = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    onednn.to_onednn(loaded)
    streamed = onednn.load_packed(tiny_model_dir).eval()
    ids = torch.randint(0, 500, (2, 30), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, streamed(ids).logits)


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_converted_models_report_their_true_parameter_count(tiny_model_dir, quantize):
    """Packed and int8 weights are not nn.Parameters, and lm_head became a copy of the tied
    input embedding: the count an operator sees must be the checkpoint's all the same."""
    expected = AutoModelForCausalLM.from_pretrained(tiny_model_dir).num_parameters()
    model, _ = load_model(str(tiny_model_dir), "cpu", "float32", quantize, cpu_onednn=True)
    assert count_parameters(model) == expected


@needs_bf16_cpu
async def test_a_bfloat16_dialogue_kept_between_turns_gives_the_reply_a_fresh_one_does(
    chatty_model_dir,
):
    """Kept between turns in bfloat16, half the memory of the float32 slots, and nothing lost:
    those keys/values came out of bfloat16 projections."""
    model, tokenizer = load_model(str(chatty_model_dir), "cpu", "bfloat16", "none")
    engine = GenerationEngine(model, tokenizer, persona=CHATTY_PERSONA)
    engine.start()
    until_stop = SamplingParams(temperature=0.0, repetition_penalty=1.0, max_new_tokens=30)
    try:
        turns = [CHATTY_DIALOGUES[0][0]]
        first, first_stats = await ask(engine, turns, until_stop, key="alice")
        entry = engine.prefix_cache.take("alice")
        assert entry is not None and all(c.dtype == torch.bfloat16 for c in entry.chunks)
        assert entry.nbytes == sum(c.numel() * 2 for c in entry.chunks[entry.shared :])
        engine.prefix_cache.put("alice", entry)
        turns += [first, "Что делаешь?"]
        _, kept = await ask(engine, turns, until_stop, key="alice")
        assert kept.reused_tokens == first_stats.prompt_tokens + len(first_stats.reply_ids)
        _, fresh = await ask(engine, turns, until_stop)  # only the persona from the cache
        assert fresh.reused_tokens < kept.reused_tokens
        assert kept.reply_ids == fresh.reply_ids and kept.reply_ids
    finally:
        engine.close()


@needs_bf16_cpu
@pytest.mark.skipif(KERNEL_MISSING is not None, reason=f"no CPU attention kernel: {KERNEL_MISSING}")
def test_bfloat16_through_the_cpu_kernel_keeps_bfloat16_keys_and_replies_as_float32(
    chatty_model_dir,
):
    """What ``MODEL_DTYPE=auto`` serves on such a CPU: packed bfloat16 projections and
    keys/values kept in bfloat16 (half the memory), read by the compiled attention kernel."""
    model, _ = load_model(str(chatty_model_dir), "cpu", "bfloat16", "none", cpu_onednn=True)
    equal = _check_against_float32(chatty_model_dir, model, attention=cpu_attention.load())
    assert equal >= len(PROMPTS) - 1
