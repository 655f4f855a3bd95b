"""float32 projections through oneDNN on CPUs (``MODEL_CPU_ONEDNN``, on by default).

A decoding step multiplies a few rows (one per user in the batch) by each weight matrix. PyTorch's
default CPU GEMM does that badly for small row counts: measured here for a 1024×4096 projection,
57 GFLOP/s at 8 rows and 20 at 1 row, against 134 and 36 through oneDNN (``mkldnn_linear``, with
its weights reordered once into its blocked layout, input conversions included). Same weights,
same float32 arithmetic (results agree to ~1e-6), so this is a kernel choice, not a different
model. Like ``bot.quantize``, each GPT-2 ``Conv1D`` is rewritten as a linear layer, one module at
a time, and ``lm_head`` gets its own copy of the (tied) embedding matrix.

Memory: the oneDNN copies are made while the loaded weights are still referenced (memory-mapped
safetensors pages), so the serving process's resident memory is about twice the float32 model's
(``make bench`` reports it); ``MODEL_CPU_ONEDNN=false`` where memory matters more than speed.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D


def available() -> bool:
    return torch.backends.mkldnn.is_available()


class OneDNNLinear(nn.Module):
    """``y = x W^T + b`` with ``W`` held in oneDNN's own layout (any leading dimensions of x).

    Not ``torch.utils.mkldnn.MkldnnLinear``: that is a TorchScript module (deprecated), and it
    kept about three times its weights' size resident here against about two for this one.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        if bias is None:
            bias = torch.zeros(self.out_features)
        self.weight = weight.detach().float().contiguous().to_mkldnn()
        self.bias = bias.detach().float().contiguous().to_mkldnn()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).contiguous().to_mkldnn()
        out = torch._C._nn.mkldnn_linear(rows, self.weight, self.bias).to_dense()
        return out.reshape(*x.shape[:-1], self.out_features)


def to_onednn(model: nn.Module) -> int:
    """Replace every Conv1D and Linear projection with a oneDNN linear; returns the count."""
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Conv1D):
                new = OneDNNLinear(child.weight.detach().t(), child.bias.detach())
            elif type(child) is nn.Linear:
                bias = child.bias.detach() if child.bias is not None else None
                new = OneDNNLinear(child.weight.detach(), bias)
            else:
                continue
            setattr(parent, name, new)
            replaced += 1
    model.config.tie_word_embeddings = False
    return replaced
