"""LoRA on the tiny model: the loss falls, the result is a plain merged model directory that
loads like any other, and its greedy replies are the adapter model's."""

from __future__ import annotations

import json

import pytest
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from dataset_tools.dialogue_format import render_prompt
from trainer.__main__ import main as trainer_cli
from trainer.finetune import FinetuneOptions, finetune

PROMPTS = ["Привет!", "Как дела?", "Что посоветуешь почитать?", "Пока!", "Расскажи анекдот."]


def greedy(model, tokenizer, text: str) -> list[int]:  # type: ignore[no-untyped-def]
    """12 greedy tokens under one explicit config (the run's generation_config stops at the
    user's tag, the base's does not): what is compared is the weights."""
    ids = tokenizer(render_prompt([text]), return_tensors="pt").input_ids
    config = GenerationConfig(
        max_new_tokens=12,
        do_sample=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    out = model.generate(input_ids=ids, generation_config=config)
    return out[0, ids.shape[1] :].tolist()


# the test's own PeftModel.from_pretrained (not the product's code) trips this in peft
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_lora_trains_merges_and_replies_as_the_adapter(
    tmp_path, sample_splits, tiny_model_dir, fast_profile
):
    profile = fast_profile.override(
        base_model=str(tiny_model_dir),
        lora_r=8,
        max_steps=60,
        eval_steps=30,
        learning_rate=1e-2,  # a random 2-layer base: adapters need a push to move in 60 steps
    )
    metrics = finetune(
        FinetuneOptions(
            profile,
            sample_splits,
            tmp_path,
            run_name="lora",
            limit_train=200,
            limit_val=20,
            n_generate=2,
            progress=False,
            logging_steps=2,
        )
    )
    run = tmp_path / "lora"
    state = json.loads((run / "checkpoint-60" / "trainer_state.json").read_text())
    losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    # it learns: the training loss and the held-out reply perplexity both fall (a random
    # 2-layer base with frozen embeddings moves slowly: 6.39 -> 6.13 here in 60 steps)
    assert losses[-1] < losses[0] - 0.15, losses
    assert metrics["perplexity"] < 0.9 * metrics["perplexity_before_training"]
    assert metrics["lora"]["r"] == 8
    assert metrics["trained_parameters"] < metrics["parameters"] / 10  # adapters, not the model
    assert (run / "adapter" / "adapter_config.json").exists()

    # The run directory is a plain model: no adapter files at its top, loads as any other.
    assert not (run / "adapter_config.json").exists()
    tokenizer = AutoTokenizer.from_pretrained(run)
    merged = AutoModelForCausalLM.from_pretrained(run).eval()
    adapter = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), run / "adapter"
    ).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    merged_replies = [greedy(merged, tokenizer, p) for p in PROMPTS]
    assert merged_replies == [greedy(adapter, tokenizer, p) for p in PROMPTS]
    assert merged_replies != [greedy(base, tokenizer, p) for p in PROMPTS]  # training changed it

    # `trainer evaluate` works on it unchanged.
    report = tmp_path / "eval.json"
    code = trainer_cli(
        [
            "evaluate",
            "--model",
            str(run),
            "--data",
            str(sample_splits / "test.parquet"),
            "--n-generate",
            "2",
            "--json",
            str(report),
        ]
    )
    assert code == 0 and json.loads(report.read_text())["perplexity_replies"] > 0


def test_wrapping_for_lora_shows_the_operator_no_library_deprecation(tiny_model_dir):
    """peft reads a deprecated transformers alias while wrapping; the FutureWarning it raised
    reached the operator's console at every LoRA run."""
    import warnings

    from trainer.lora import apply_lora

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        wrapped = apply_lora(model, tokenizer, r=4, alpha=8, dropout=0.0)
    assert isinstance(wrapped, PeftModel)
    assert [str(w.message) for w in caught if w.category is FutureWarning] == []
