"""The SwiGLU feed-forward block (Shazeer 2020, "GLU Variants Improve Transformer", eq. 6):

    FFN(x) = down_proj( act(gate_proj(x)) * up_proj(x) )      with act = SiLU for Llama.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import LlamaConfig

ACT2FN = {
    "silu": F.silu,
    "swish": F.silu,
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


def sliced_linear(x: torch.Tensor, layer: nn.Linear, slices: int, split_input: bool = False) -> torch.Tensor:
    """``layer(x)`` computed in ``slices`` pieces, as Meta's tensor-parallel pretraining did
    (``pretraining_tp``); mathematically equal, it reproduces their rounding exactly.
    Rows of the weight are split (outputs concatenated), or with ``split_input`` its columns
    (partial products summed)."""
    if slices == 1:
        return layer(x)
    if split_input:
        out = sum(F.linear(xi, wi) for xi, wi in zip(x.chunk(slices, -1), layer.weight.chunk(slices, 1)))
    else:
        out = torch.cat([F.linear(x, w) for w in layer.weight.chunk(slices, 0)], dim=-1)
    return out if layer.bias is None else out + layer.bias


class LlamaMLP(nn.Module):
    """(batch, seq, hidden_size) -> (batch, seq, hidden_size) through intermediate_size."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.hidden_size = config.hidden_size
        self.intermediate_size = config.intermediate_size
        self.gate_proj = nn.Linear(self.hidden_size, self.intermediate_size, bias=False)
        self.up_proj = nn.Linear(self.hidden_size, self.intermediate_size, bias=False)
        self.down_proj = nn.Linear(self.intermediate_size, self.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tp = self.config.pretraining_tp
        gate = sliced_linear(x, self.gate_proj, tp)  # (batch, seq, intermediate)
        up = sliced_linear(x, self.up_proj, tp)
        return sliced_linear(self.act_fn(gate) * up, self.down_proj, tp, split_input=True)
