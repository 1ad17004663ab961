"""Exercises of notebook 14_quantization."""

from __future__ import annotations

import warnings

import torch
from ...quant.quantize import NF4_CODE, absmax_dequantize, absmax_quantize, blockwise_dequantize, blockwise_quantize, pack_codes, unpack_codes

from .checking import Cases, register, _gen


def _absmax_cases() -> Cases:
    g = _gen(14)
    w = torch.randn(6, 32, generator=g) * 0.05
    outlier = w.clone()
    outlier[2, 7] = 1.5  # one large weight: a per-tensor scale would crush every other row
    zero_row = torch.randn(3, 8, generator=g)
    zero_row[1] = 0.0
    return [("random 6x32", (w,)), ("an outlier in row 2", (outlier,)), ("a row of zeros (scale 1)", (zero_row,)),
            ("wide matrix 2x64", (torch.randn(2, 64, generator=g) * 3,))]


def _absmax_variant(w, scale_of=lambda w: w.abs().amax(dim=1), levels=127, rounding=torch.round):
    absmax = scale_of(w.float())
    scale = torch.where(absmax > 0, absmax / levels, torch.ones_like(absmax))
    scale = scale.expand(w.shape[0]).clone() if scale.dim() == 0 else scale
    return rounding(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def _absmax_per_column(w):
    absmax = w.float().abs().amax(dim=0)  # (cols,)
    scale = torch.where(absmax > 0, absmax / 127, torch.ones_like(absmax))
    return torch.round(w / scale[None, :]).clamp(-127, 127).to(torch.int8), scale


def _absmax_inverted(w):
    absmax = w.float().abs().amax(dim=1)
    scale = torch.where(absmax > 0, 127 / absmax, torch.ones_like(absmax))
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def _absmax_no_zero_guard(w):
    scale = w.float().abs().amax(dim=1) / 127
    return torch.round(w / scale[:, None]).nan_to_num(0).clamp(-127, 127).to(torch.int8), scale


register(
    "absmax_quantize", "14_quantization", "(w)",
    "int8 absmax quantization of a (rows, cols) weight, one scale per row: scale = max|row| / 127 (1 for an all-zero row), "
    "q = round(w / scale) as int8; return (q, scale) with scale of shape (rows,)",
    reference=absmax_quantize,
    cases=_absmax_cases,
    mistakes=[
        (lambda w: _absmax_variant(w, scale_of=lambda w: w.abs().max()), "one scale for the whole tensor instead of one per row",
         "take the absmax of each row: w.abs().amax(dim=1)"),
        (_absmax_per_column,
         "one scale per column (input channel) instead of one per row (output channel)", "reduce over the last dimension: amax(dim=1)"),
        (lambda w: _absmax_variant(w, rounding=torch.trunc), "the division is truncated toward zero (.to(torch.int8) alone), not rounded",
         "round first: torch.round(w / scale[:, None]).to(torch.int8)"),
        (lambda w: _absmax_variant(w, rounding=torch.floor), "the division is floored (rounded down), not rounded to the nearest integer",
         "use torch.round"),
        (lambda w: _absmax_variant(w, levels=128), "the scale divides by 128: the grid is -127..127, so the largest weight must map to 127",
         "scale = absmax / 127"),
        (lambda w: (lambda s: (torch.round(w / s[:, None]).to(torch.int8), s))(torch.where(w.abs().amax(1) > 0, w.abs().amax(1) / 255, 1.0)), "the scale divides by 255 (the uint8 range); int8 codes here run -127..127, so max|row| maps to 127",
         "scale = absmax / 127"),
        (lambda w: _absmax_variant(w, levels=1), "the scale is max|row| without the / 127: every code lands in -1..1",
         "scale = absmax / 127, so the largest weight maps to 127"),
        (lambda w: _absmax_variant(w, scale_of=lambda w: w.amax(dim=1)), "the scale comes from max(row), not max|row|: a row whose largest magnitude is negative overflows",
         "w.abs().amax(dim=1)"),
        (_absmax_inverted, "the scale is inverted (127 / absmax): quantizing divides by absmax / 127", "scale = absmax / 127; q = round(w / scale)"),
        (_absmax_no_zero_guard, "an all-zero row gets scale 0 and 0 / 0 = NaN; its scale must be 1", "torch.where(absmax > 0, absmax / 127, 1)"),
    ],
)


def _dequant_cases() -> Cases:
    out = []
    for label, (w,) in _absmax_cases():
        out.append((label, absmax_quantize(w)))
    return out


register(
    "absmax_dequantize", "14_quantization", "(q, scale)",
    "float32 weights (rows, cols) back from int8 codes q (rows, cols) and per-row scales (rows,): q * scale of its row",
    reference=absmax_dequantize,
    cases=_dequant_cases,
    mistakes=[
        (lambda q, scale: q.float() * scale, "the scales are broadcast along the columns (q * scale, scale[None, :] or unsqueeze(0)): each row has its own scale",
         "give the scale a column axis: q.float() * scale[:, None]"),
        (lambda q, scale: q.float() / scale[:, None], "the codes are divided by the scale; dequantizing multiplies",
         "w_hat = q * scale[:, None]"),
        (lambda q, scale: q.float() * scale[:, None] / 127, "the scale is divided by 127 again; it already is absmax / 127",
         "multiply by the scale as it is"),
        (lambda q, scale: (q.float() * scale[:, None]).half(), "the result is float16 (dtype); dequantized weights are float32", "q.float() * scale[:, None]"),
        (lambda q, scale: q.float() * scale[:, None] * 127, "the codes are multiplied by 127 again; the scale already is absmax / 127",
         "q.float() * scale[:, None]"),
        (lambda q, scale: (q.float() * scale[:, None]).round().to(torch.int8), "the result is cast back to int8 (dtype): dequantized weights are float32",
         "return q.float() * scale[:, None]"),
        (lambda q, scale: q * scale[:, None].to(torch.int8), "the scale is cast to int8 (it rounds to 0): the product must be in float32",
         "q.float() * scale[:, None]"),
    ],
)


def _nf4_lookup_cases() -> Cases:
    g = _gen(41)
    out = []
    for label, n in (("one block of 64", 64), ("five blocks", 320), ("a big block scale", 128)):
        w = torch.randn(n, generator=g) * (0.03 if n != 128 else 2.0)
        codes, absmax = blockwise_quantize(w, NF4_CODE, 64)
        out.append((label, (pack_codes(codes, 4), absmax, NF4_CODE.clone())))
    return out


def _nf4_lookup_reference(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    return blockwise_dequantize(unpack_codes(packed, 4, 2 * packed.numel()), absmax, code, 64)


def _nf4_low_first(packed, absmax, code):
    idx = torch.stack([packed & 0xF, packed >> 4], dim=1).reshape(-1)
    return (code[idx.long()].reshape(-1, 64) * absmax[:, None]).reshape(-1)


def _nf4_byte_indices(packed, absmax, code):
    with warnings.catch_warnings():  # torch warns that uint8 indices are masks; the checker's run must not print it
        warnings.simplefilter("ignore")
        return (code[torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)].reshape(-1, 64) * absmax[:, None]).reshape(-1)


def _nf4_tiled_scales(packed, absmax, code):
    idx = torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)
    return code[idx.long()] * absmax.repeat(64)


register(
    "nf4_lookup", "14_quantization", "(packed, absmax, code)",
    "NF4 weights from packed bytes (two 4-bit indices per byte, the first in the high nibble), the absmax of each "
    "block of 64 values (n / 64,) and the 16-value codebook: code[index] * absmax of its block, shape (n,)",
    reference=_nf4_lookup_reference,
    cases=_nf4_lookup_cases,
    mistakes=[
        (_nf4_low_first, "the low nibble is taken as the first value; the first value is in the high nibble (bitsandbytes' order)",
         "first = packed >> 4, second = packed & 0xF, interleaved with torch.stack(..., dim=1).reshape(-1)"),
        (_nf4_tiled_scales, "the block scales are tiled (absmax.repeat) instead of repeated per block: values 0..63 belong to block 0",
         "use absmax.repeat_interleave(64), or reshape the values to (-1, 64) and multiply by absmax[:, None]"),
        (lambda packed, absmax, code: code[torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1).long()],
         "the codebook values are not multiplied by their block's absmax", "multiply each block of 64 by its absmax"),
        (lambda packed, absmax, code: ((torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1).float() - 7.5) / 7.5).reshape(-1, 64).mul(absmax[:, None]).reshape(-1),
         "the 4-bit index is used as a uniform number; NF4 looks it up in the codebook", "index the codebook: code[index.long()]"),
        (lambda packed, absmax, code: (code[torch.cat([packed >> 4, packed & 0xF]).long()].reshape(-1, 64) * absmax[:, None]).reshape(-1),
         "all the high nibbles come first, then all the low ones (cat); the two values of each byte are neighbours (stack along dim 1)",
         "torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)"),
        (lambda packed, absmax, code: (code[torch.stack([(packed & 0xF0), packed & 0xF], dim=1).reshape(-1).long().clamp(max=15)].reshape(-1, 64) * absmax[:, None]).reshape(-1),
         "the high nibble is masked with 0xF0 but not shifted: it stays 16 times too large", "packed >> 4 (or (packed & 0xF0) >> 4)"),
        (lambda packed, absmax, code: code[torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1).long()] * absmax,
         "absmax is not expanded to its block: it has one value per 64 weights", "absmax.repeat_interleave(64), or reshape the values to (-1, 64) and multiply by absmax[:, None]"),
        (lambda packed, absmax, code: (code[torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1).long()].reshape(-1, 64) / absmax[:, None]).reshape(-1),
         "the codebook values are divided by their block's absmax; dequantizing multiplies", "code[index] * absmax of the block"),
        (_nf4_byte_indices,
         "the indices stay uint8, and a uint8 (byte) tensor used as an index is read as a boolean mask", "convert the indices: code[index.long()]"),
    ],
)
