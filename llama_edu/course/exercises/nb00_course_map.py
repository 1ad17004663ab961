"""Exercises of notebook 00_course_map."""

from __future__ import annotations

import torch

from .checking import Cases, register, _gen


def _softmax_cases() -> Cases:
    g = _gen(0)
    return [
        ("three logits", (torch.tensor([2.0, 1.0, 0.1]), -1)),
        ("random 3x7 over dim=1", (torch.randn(3, 7, generator=g), 1)),
        ("random 4x5 over dim=0", (torch.randn(4, 5, generator=g), 0)),
        ("logits around 1000", (torch.tensor([[1000.0, 1001.0, 1002.0], [-5.0, 0.0, 5.0]]), -1)),
        ("float16 logits up to 40 (exp overflows float16)", (torch.tensor([[40.0, 38.0, 0.0, -3.0]]).half(), -1)),
        ("a masked logit (-inf)", (torch.tensor([[0.5, float("-inf"), 1.5]]), -1)),
    ]


register(
    "softmax", "00_course_map", "(x, dim)", "softmax along `dim`, stable for large inputs",
    reference=torch.softmax,
    cases=_softmax_cases,
    mistakes=[
        (lambda x, dim: x.exp() / x.exp().sum(dim, keepdim=True),
         "exp(x) overflows for large inputs (exp(1000) = inf in float32, exp(12) already > 65504 in float16), and inf/inf = NaN",
         "subtract the maximum along `dim` first (x - x.max(dim, keepdim=True).values): it cancels in the ratio, and the largest exponent becomes exp(0) = 1"),
        (lambda x, dim: torch.softmax(x, -1),
         "you normalised over the last dimension whatever `dim` says", "use `dim` in max and sum"),
        (lambda x, dim: (x - x.max(dim, keepdim=True).values).exp() / (x - x.max(dim, keepdim=True).values).exp().sum(),
         "you divided by the sum of all the elements, not the sum along `dim`", "e.sum(dim, keepdim=True)"),
        (lambda x, dim: (x - x.max()).exp() / (x - x.max()).exp().sum(dim, keepdim=True),
         "you subtracted the maximum of the whole tensor, not of each slice along `dim`: a row far below the largest value underflows to exp(-1000) = 0, and 0/0 = NaN",
         "x.max(dim, keepdim=True).values: each row's own maximum"),
        (lambda x, dim: torch.log_softmax(x, dim),
         "you returned log-probabilities (log_softmax: x - logsumexp(x)); softmax is their exponential", "exponentiate: e = exp(x - max), then e / e.sum(dim, keepdim=True)"),
        (lambda x, dim: (x - x.max()).exp() / (x - x.max()).exp().sum(),
         "you divided by the sum of all the elements, not the sum along `dim`", "e.sum(dim, keepdim=True)"),
        (lambda x, dim: (x - x.max(dim, keepdim=True).values).exp() / (x - x.max(dim, keepdim=True).values).exp().sum(dim),
         "the sum (or the max) lost its dimension (no keepdim=True), so it broadcasts against the wrong axis",
         "sum and max with keepdim=True keep a size-1 axis that lines up with `dim`"),
        (lambda x, dim: (x - x.max(dim, keepdim=True).values).exp() / x.exp().sum(dim, keepdim=True),
         "the maximum is subtracted in the numerator only: the denominator sums exp(x) without the shift (and overflows)",
         "e = exp(x - max) once, then e / e.sum(dim, keepdim=True): the same shifted exponentials on both sides"),
        (lambda x, dim: (x - x.min(dim, keepdim=True).values).exp() / (x - x.min(dim, keepdim=True).values).exp().sum(dim, keepdim=True),
         "you subtracted the minimum, not the maximum: the largest exponent can still overflow",
         "subtract x.max(dim, keepdim=True).values so the largest exponent is exp(0) = 1"),
        (lambda x, dim: torch.softmax(x, 0),
         "you normalised over dim 0 whatever `dim` says", "use `dim` in max and sum"),
        (lambda x, dim: (x - x.max(dim, keepdim=True).values).exp() / (x - x.max(dim, keepdim=True).values).exp().max(dim, keepdim=True).values,
         "you divided by the maximum, not the sum, of the exponentials", "e / e.sum(dim, keepdim=True)"),
        (lambda x, dim: torch.softmax(x.float(), dim),
         "the result is float32 for a float16 input (dtype): computing in float32 is right, but cast back",
         "return the probabilities .to(x.dtype)"),
    ],
)
