"""float32 and bfloat16 projections through oneDNN on CPUs (``MODEL_CPU_ONEDNN``, on by default).

A decoding step multiplies a few rows (one per user in the batch) by each weight matrix. PyTorch's
default CPU GEMM does that badly for small row counts. Measured on the 2-core machine for 24
projections of 1024×4096 (the medium shape's MLP), in milliseconds:

=========================  ======  ======  =======  ========
kernel                     1 row   8 rows  25 rows  200 rows
=========================  ======  ======  =======  ========
``F.linear`` (default)     30      41      59       280
oneDNN, plain layout       17      23      31       133
oneDNN, packed for 8 rows  12      15      20       101
=========================  ======  ======  =======  ========

The last row is what this module uses: the weights are reordered once into oneDNN's blocked
layout for a batch of :data:`BATCH_HINT` rows (``mkldnn._reorder_linear_weight``) and multiplied
with ``mkldnn._linear_pointwise``, the kernels PyTorch's own compiler (inductor) emits for CPU
linears. Dense tensors go in and out (no per-call format conversions), and GPT-2's tanh-GELU is
fused into the MLP's first projection. Same weights, same float32 arithmetic (results agree with
``F.linear`` to ~1e-6; the tests check greedy replies token for token), so this is a kernel
choice, not a different model. Like ``models.quantize``, each GPT-2 ``Conv1D`` is rewritten as a
linear layer, one module at a time, and ``lm_head`` gets its own copy of the (tied) embedding.

**bfloat16** (``MODEL_DTYPE=bfloat16`` or ``auto`` on a CPU with AVX512_BF16 or AMX): the same
packed kernels with bfloat16 weights and activations (float32 accumulation inside oneDNN), half
the weight bytes to read per step; the engine turns the logits into float32 before sampling
and keeps keys/values in bfloat16 where the CPU attention kernel runs, else in float32
(``bot.engine.decoder`` says why). Measured on a 2-core
AVX512_BF16 CPU, medium shape: an 8-row step 71 ms against float32's 96, one row 42 against 79
(docs/benchmarks.md). On a CPU without those instructions oneDNN cannot pack
bfloat16 at all and PyTorch's own bfloat16 matmul is emulated (~300× slower than float32):
refused at load (:func:`bfloat16_support`).

Memory: a local safetensors checkpoint is built projection by projection
(:func:`load_packed`, ``models.streamed``), so the unpacked weights never sit in memory
whole; the process holds the packed projections, the embeddings and the runtime. A model loaded
the usual way (a hub id) is converted in place (:func:`to_onednn`) and its remaining weights are
copied out of the memory-mapped checkpoint so that its pages are released (:func:`_own_memory`).
``MODEL_CPU_ONEDNN=false`` keeps PyTorch's default kernels and no packed copy.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from models.streamed import convert_loaded, load_streamed, tanh_gelu_mlps

#: The batch size the weights are laid out for. A hint, not a limit: any number of rows works
#: (prefill passes hundreds); 8 was fastest at 1, 8, 25 and 200 rows here.
BATCH_HINT = 8


def available() -> bool:
    """Whether this PyTorch build has oneDNN and the packed-linear operators."""
    ops = torch.ops.mkldnn
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(ops, "_linear_pointwise")
        and hasattr(ops, "_reorder_linear_weight")
    )


def bfloat16_support() -> str | None:
    """None when this CPU runs bfloat16 projections fast; else why not, in a few words."""
    cpu = torch.cpu
    fast = cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported()
    if not fast:
        capability = torch.backends.cpu.get_cpu_capability()
        return f"this CPU has no AVX512_BF16 or AMX instructions (it has {capability})"
    if not (available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return "this PyTorch build's oneDNN has no bfloat16 kernels for this CPU"
    return None


class OneDNNLinear(nn.Module):
    """``y = x W^T + b`` with ``W`` packed for oneDNN, in ``dtype`` (float32, or bfloat16 on a
    CPU :func:`bfloat16_support` accepts); tanh-GELU applied to ``y`` in the same call once
    :func:`_fuse_gelu` has set ``attr``."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        weight = weight.detach().to(dtype).contiguous()
        with torch.inference_mode():
            self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, BATCH_HINT)
        # A copy, not a view: a view would keep the whole memory-mapped checkpoint alive.
        self.bias = None if bias is None else bias.detach().to(dtype).clone()
        self.attr, self.algorithm = "none", ""  # the post-op fused into the product

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).contiguous()
        out = torch.ops.mkldnn._linear_pointwise(
            rows, self.weight, self.bias, self.attr, [], self.algorithm
        )
        return out.reshape(*x.shape[:-1], self.out_features)

    def direct(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """This projection for contiguous ``[rows, in]`` input, as a bare call of the kernel
        (no module call, reshapes or operator lookup: see ``bot.engine.decoder``)."""
        kernel = torch.ops.mkldnn._linear_pointwise.default
        weight, bias, attr, algorithm = self.weight, self.bias, self.attr, self.algorithm
        return lambda rows: kernel(rows, weight, bias, attr, [], algorithm)


def _fuse_gelu(model: nn.Module) -> None:
    """In a GPT-2 MLP whose activation is tanh-GELU, move the activation into the packed
    ``c_fc`` (the MLP's own becomes the identity), saving the half-dozen elementwise passes per
    layer that the tanh formula costs."""
    for mlp in tanh_gelu_mlps(model):
        if isinstance(mlp.c_fc, OneDNNLinear):
            mlp.c_fc.attr, mlp.c_fc.algorithm = "gelu", "tanh"
            mlp.act = nn.Identity()


def load_packed(path: Path, dtype: torch.dtype = torch.float32) -> nn.Module | None:
    """The safetensors checkpoint at ``path`` with packed projections in ``dtype``, built one
    projection at a time (see the module docstring); None when it has no safetensors weights."""
    model = load_streamed(path, lambda weight, bias: OneDNNLinear(weight, bias, dtype), dtype)
    if model is not None:
        _fuse_gelu(model)
    return model


def to_onednn(model: nn.Module, dtype: torch.dtype = torch.float32) -> int:
    """Replace every Conv1D and Linear projection of a loaded model with a oneDNN linear (GELU
    fused, :func:`_fuse_gelu`); returns the count."""
    replaced = convert_loaded(model, lambda weight, bias: OneDNNLinear(weight, bias, dtype))
    _fuse_gelu(model)
    _own_memory(model)
    return replaced


def _own_memory(model: nn.Module) -> None:
    """Copy the remaining weights (embeddings, layer norms) out of the loaded checkpoint.

    ``from_pretrained`` leaves parameters as views of the memory-mapped safetensors file, and
    every page the packing above read stays resident while any view keeps the mapping alive:
    the float32 model's size again (measured: 3.5 GB resident for the medium shape against
    2.0 GB once the mapping is released).
    """
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.data = tensor.data.clone()
