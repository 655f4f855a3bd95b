"""Building a serving model tensor by tensor from its safetensors files.

The CPU conversions (int8 in ``models.quantize``, packed float32/bfloat16 projections in
``models.onednn``) each replace every projection with a module of their own. Done on a model
loaded the usual way, the float32 weights sit in memory whole (or as memory-mapped pages that stay
resident while any view of them lives) next to their converted copies: 3.4 GB at the peak for the
medium model with oneDNN. Built here instead, each projection is read, converted and dropped before
the next is read, so the process never holds more than the converted model and one tensor.

Why plain file reads and not ``safetensors.safe_open``: it memory-maps the whole file, and every
page it touches stays in the process's resident memory until the file is unmapped, which is the
very copy this avoids.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

#: Makes the serving module of one projection from its weight (out × in, float32) and bias.
Projection = Callable[[torch.Tensor, torch.Tensor | None], nn.Module]

_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def safetensors_files(path: Path) -> list[Path] | None:
    """The checkpoint's safetensors files, or None when it has none (then load it normally)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / n for n in names]
    single = path / "model.safetensors"
    return [single] if single.is_file() else None


def _header(file: Path) -> dict[str, tuple[int, dict]]:
    """{tensor name: (offset of the data section, header entry)} of a safetensors file."""
    with file.open("rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(size))
    header.pop("__metadata__", None)
    return {name: (8 + size, info) for name, info in header.items()}


def read_tensor(file: Path, located: tuple[int, dict]) -> torch.Tensor:
    """One tensor, read into fresh memory, as float32."""
    base, info = located
    start, end = info["data_offsets"]
    with file.open("rb") as handle:
        handle.seek(base + start)
        data = bytearray(end - start)
        handle.readinto(data)  # into the buffer: read() then bytearray() would hold it twice
    return torch.frombuffer(data, dtype=_DTYPES[info["dtype"]]).reshape(info["shape"]).float()


#: GPT-2's activations that are the tanh approximation of GELU.
TANH_GELU = ("gelu_new", "gelu_pytorch_tanh")


def tanh_gelu_mlps(model: nn.Module) -> list[nn.Module]:
    """The model's MLPs (``c_fc`` → ``act`` → ``c_proj``) whose activation is tanh-GELU, which
    both CPU conversions compute in one pass instead of transformers' Python formula."""
    if getattr(model.config, "activation_function", None) not in TANH_GELU:
        return []
    return [m for m in model.modules() if hasattr(m, "c_fc") and hasattr(m, "act")]


def untie_for_serving(model: nn.Module, copied: bool | None = None) -> None:
    """``lm_head`` is now a module of its own (a lookup table and a packed or int8 projection
    cannot share memory). Whether it was copied from the input embedding is recorded, so that
    the model's parameter count does not count those weights twice
    (:func:`models.loading.count_parameters`)."""
    if copied is None:
        copied = bool(getattr(model.config, "tie_word_embeddings", False))
    model.config.lm_head_copied_from_embeddings = copied
    model.config.tie_word_embeddings = False


def convert_loaded(model: nn.Module, projection: Projection) -> int:
    """The in-memory counterpart of :func:`load_streamed`, for a model loaded the usual way (a hub
    id, a checkpoint without safetensors): every Conv1D/Linear replaced by ``projection``, one at
    a time; ``lm_head`` becomes its own module (:func:`untie_for_serving`). Returns the count."""
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Conv1D):
                weight, bias = child.weight.detach().t(), child.bias.detach()
            elif type(child) is nn.Linear:
                weight = child.weight.detach()
                bias = None if child.bias is None else child.bias.detach()
            else:
                continue
            setattr(parent, name, projection(weight, bias))
            replaced += 1
    untie_for_serving(model)
    return replaced


def load_streamed(path: Path, projection: Projection, dtype: torch.dtype) -> nn.Module | None:
    """The model at ``path`` with every Conv1D/Linear made by ``projection`` and the remaining
    weights (embeddings, layer norms) in ``dtype``; None when the directory has no safetensors
    weights or the architecture has buffers this cannot fill (the caller then loads normally).

    ``lm_head`` of a model whose output embedding is tied to the input one gets its own module
    (``tie_word_embeddings`` is switched off): the lookup table stays a plain tensor.
    """
    files = safetensors_files(path)
    if files is None:
        return None
    from transformers import AutoConfig, AutoModelForCausalLM

    where = {key: (f, info) for f in files for key, info in _header(f).items()}

    def tensor(key: str) -> torch.Tensor:
        return read_tensor(*where[key])

    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):  # no random weights to allocate and drop
        model = AutoModelForCausalLM.from_config(config)
    for module_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            full = f"{module_name}.{name}" if module_name else name
            if isinstance(child, Conv1D):
                new = projection(tensor(f"{full}.weight").t(), tensor(f"{full}.bias"))
            elif type(child) is nn.Linear:
                key = f"{full}.weight"
                if key not in where:  # lm_head tied to the input embedding
                    key = next(k for k in where if k.endswith("wte.weight"))
                bias = tensor(f"{full}.bias") if child.bias is not None else None
                new = projection(tensor(key), bias)
            else:
                continue
            setattr(parent, name, new)
    untie_for_serving(model, copied=not any(key.endswith("lm_head.weight") for key in where))
    for name, parameter in list(model.named_parameters()):
        if not parameter.is_meta:
            continue  # a converted module's own
        owner_name, _, attribute = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        if name not in where:
            raise RuntimeError(f"{name} is not in the checkpoint at {path}")
        setattr(owner, attribute, nn.Parameter(tensor(name).to(dtype), requires_grad=False))
        del parameter
    if any(buffer.is_meta for buffer in model.buffers()):  # GPT-2 in transformers 5 has none
        return None
    model.config.dtype = dtype
    return model
