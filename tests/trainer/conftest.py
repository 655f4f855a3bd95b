"""Trainer test fixtures: prepared sample splits and a 2-layer profile (seconds, not minutes)."""

from pathlib import Path

import pytest

from dataset_tools.prepare import PrepareConfig, prepare
from dataset_tools.sample_data import DEFAULT_SAMPLE_PATH
from trainer.profiles import get_profile

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def sample_splits(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("splits")
    prepare(ROOT / DEFAULT_SAMPLE_PATH, out, PrepareConfig(show_progress=False))
    return out


@pytest.fixture(scope="session")
def fast_profile():  # a frozen dataclass: one instance serves every test
    return get_profile("tiny-scratch").override(
        scratch_config={"n_layer": 2, "n_embd": 64, "n_head": 2, "n_positions": 256},
        vocab_size=800,
        block_size=128,
        max_length=128,
        max_steps=4,
        eval_steps=2,
        batch_size=4,
        warmup_steps=0,
    )
