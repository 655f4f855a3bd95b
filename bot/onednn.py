"""float32 projections through oneDNN on CPUs (``MODEL_CPU_ONEDNN``, on by default).

A decoding step multiplies a few rows (one per user in the batch) by each weight matrix. PyTorch's
default CPU GEMM does that badly for small row counts: measured here for a 1024×4096 projection,
57 GFLOP/s at 8 rows and 20 at 1 row, against 134 and 36 through oneDNN (``mkldnn_linear``, with
its weights reordered once into its blocked layout, input conversions included). Same weights,
same float32 arithmetic (results agree to ~1e-6), so this is a kernel choice, not a different
model. Like ``bot.quantize``, each GPT-2 ``Conv1D`` is rewritten as a linear layer, one module at
a time, and ``lm_head`` gets its own copy of the (tied) embedding matrix.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.mkldnn import MkldnnLinear
from transformers.pytorch_utils import Conv1D


def available() -> bool:
    return torch.backends.mkldnn.is_available()


def to_onednn(model: nn.Module) -> int:
    """Replace every Conv1D and Linear projection with a oneDNN linear; returns the count."""
    replaced = 0
    with torch.no_grad():
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, Conv1D):
                    weight, bias = child.weight.t(), child.bias
                elif type(child) is nn.Linear:
                    weight, bias = child.weight, child.bias
                else:
                    continue
                linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
                linear.weight.copy_(weight)
                if bias is not None:
                    linear.bias.copy_(bias)
                setattr(parent, name, MkldnnLinear(linear, torch.float32))
                replaced += 1
    return replaced
