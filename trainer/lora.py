"""LoRA for the bigger RuGPT-3s (``peft``): adapters on GPT-2's projections, the speaker tags'
embeddings trained too, and a plain merged model directory as the result.

Why the tags: the dialogue format adds two tokens (``@@ПЕРВЫЙ@@``, ``@@ВТОРОЙ@@``) whose
embeddings start random when the base model did not have them; frozen, the model could not tell
who speaks. peft's trainable tokens train just those rows (GPT-2 ties them to the output layer).
Why merged: the bot, ``bot serve`` and vLLM load an ordinary Hugging Face directory; the adapter
is kept beside it (``adapter/``) for whoever wants to stack or re-merge it.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from dataset_tools.dialogue_format import SPEAKER_TAGS

#: GPT-2's attention (c_attn, c_proj) and MLP (c_fc, c_proj) projections.
TARGET_MODULES = ["c_attn", "c_proj", "c_fc"]
ADAPTER_DIR = "adapter"


def apply_lora(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    r: int,
    alpha: int,
    dropout: float,
    gradient_checkpointing: bool = False,
) -> PreTrainedModel:
    """The model wrapped for LoRA training: only the adapters and the tags' rows train."""
    from peft import LoraConfig, get_peft_model

    if gradient_checkpointing:  # checkpointed blocks need an input that carries gradients
        model.enable_input_require_grads()
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=TARGET_MODULES,
        fan_in_fan_out=True,  # GPT-2's Conv1D stores weights transposed
        task_type="CAUSAL_LM",
        trainable_token_indices={"wte": tokenizer.convert_tokens_to_ids(list(SPEAKER_TAGS))},
    )
    with warnings.catch_warnings():
        # peft 0.21 reads transformers 5's deprecated ``is_gradient_checkpointing`` alias while
        # wrapping: a FutureWarning about library internals, nothing an operator can act on.
        warnings.filterwarnings(
            "ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning
        )
        return get_peft_model(model, config)  # type: ignore[return-value]


def trainable_parameters(model: PreTrainedModel) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def save_merged(model: PreTrainedModel, run_dir: Path) -> PreTrainedModel:
    """Keep the adapter in ``run_dir/adapter``, write the merged model to ``run_dir``; returns
    the merged model (what the bot will load)."""
    model.save_pretrained(run_dir / ADAPTER_DIR)
    merged = model.merge_and_unload()  # type: ignore[operator]
    merged.save_pretrained(run_dir)
    return merged
