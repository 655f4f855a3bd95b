"""Named training recipes: a set of defaults that every command-line option can override.

``tiny-scratch`` is the offline path: it downloads nothing, trains its own byte-level BPE
tokenizer on the train split and a small GPT-2 from a config, and finishes on a laptop CPU in
minutes. The RuGPT-3 profiles start from the published checkpoints (a hub id or a local copy).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any


@dataclass(frozen=True)
class Profile:
    """One recipe. ``base_model`` None means: build the model and tokenizer from scratch."""

    name: str
    base_model: str | None
    block_size: int = 512  # tokens per packed training sequence
    max_length: int = 512  # a dialogue longer than this is cut on a turn boundary
    epochs: float = 1.0
    max_steps: int = -1
    learning_rate: float = 5e-5
    batch_size: int = 4
    grad_accum: int = 8
    warmup_steps: int = 100
    weight_decay: float = 0.0
    eval_steps: int = 500
    loss_on: str = "replies"
    gradient_checkpointing: bool = False
    # Only for from-scratch models: the GPT-2 config and the BPE vocabulary size.
    scratch_config: dict[str, Any] = field(default_factory=dict)
    vocab_size: int = 4000

    # LoRA (trainer.lora): 0 trains every weight; r > 0 trains low-rank adapters on GPT-2's
    # projections (c_attn, c_proj, c_fc) and the speaker tags' embeddings, and saves them merged.
    lora_r: int = 0
    lora_alpha: int = 32
    lora_dropout: float = 0.05

    def override(self, **values: Any) -> Profile:
        """A copy with the given fields replaced; ``None`` values mean "keep the default"."""
        return replace(self, **{k: v for k, v in values.items() if v is not None})


PROFILES: dict[str, Profile] = {
    "rugpt3-medium": Profile(
        name="rugpt3-medium",
        base_model="ai-forever/rugpt3medium_based_on_gpt2",
        batch_size=2,
        grad_accum=16,
        gradient_checkpointing=True,
    ),
    "rugpt3-small": Profile(
        name="rugpt3-small",
        base_model="ai-forever/rugpt3small_based_on_gpt2",
        batch_size=4,
        grad_accum=8,
    ),
    # 760 M parameters: full fine-tuning needs ~12 GB for weights, gradients and Adam state;
    # LoRA trains ~0.5% of them, so it fits a small GPU, with activation checkpointing.
    "rugpt3-large-lora": Profile(
        name="rugpt3-large-lora",
        base_model="ai-forever/rugpt3large_based_on_gpt2",
        batch_size=4,
        grad_accum=8,
        learning_rate=2e-4,
        gradient_checkpointing=True,
        lora_r=16,
        lora_alpha=32,
    ),
    "tiny-scratch": Profile(
        name="tiny-scratch",
        base_model=None,
        block_size=256,
        max_length=256,
        epochs=30,
        learning_rate=2e-3,
        batch_size=8,
        grad_accum=1,
        warmup_steps=20,
        weight_decay=0.01,
        eval_steps=50,
        scratch_config={"n_layer": 4, "n_embd": 256, "n_head": 4, "n_positions": 512},
        vocab_size=4000,
    ),
}

DEFAULT_PROFILE = "rugpt3-medium"


def get_profile(name: str) -> Profile:
    """The profile of that name, or a ValueError listing the ones that exist."""
    try:
        return PROFILES[name]
    except KeyError:
        known = ", ".join(PROFILES)
        raise ValueError(f"unknown profile {name!r} (known: {known})") from None
