"""Shared fixtures: a tiny GPT-2 and tokenizer built locally (random weights, BPE on our sample)."""

from pathlib import Path

import pytest

from dataset_tools.dialogue_format import render_dialogue
from dataset_tools.sample_data import generate_dialogues
from trainer.modeling import build_scratch_model, train_scratch_tokenizer


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A Hugging Face model directory any loader accepts, made in a second, offline."""
    path = tmp_path_factory.mktemp("tiny-model")
    tokenizer = train_scratch_tokenizer((render_dialogue(d) for d in generate_dialogues()), 600)
    model = build_scratch_model(
        tokenizer, {"n_layer": 2, "n_embd": 64, "n_head": 2, "n_positions": 1024}
    )
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
