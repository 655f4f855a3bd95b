"""Loading a model for serving or evaluation (the bot, its server, the trainer's evaluation).

Any Hugging Face causal-LM directory or hub id loads; the CPU conversions (int8, oneDNN) are
applied here, once, so that the engine only ever sees a ready model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from huggingface_hub import constants as hub_constants
from huggingface_hub import utils as hub_utils
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from models import onednn
from models.allocator import returning_freed_memory
from models.errors import error_line
from models.hub import missing_model, pretrained_source
from models.quantize import load_int8_low_memory, quantize_int8

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(Exception):
    """The model cannot be loaded; the message is one line telling the operator what to set."""


def pick_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def pick_dtype(setting: str, device: torch.device, quantize: str = "none") -> str:
    """The dtype to serve in: ``auto`` becomes the fastest this device runs well; a dtype this
    CPU would run far slower than float32 is refused with the reason and what to set instead.

    On a CPU, bfloat16 needs AVX512_BF16 or AMX (oneDNN packs bfloat16 weights only there; an
    AVX2-only CPU emulates a bfloat16 matmul ~300× slower than float32), and float16 is for
    GPUs. int8 quantizes float32 weights, so ``auto`` with int8 is float32.
    """
    if device.type != "cpu":
        if setting != "auto":
            return setting
        bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return "bfloat16" if bf16 else "float16"
    missing = onednn.bfloat16_support()
    if setting == "auto":
        return "bfloat16" if missing is None and quantize == "none" else "float32"
    if setting == "bfloat16" and missing is not None:
        raise ModelLoadError(
            f"MODEL_DTYPE=bfloat16 on a CPU needs AVX512_BF16 or AMX, and {missing}: use "
            "MODEL_DTYPE=float32 or auto (or MODEL_QUANTIZE=int8 for less memory)"
        )
    if setting == "float16":
        raise ModelLoadError(
            "MODEL_DTYPE=float16 is for GPUs: on a CPU use MODEL_DTYPE=auto, float32 or "
            "bfloat16 (CPUs with AVX512_BF16 or AMX)"
        )
    return setting


def load_model(
    path: str,
    device: str = "auto",
    dtype: str = "float32",
    quantize: str = "none",
    cpu_onednn: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load any Hugging Face causal-LM directory or hub id, or fail with one clear line.

    ``dtype`` may be ``auto`` (:func:`pick_dtype`). ``quantize="int8"`` converts the projections
    to dynamic int8 (CPU only, see models.quantize); ``cpu_onednn`` runs float32 or bfloat16
    projections through oneDNN on a CPU (see models.onednn). A local safetensors checkpoint is
    converted tensor by tensor as it is read (models.streamed). What the conversions free goes
    back to the system (models.allocator).
    """
    with returning_freed_memory():
        return _load_model(path, device, dtype, quantize, cpu_onednn)


def _load_model(
    path: str, device: str, dtype: str, quantize: str, cpu_onednn: bool
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if reason := missing_model(path):
        raise ModelLoadError(reason)
    local = Path(path)
    # Transformers' "Loading weights" bar would land in the service's log, or under the console
    # chat's prompt; the log lines around loading already say what is loaded and how long it took.
    # A first download from the hub (1.5 GB for RuGPT-3 medium) keeps its bar: minutes of silence
    # would look like a hang.
    hf_logging.disable_progress_bar()
    if not hub_constants.HF_HUB_DISABLE_PROGRESS_BARS:
        hub_utils.enable_progress_bars()
    target = pick_device(device)
    if quantize == "int8":
        if target.type != "cpu":
            raise ModelLoadError(
                "MODEL_QUANTIZE=int8 is for CPUs; on a GPU use MODEL_DTYPE=bfloat16"
            )
        if dtype not in ("float32", "auto"):
            raise ModelLoadError("MODEL_QUANTIZE=int8 needs MODEL_DTYPE=float32 (or auto)")
    dtype = pick_dtype(dtype, target, quantize)
    try:
        source = pretrained_source(path)  # a hub id without the hub: from the cache, or at once
        tokenizer = AutoTokenizer.from_pretrained(path, **source.tokenizer_kwargs)
        use_onednn = (
            cpu_onednn
            and quantize == "none"
            and target.type == "cpu"
            and dtype in ("float32", "bfloat16")
            and onednn.available()
        )
        # From local safetensors, converted while loading: the float32 model is never whole.
        model = None
        if local.is_dir() and quantize == "int8":
            model = load_int8_low_memory(local)
        elif local.is_dir() and use_onednn:
            model = onednn.load_packed(local, DTYPES[dtype])
        converted = model is not None
        if model is None:
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=DTYPES[dtype], **source.model_kwargs
            )
    except (OSError, ValueError) as error:
        reason = error_line(error)
        raise ModelLoadError(
            f"cannot load the model from MODEL_PATH={path!r}: {reason}. Set MODEL_PATH to a "
            "Hugging Face model directory (e.g. checkpoints/latest after `make finetune`)"
        ) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if quantize == "int8" and not converted:
        quantize_int8(model)
    elif use_onednn and not converted:
        onednn.to_onednn(model, DTYPES[dtype])
    model.to(target)
    model.eval()
    return model, tokenizer


def count_parameters(model: torch.nn.Module) -> int:
    """The model's weights, those of converted projections included: a packed oneDNN weight
    or an int8 one is not an ``nn.Parameter``, so ``model.parameters()`` leaves them out."""
    count = sum(p.numel() for p in model.parameters())
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) or not hasattr(module, "out_features"):
            continue  # a plain Linear's weight is a Parameter, already counted
        count += module.in_features * module.out_features
        bias = module.bias() if callable(getattr(module, "bias", None)) else module.bias
        count += 0 if bias is None else bias.numel()
    head = getattr(model, "lm_head", None)
    if getattr(model.config, "lm_head_copied_from_embeddings", False) and head is not None:
        count -= head.in_features * head.out_features  # the input embedding, counted already
    return count
