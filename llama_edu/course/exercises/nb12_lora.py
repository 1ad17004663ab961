"""Exercises of notebook 12_lora."""

from __future__ import annotations

import torch
from ...training.lora import lora_forward

from .checking import Cases, register, _gen


def _lora_cases() -> Cases:
    g = _gen(120)
    return [
        # in != out: a missing transpose raises; alpha / r = 2
        ("x (2, 3, 16), W (24, 16), r = 4, alpha = 8",
         (torch.randn(2, 3, 16, generator=g), torch.randn(24, 16, generator=g), torch.randn(4, 16, generator=g), torch.randn(24, 4, generator=g), 8, 4)),
        # square W, so a missing transpose gives numbers (the wrong ones); alpha / r = 0.25
        ("x (5, 16), square W (16, 16), r = 4, alpha = 1",
         (torch.randn(5, 16, generator=g), torch.randn(16, 16, generator=g), torch.randn(4, 16, generator=g), torch.randn(16, 4, generator=g), 1, 4)),
        ("x (4, 12), W (12, 12), r = 2, alpha = 16",
         (torch.randn(4, 12, generator=g), torch.randn(12, 12, generator=g), torch.randn(2, 12, generator=g), torch.randn(12, 2, generator=g), 16, 2)),
    ]


register(
    "lora_forward", "12_lora", "(x, weight, lora_A, lora_B, alpha, r)",
    "a LoRA-adapted linear layer for row vectors: x W^T + (alpha / r) x A^T B^T (Hu et al. 2021: eq. 3, with the alpha / r scale of section 4.1)",
    reference=lora_forward,
    cases=_lora_cases,
    mistakes=[
        (lambda x, w, a, b, alpha, r: x @ w.t() + x @ a.t() @ b.t(),
         "the low-rank update is not scaled by alpha / r", "multiply the update x A^T B^T by alpha / r"),
        (lambda x, w, a, b, alpha, r: x @ w.t() + alpha * (x @ a.t() @ b.t()),
         "the update is scaled by alpha, not alpha / r", "divide by the rank: alpha / r"),
        (lambda x, w, a, b, alpha, r: x @ w.t() + (r / alpha) * (x @ a.t() @ b.t()),
         "the scale is upside down: r / alpha instead of alpha / r", "use alpha / r"),
        (lambda x, w, a, b, alpha, r: x @ w + (alpha / r) * (x @ a.t() @ b.t()),
         "the frozen weight is not transposed: W is (out, in), so a row vector x needs x W^T", "use x @ weight.T"),
        (lambda x, w, a, b, alpha, r: x @ w.t() + (alpha / r) * (x @ (b @ a)),
         "the update multiplies x by B A instead of (B A)^T", "for row vectors the update is x A^T B^T = x (B A)^T"),
        (lambda x, w, a, b, alpha, r: x @ w.t() + (alpha / r) * (x @ b.t() @ a.t()),
         "B and A are applied in the wrong order: x goes through A (r, in) first, then B (out, r)", "compute (x @ A.T) @ B.T"),
        (lambda x, w, a, b, alpha, r: (alpha / r) * (x @ a.t() @ b.t()),
         "the frozen base output x W^T is missing: LoRA adds to the pretrained layer, it does not replace it", "return x @ W.T + the update"),
        (lambda x, w, a, b, alpha, r: x @ w.t() + (alpha // r) * (x @ a.t() @ b.t()),
         "alpha // r is integer division: alpha = 1, r = 4 gives 0 and the update vanishes", "use true division: alpha / r"),
        (lambda x, w, a, b, alpha, r: (alpha / r) * (x @ w.t() + x @ a.t() @ b.t()),
         "alpha / r scales the whole output; it scales only the low-rank update", "x @ W.T + (alpha / r) * (x @ A.T @ B.T)"),
        (lambda x, w, a, b, alpha, r: x @ w.t() + (alpha / r) * (x @ a @ b),
         "A and B are not transposed: they are stored (r, in) and (out, r), so a row vector needs x A^T B^T",
         "(x @ lora_A.T) @ lora_B.T"),
        (lambda x, w, a, b, alpha, r: x @ w.t() + (alpha / r) * (x @ a.t() @ b),
         "lora_B is not transposed: it is stored (out, r), so the update is (x A^T) B^T", "(x @ lora_A.T) @ lora_B.T"),
        (lambda x, w, a, b, alpha, r: x @ w.t() - (alpha / r) * (x @ a.t() @ b.t()),
         "the update is subtracted (sign); LoRA adds it", "x @ W.T + (alpha / r) * update"),
        (lambda x, w, a, b, alpha, r: x @ w.t() + (alpha / r) ** 0.5 * (x @ a.t() @ b.t()),
         "the scale is sqrt(alpha / r) (rsLoRA-like); here it is alpha / r", "multiply by alpha / r"),
    ],
)
