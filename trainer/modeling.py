"""Getting a model and tokenizer to train: load a pretrained base, or build a tiny one from scratch.

Either way the speaker tags of :mod:`dataset_tools.dialogue_format` become single tokens: the
model then sees a turn boundary as one symbol (cheap to learn, impossible to half-generate), and
the bot can stop generation on the tag's token id.
"""

from __future__ import annotations

import logging
from pathlib import Path

from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from models.errors import error_line
from models.hub import pretrained_source
from models.scratch_tokenizer import add_speaker_tokens

logger = logging.getLogger(__name__)


class BaseModelError(Exception):
    """The base model cannot be loaded; the message tells the operator what to do."""


def build_scratch_model(
    tokenizer: PreTrainedTokenizerFast, config_values: dict[str, int]
) -> GPT2LMHeadModel:
    """A randomly initialised GPT-2 sized by ``config_values`` for this tokenizer."""
    config = GPT2Config(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **config_values,
    )
    return GPT2LMHeadModel(config)


def load_pretrained(base_model: str) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Load a hub id or a local directory; add the speaker tags; make sure padding is possible.

    Any failure becomes one :class:`BaseModelError` line that says how to use a local copy,
    because the usual cause is a machine without access to the Hugging Face hub.
    """
    try:
        source = pretrained_source(base_model)  # without the hub: the cache, or fail at once
        tokenizer = AutoTokenizer.from_pretrained(base_model, **source.tokenizer_kwargs)
        model = AutoModelForCausalLM.from_pretrained(base_model, **source.model_kwargs)
    except (OSError, ValueError) as error:
        reason = error_line(error)
        where = "directory" if Path(base_model).exists() else "hub id or directory"
        raise BaseModelError(
            f"cannot load base model {base_model!r} ({where}): {reason}. "
            "Without internet access, download it where you have access "
            f"(`hf download {base_model} --local-dir DIR`), copy DIR here and pass "
            "--base-model DIR (or set BASE_MODEL=DIR)."
        ) from None
    added = add_speaker_tokens(tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if added or model.get_input_embeddings().num_embeddings < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    return model, tokenizer
