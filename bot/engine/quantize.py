"""Dynamic int8 quantization of a GPT-2-style model for CPU serving (``MODEL_QUANTIZE=int8``).

GPT-2's projections are ``transformers.pytorch_utils.Conv1D`` (weight stored in × out), which
``torch.ao.quantization.quantize_dynamic`` does not recognise: applied as-is it converts only
``lm_head`` and gains nothing. So each Conv1D is first rewritten as the equivalent ``nn.Linear``
(transposed weight) and quantized right away, one module at a time, so the float32 copy of the
whole model never has to exist twice. Weights become int8 with per-tensor scales; activations are
quantized on the fly per batch. For CPUs only: GPUs should use ``MODEL_DTYPE=bfloat16``.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D


def _int8_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """An ``nn.Linear`` with these float weights (out × in), converted to dynamic int8."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
    from torch.ao.quantization import default_dynamic_qconfig

    with torch.device("meta"):  # no randomly initialised float weights to allocate and drop
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    linear.weight = nn.Parameter(weight.detach().contiguous(), requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    linear.qconfig = default_dynamic_qconfig
    return DynamicLinear.from_float(linear)


def quantize_int8(model: nn.Module) -> int:
    """Replace every Conv1D and Linear projection with a dynamic int8 Linear; returns the count.

    The input embedding (tied to ``lm_head`` in GPT-2) stays float32 for lookups; ``lm_head``
    gets its own int8 copy.
    """
    if (
        not hasattr(torch.backends, "quantized")
        or "fbgemm" not in torch.backends.quantized.supported_engines
    ):
        raise RuntimeError("this torch build has no fbgemm int8 kernels: use MODEL_QUANTIZE=none")
    torch.backends.quantized.engine = "fbgemm"
    replaced = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notice
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, Conv1D):
                    new = _int8_linear(child.weight.detach().t(), child.bias.detach())
                elif type(child) is nn.Linear:
                    new = _int8_linear(child.weight.detach(), child.bias)
                else:
                    continue
                setattr(parent, name, new)
                replaced += 1
    model.config.tie_word_embeddings = False  # lm_head is now its own (int8) module
    return replaced


def _safetensors_files(path: Path) -> list[Path] | None:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / n for n in names]
    single = path / "model.safetensors"
    return [single] if single.is_file() else None


_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _safetensors_header(file: Path) -> dict[str, tuple[int, dict]]:
    """{tensor name: (offset of the data section, header entry)} of a safetensors file."""
    with file.open("rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(size))
    header.pop("__metadata__", None)
    return {name: (8 + size, info) for name, info in header.items()}


def _read_tensor(file: Path, located: tuple[int, dict]) -> torch.Tensor:
    """Read one tensor into fresh memory with plain file reads.

    Not ``safe_open``: it memory-maps the whole file, and every page it touches stays in the
    process's resident memory until the file is unmapped, which is the very float32 copy this
    loader exists to avoid.
    """
    base, info = located
    start, end = info["data_offsets"]
    with file.open("rb") as handle:
        handle.seek(base + start)
        data = bytearray(end - start)
        handle.readinto(data)  # into the buffer: read() then bytearray() would hold it twice
    return torch.frombuffer(data, dtype=_DTYPES[info["dtype"]]).reshape(info["shape"]).float()


def load_int8_low_memory(path: Path) -> nn.Module | None:
    """Build the model on the meta device and fill it tensor by tensor from safetensors.

    Each projection is read, quantized and dropped before the next is read, so the float32 model
    never sits in memory whole: serving memory is the int8 projections plus the float32
    embeddings. Returns None when the directory has no safetensors weights (the caller then
    loads normally and calls :func:`quantize_int8`).
    """
    files = _safetensors_files(path)
    if files is None:
        return None
    from transformers import AutoConfig, AutoModelForCausalLM

    where = {key: (f, info) for f in files for key, info in _safetensors_header(f).items()}

    def tensor(key: str) -> torch.Tensor:
        return _read_tensor(*where[key])

    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    torch.backends.quantized.engine = "fbgemm"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for module_name, parent in list(model.named_modules()):
            for name, child in list(parent.named_children()):
                full = f"{module_name}.{name}" if module_name else name
                if isinstance(child, Conv1D):
                    new = _int8_linear(tensor(f"{full}.weight").t(), tensor(f"{full}.bias"))
                elif type(child) is nn.Linear:
                    key = f"{full}.weight"
                    if key not in where:  # lm_head tied to the input embedding
                        key = next(k for k in where if k.endswith("wte.weight"))
                    bias = tensor(f"{full}.bias") if child.bias is not None else None
                    new = _int8_linear(tensor(key), bias)
                else:
                    continue
                setattr(parent, name, new)
    model.config.tie_word_embeddings = False
    for name, parameter in list(model.named_parameters()):  # embeddings and layer norms
        owner_name, _, attribute = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        if name not in where:
            raise RuntimeError(f"{name} is not in the checkpoint at {path}")
        setattr(owner, attribute, nn.Parameter(tensor(name), requires_grad=False))
        del parameter
    meta_buffers = [name for name, buffer in model.named_buffers() if buffer.is_meta]
    if meta_buffers:  # GPT-2 in transformers 5 has none; another architecture might
        return None
    return model
