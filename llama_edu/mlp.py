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


def swiglu_hidden_size(hidden_size: int, multiple_of: int = 256, ffn_dim_multiplier: float | None = None) -> int:
    """Llama's feed-forward width (Meta's ``FeedForward``): 2/3 of 4 * hidden_size, scaled by
    ``ffn_dim_multiplier``, rounded up to a multiple of ``multiple_of``. The 2/3 keeps the
    parameter count of a 4x GELU MLP with three matrices instead of two (4096 -> 11008)."""
    hidden = int(2 * (4 * hidden_size) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


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
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
