"""Exercises of notebook 07_loading_real_weights."""

from __future__ import annotations

import torch
from ...io.convert import permute_qk

from .checking import Cases, register, _gen


def _permute_cases() -> Cases:
    g = _gen(9)
    return [("one head of 8 rows", (torch.randn(8, 3, generator=g), 1)), ("4 heads of 8", (torch.randn(32, 16, generator=g), 4)),
            ("8 heads of 8", (torch.randn(64, 64, generator=g), 8))]


register(
    "permute_qk", "07_loading_real_weights", "(w, n_heads)",
    "reorder the rows of a q/k weight, head by head, from Meta's interleaved pairs to Hugging Face's halves",
    reference=permute_qk,
    cases=_permute_cases,
    mistakes=[
        (lambda w, n: w.view(n, 2, w.shape[0] // n // 2, w.shape[1]).transpose(1, 2).reshape(w.shape),
         "that is the inverse (Hugging Face -> Meta)", "view as (heads, head_dim // 2, 2, in): pairs first, then re/im"),
        (lambda w, n: w.view(w.shape[0] // 2, 2, w.shape[1]).transpose(0, 1).reshape(w.shape),
         "the whole matrix is permuted at once; each head must be permuted on its own", "view as (n_heads, head_dim // 2, 2, in_features)"),
        (lambda w, n: w.view(n, w.shape[0] // n // 2, 2, w.shape[1]).reshape(w.shape),
         "the weight comes back unchanged: the transpose(1, 2) between the view and the reshape is missing",
         "w.view(n_heads, head_dim // 2, 2, in).transpose(1, 2).reshape(out, in)"),
        (lambda w, n: permute_qk(w.T.contiguous(), n).T if w.shape[1] % (2 * n) == 0 else w.T,
         "the columns are permuted instead of the rows: the heads are stacked along the rows (out_features) of q_proj/k_proj",
         "permute the rows: w.view(n_heads, head_dim // 2, 2, in_features)"),
        (lambda w, n: w.view(n, w.shape[0] // n // 2, 2, w.shape[1]).transpose(1, 2),
         "the result keeps the 4-D view (n_heads, 2, head_dim // 2, in_features)", "reshape back to w.shape at the end"),
        (lambda w, n: w.view(n, w.shape[0] // n // 2, 2, w.shape[1]).transpose(1, 2).flip(1).reshape(w.shape),
         "the imaginary rows (Meta's odd rows) come first in each head; the real rows (0, 2, 4, ...) come first",
         "w.view(n_heads, head_dim // 2, 2, in).transpose(1, 2).reshape(out, in), without reordering the two halves"),
        (lambda w, n: w.view(n, w.shape[1] // n // 2, 2, w.shape[0]).transpose(1, 2).reshape(w.shape),
         "head_dim is computed from the columns (w.shape[1]); the heads are stacked along the rows: head_dim = w.shape[0] // n_heads",
         "w.view(n_heads, w.shape[0] // n_heads // 2, 2, w.shape[1])"),
    ],
)
