"""MODEL_QUANTIZE=int8: every projection becomes int8, and the model still says the same things."""

import pytest
import torch
from pydantic import ValidationError
from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from bot.config import Settings
from bot.engine import load_model
from models.quantize import load_int8_low_memory, quantize_int8


def test_every_projection_is_int8_and_predictions_match_float32(tiny_model_dir):
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    model, _ = load_model(str(tiny_model_dir), "cpu", "float32", "int8")
    modules = list(model.modules())
    assert not any(isinstance(m, Conv1D) for m in modules)
    assert not any(type(m) is torch.nn.Linear for m in modules)
    assert sum(isinstance(m, DynamicLinear) for m in modules) == 2 * 4 + 1  # 4 per block + head
    ids = torch.randint(0, 500, (4, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = reference(ids).logits, model(ids).logits
    agreement = (expected.argmax(-1) == got.argmax(-1)).float().mean().item()
    assert agreement > 0.9
    assert torch.allclose(expected.softmax(-1), got.softmax(-1), atol=0.02)


def test_low_memory_loader_equals_quantizing_a_loaded_model(tiny_model_dir):
    loaded = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    quantize_int8(loaded)
    streamed = load_int8_low_memory(tiny_model_dir).eval()
    ids = torch.randint(0, 500, (2, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, streamed(ids).logits)


def test_quantize_setting_is_validated(monkeypatch):
    monkeypatch.setenv("MODEL_QUANTIZE", "int4")
    with pytest.raises(ValidationError):
        Settings(_env_file=None)
