"""``config.pretraining_tp``: reproduce the rounding of Meta's tensor-parallel pretraining.

Meta trained Llama 2 with each projection split over ``pretraining_tp`` devices. transformers
can compute every linear layer in the same slices, so that a model's outputs match the numbers
of that setting to the last bit: mathematically it is the plain ``x W^T``. This module swaps the
projections of a built model for :class:`SlicedLinear` (same parameters, same state-dict keys).
Notebook 16 shows the real tensor parallelism this emulates.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Projections whose weight rows (outputs) are split, and those whose columns (inputs) are.
SPLIT_OUTPUT = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "lm_head")
SPLIT_INPUT = ("o_proj", "down_proj")


class SlicedLinear(nn.Linear):
    """``nn.Linear`` computed in ``slices`` pieces: rows of the weight (outputs concatenated)
    or, with ``split_input``, its columns (partial products summed)."""

    def __init__(self, linear: nn.Linear, slices: int, split_input: bool):
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        self.weight, self.bias = linear.weight, linear.bias  # the same Parameters, not copies
        self.slices, self.split_input = slices, split_input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.split_input:
            out = sum(F.linear(xi, wi) for xi, wi in zip(x.chunk(self.slices, -1), self.weight.chunk(self.slices, 1)))
        else:
            out = torch.cat([F.linear(x, w) for w in self.weight.chunk(self.slices, 0)], dim=-1)
        return out if self.bias is None else out + self.bias


def apply_pretraining_tp(model: nn.Module, slices: int) -> None:
    """Replace the model's projections (and LM head) by :class:`SlicedLinear` in place."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and name in SPLIT_OUTPUT + SPLIT_INPUT:
                setattr(parent, name, SlicedLinear(child, slices, split_input=name in SPLIT_INPUT))
