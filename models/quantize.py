"""Dynamic int8 quantization of a GPT-2-style model for CPU serving (``MODEL_QUANTIZE=int8``).

GPT-2's projections are ``transformers.pytorch_utils.Conv1D`` (weight stored in × out), which
``torch.ao.quantization.quantize_dynamic`` does not recognise: applied as-is it converts only
``lm_head`` and gains nothing. So each Conv1D is first rewritten as the equivalent ``nn.Linear``
(transposed weight) and quantized right away, one module at a time, so the float32 copy of the
whole model never has to exist twice. Weights become int8 with per-tensor scales; activations are
quantized on the fly per batch. For CPUs only: GPUs should use ``MODEL_DTYPE=bfloat16``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

from models.streamed import convert_loaded, load_streamed, tanh_gelu_mlps


class DirectInt8Linear(DynamicLinear):
    """torch.ao's dynamic int8 ``Linear`` calling its kernel directly.

    The same fbgemm kernel, weights and arithmetic (``quantized::linear_dynamic`` with
    ``reduce_range``, as the parent calls it for int8 weights), without the parent's per-call
    dtype dispatch, nested module attribute lookups and output ``.to()``: 23 µs of the ~70 µs a
    call costs at one row, measured here; a decoding step makes 97 such calls on the medium
    shape. Float32 activations only, which is all that ``MODEL_QUANTIZE=int8`` serves.
    """

    kernel_params: torch.ScriptObject  # fbgemm's packed weight and bias, set by _int8_linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic(x, self.kernel_params, reduce_range=True)

    def direct(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """This projection as a bare call of its kernel (see ``bot.engine.decoder``)."""
        kernel, params = torch.ops.quantized.linear_dynamic.default, self.kernel_params
        return lambda rows: kernel(rows, params, True)


def _int8_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """An ``nn.Linear`` with these float weights (out × in), converted to dynamic int8."""
    from torch.ao.quantization import default_dynamic_qconfig

    with torch.device("meta"):  # no randomly initialised float weights to allocate and drop
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    linear.weight = nn.Parameter(weight.detach().contiguous(), requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    linear.qconfig = default_dynamic_qconfig
    quantized = DirectInt8Linear.from_float(linear)
    quantized.kernel_params = quantized._packed_params._packed_params
    return quantized


def one_kernel_gelu(model: nn.Module) -> None:
    """Compute GPT-2's tanh-GELU with PyTorch's fused kernel: the same formula as
    transformers' ``NewGELUActivation`` (results equal to ~1e-7), one pass over the MLP's
    activations instead of the half-dozen elementwise operations its Python formula costs."""
    for mlp in tanh_gelu_mlps(model):
        mlp.act = nn.GELU(approximate="tanh")


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
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notice
        replaced = convert_loaded(model, _int8_linear)
    one_kernel_gelu(model)
    return replaced


def load_int8_low_memory(path: Path) -> nn.Module | None:
    """The model at ``path`` with int8 projections, built tensor by tensor
    (:func:`~models.streamed.load_streamed`): each projection is read, quantized and dropped
    before the next is read, so the float32 model never sits in memory whole. None when the
    directory has no safetensors weights (the caller then loads normally and calls
    :func:`quantize_int8`)."""
    torch.backends.quantized.engine = "fbgemm"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notice
        model = load_streamed(path, _int8_linear, torch.float32)
    if model is not None:
        one_kernel_gelu(model)
    return model
