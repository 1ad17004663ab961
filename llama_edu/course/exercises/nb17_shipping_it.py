"""Notebook 17's exercise: the Q8_0 block quantizer of GGUF files (registered on import).

    from llama_edu.exercises import check
    check("q8_0_quantize", my_q8_0_quantize)
"""

from __future__ import annotations

from typing import Callable

import torch

from .checking import Cases, register
from ...io.gguf import QK8_0, quantize_q8_0


def _cases() -> Cases:
    g = torch.Generator().manual_seed(0)
    ties = torch.cat([torch.tensor([127.0]), torch.arange(31) - 14.5]).reshape(1, 32)  # d = 1: x / d ends in .5
    negative = torch.randn(1, 32, generator=g)
    negative[0, 7] = -9.0  # the largest magnitude is negative
    zero_block = torch.cat([torch.zeros(1, 32), torch.randn(1, 32, generator=g)], dim=1)
    return [
        ("random (4, 64)", (torch.randn(4, 64, generator=g) * 0.02,)),
        ("halves: values 127, -14.5 ... 15.5 (scale 1)", (ties,)),
        ("a block whose largest magnitude is negative", (negative,)),
        ("an all-zero block, then a random one", (zero_block,)),
        ("random (3, 96)", (torch.randn(3, 96, generator=g),)),
    ]


def _variant(w: torch.Tensor, scale_of: Callable | None = None, rounding: Callable | None = None,
             scale_dtype: torch.dtype = torch.float16, scale_first: bool = True, levels: int = 127) -> torch.Tensor:
    x = w.float().reshape(-1, QK8_0)
    d = (scale_of or (lambda x: x.abs().amax(dim=1, keepdim=True)))(x) / levels
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    v = x * inv
    q = (rounding or (lambda v: torch.sign(v) * torch.floor(v.abs() + 0.5)))(v).to(torch.int8).view(torch.uint8)
    s = d.to(scale_dtype).view(torch.uint8)
    blocks = torch.cat([s, q] if scale_first else [q, s], dim=1)
    return blocks.reshape(w.shape[0], -1)


def _divided_by_float16_scale(w: torch.Tensor) -> torch.Tensor:
    x = w.float().reshape(-1, QK8_0)
    d = (x.abs().amax(dim=1, keepdim=True) / 127).half().float()
    v = torch.where(d == 0, torch.zeros_like(x), x / d)
    q = (torch.sign(v) * torch.floor(v.abs() + 0.5)).to(torch.int8).view(torch.uint8)
    return torch.cat([d.half().view(torch.uint8), q], dim=1).reshape(w.shape[0], -1)


register(
    "q8_0_quantize", "17_shipping_it", "(w)",
    "GGUF's Q8_0 of a (rows, n) float weight, n a multiple of 32: per block of 32 values, d = max|x| / 127 as "
    "float16 then the 32 int8 q = round(x / d) (half away from zero; 0 for an all-zero block); return uint8 "
    "(rows, n // 32 * 34), the blocks' bytes in order",
    reference=quantize_q8_0,
    cases=_cases,
    atol=0.0,
    rtol=0.0,
    mistakes=[
        (lambda w: _variant(w, rounding=torch.round), "halves are rounded to even (torch.round): 2.5 -> 2, but ggml's roundf "
         "rounds half away from zero (2.5 -> 3, -2.5 -> -3)", "round with torch.sign(v) * torch.floor(v.abs() + 0.5)"),
        (lambda w: _variant(w, scale_of=lambda x: x.amax(dim=1, keepdim=True)), "the scale comes from max(x), not max|x|: a "
         "block whose largest magnitude is negative overflows int8", "d = x.abs().amax(dim=1, keepdim=True) / 127"),
        (lambda w: _variant(w, scale_first=False), "the scale is written after the 32 quants; a Q8_0 block starts with "
         "its fp16 scale", "torch.cat([d_bytes, q_bytes], dim=1)"),
        (lambda w: _variant(w, scale_dtype=torch.float32), "the scale is stored as float32 (4 bytes, 36-byte blocks); "
         "Q8_0 stores it as float16 (2 bytes, 34-byte blocks)", "d.half().view(torch.uint8)"),
        (lambda w: _variant(w, levels=128), "the scale divides by 128: int8 codes here run -127..127, so the largest "
         "magnitude must map to 127", "d = max|x| / 127"),
        (lambda w: _variant(w, scale_of=lambda x: x.abs().amax().expand(x.shape[0], 1)),
         "one scale for the whole tensor; Q8_0 has one scale per block of 32 values", "d = x.reshape(-1, 32).abs().amax(dim=1, keepdim=True) / 127"),
        (lambda w: _variant(w, rounding=torch.trunc), "the values are truncated toward zero (.to(torch.int8) alone), not rounded",
         "round half away from zero: torch.sign(v) * torch.floor(v.abs() + 0.5)"),
        (_divided_by_float16_scale, "the values are divided by the float16-rounded scale; ggml computes q with the float32 d "
         "(x * (1 / d)) and only stores d as float16", "d = max|x| / 127 in float32 for the division; d.half() for the two scale bytes"),
        (lambda w: _variant(w).view(torch.int8), "the bytes are int8 (dtype); the file's bytes are uint8", "finish with .view(torch.uint8)"),
    ],
)
