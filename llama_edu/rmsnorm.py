"""RMSNorm (Zhang & Sennrich, 2019), the normalisation Llama uses instead of LayerNorm.

    y = x / sqrt(mean(x**2) + eps) * weight          (eq. 4 of the paper, no bias, no centring)

It is computed in float32 whatever the input dtype, then cast back: the mean of squares of
bf16/fp16 activations loses too much precision (and can overflow in fp16) otherwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LlamaRMSNorm(nn.Module):
    """Root-mean-square normalisation over the last dimension, with a learned gain ``weight``."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(..., hidden_size) -> (..., hidden_size), in the input's dtype times the weight's."""
        weight = self.weight  # looked up once: an nn.Module attribute lookup is a slow Python call
        # F.rms_norm is the formula above as one call.
        if hidden_states.dtype == torch.float32:
            return F.rms_norm(hidden_states, weight.shape, weight, self.variance_epsilon)
        # Half precision: normalise in float32, round to the input dtype, then scale (as transformers).
        x = F.rms_norm(hidden_states.float(), weight.shape, eps=self.variance_epsilon)
        return weight * x.to(hidden_states.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.variance_epsilon}"
