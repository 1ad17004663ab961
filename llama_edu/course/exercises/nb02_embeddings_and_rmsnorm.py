"""Exercises of notebook 02_embeddings_and_rmsnorm."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from ...rmsnorm import LlamaRMSNorm

from .checking import Cases, register, _gen


def _rms_norm_reference(hidden_states: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    norm = LlamaRMSNorm(weight.shape[0], eps).to(weight.dtype)
    norm.weight.data = weight
    return norm(hidden_states)


def _rms_norm_cases() -> Cases:
    g = _gen(1)
    return [
        ("random (2, 3, 16)", (torch.randn(2, 3, 16, generator=g), torch.rand(16, generator=g) + 0.5, 1e-6)),
        ("large values x100", (torch.randn(5, 64, generator=g) * 100, torch.rand(64, generator=g), 1e-5)),
        ("tiny norms (values ~1e-3, eps 1e-5)", (torch.randn(4, 32, generator=g) * 1e-3, torch.rand(32, generator=g) + 0.5, 1e-5)),
        ("an all-zero row", (torch.zeros(2, 8), torch.ones(8), 1e-6)),
        ("float16 values ~300 (x**2 overflows float16)", ((torch.randn(3, 32, generator=g) * 300).half(), (torch.rand(32, generator=g) + 0.5).half(), 1e-6)),
        ("bfloat16", (torch.randn(4, 32, generator=g).bfloat16(), torch.rand(32, generator=g).bfloat16(), 1e-6)),
    ]


register(
    "rms_norm", "02_embeddings_and_rmsnorm", "(hidden_states, weight, eps)",
    "RMSNorm over the last dimension, computed in float32 and cast back to the input dtype, times weight",
    reference=_rms_norm_reference,
    cases=_rms_norm_cases,
    mistakes=[
        (lambda h, w, eps: w * (h.float() / (h.float().pow(2).mean(-1, keepdim=True).sqrt() + eps)).to(h.dtype),
         "eps is added outside the square root: x / (sqrt(mean(x^2)) + eps)",
         "eps belongs inside: x * rsqrt(mean(x^2) + eps); it matters when the norm is tiny"),
        (lambda h, w, eps: w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)),
         "no float32 upcast: in float16, 300**2 = 90000 overflows to inf (the largest float16 is 65504)",
         "compute in float32 (x = hidden_states.float()) and cast back with .to(hidden_states.dtype) before multiplying by weight"),
        (lambda h, w, eps: w * (h.float() * torch.rsqrt(h.float().pow(2).mean(-1, keepdim=True))).to(h.dtype),
         "no eps: an all-zero row gives 0/0 = NaN", "add eps inside the square root"),
        (lambda h, w, eps: w * F.layer_norm(h.float(), h.shape[-1:], eps=eps).to(h.dtype),
         "that is LayerNorm: RMSNorm does not subtract the mean", "divide by the root of the mean of squares, without centring"),
        (lambda h, w, eps: w * (h.float() * torch.rsqrt(h.float().pow(2).sum(-1, keepdim=True) + eps)).to(h.dtype),
         "you used the sum of squares instead of the mean", "use .mean(-1, keepdim=True)"),
        (lambda h, w, eps: w * (h.float() / h.float().norm(dim=-1, keepdim=True).clamp_min(eps)).to(h.dtype),
         "you divided by the L2 norm (the root of the sum of squares): RMS is the root of the mean, smaller by sqrt(d)",
         "torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)"),
        (lambda h, w, eps: w * (h.float() * torch.rsqrt(h.float().pow(2).mean(0, keepdim=True) + eps)).to(h.dtype),
         "the mean of squares is taken over the wrong dimension (dim 0, across tokens); each token's vector is normalised on its own",
         "average over the last dimension: .mean(-1, keepdim=True)"),
        (lambda h, w, eps: w * (h.float() * torch.rsqrt(h.float().pow(2).mean(-1) + eps)).to(h.dtype),
         "the mean lost its dimension (no keepdim), so it broadcasts against the wrong axis",
         "use .mean(-1, keepdim=True) so that (..., d) is divided by (..., 1)"),
        (lambda h, w, eps: (h.float() * torch.rsqrt(h.float().pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype),
         "the learned gain `weight` is missing", "multiply the normalised values by weight"),
        (lambda h, w, eps: w * (h.float() * torch.rsqrt(h.float().var(-1, keepdim=True) + eps)).to(h.dtype),
         "you divided by the standard deviation (var subtracts the mean and divides by d - 1): RMSNorm uses the mean of squares, not the variance",
         "torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps), without centring"),
        (lambda h, w, eps: w * (h.float() * torch.rsqrt(h.float().var(-1, keepdim=True, unbiased=False) + eps)).to(h.dtype),
         "you divided by the standard deviation (var subtracts the mean): RMSNorm uses the mean of squares, not the variance",
         "torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps), without centring"),
        (lambda h, w, eps: w * (h.float() / (h.float().pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype),
         "the values are divided by the mean of squares, not by its square root (sqrt is missing)", "x * torch.rsqrt(mean(x^2) + eps)"),
        (lambda h, w, eps: w * (h.float() * torch.sqrt(h.float().pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype),
         "the values are multiplied by the RMS instead of divided by it (sqrt where rsqrt belongs)",
         "x * torch.rsqrt(mean(x^2) + eps), or x / torch.sqrt(mean(x^2) + eps)"),
        (lambda h, w, eps: w + (h.float() * torch.rsqrt(h.float().pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype),
         "the gain `weight` is added; it multiplies the normalised values", "weight * normalised"),
        (lambda h, w, eps: w * (h.float() * torch.rsqrt(h.float().pow(2).mean(1, keepdim=True) + eps)).to(h.dtype),
         "the mean of squares is taken over dim 1, which is the last dimension only for 2-D inputs; for (batch, seq, hidden) it averages over the tokens",
         "average over the last dimension: .mean(-1, keepdim=True)"),
        (lambda h, w, eps: w * (h.float() * torch.rsqrt(h.float().pow(2).mean() + eps)).to(h.dtype),
         "the mean of squares is taken over the whole tensor (no dim): each token's vector is normalised on its own",
         "average over the last dimension: .mean(-1, keepdim=True)"),
        (lambda h, w, eps: w * (h.float() / (h.float().abs().mean(-1, keepdim=True) + eps)).to(h.dtype),
         "you divided by the mean of the absolute values; RMS is the square root of the mean of the squares",
         "torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)"),
        (lambda h, w, eps: w * (h.float() * torch.rsqrt(h.float().pow(2).mean(-1, keepdim=True) + eps)),
         "the result stays float32 (dtype): the normalised values must be cast back to the input dtype before the weight",
         "(x * rsqrt(...)).to(hidden_states.dtype), then times weight"),
    ],
)
