"""Exercises of notebook 03_rope."""

from __future__ import annotations

import torch
from ...rope import LlamaRotaryEmbedding, apply_rotary_pos_emb, dynamic_ntk_base, rope_inv_freq, rotate_half

from .checking import Cases, register, _gen


def _rotate_half_cases() -> Cases:
    g = _gen(2)
    return [
        ("arange(6)", (torch.arange(6.0),)),
        ("random (2, 3, 5, 8)", (torch.randn(2, 3, 5, 8, generator=g),)),
        ("float16 (1, 4, 7, 128)", (torch.randn(1, 4, 7, 128, generator=g).half(),)),
    ]


def _halves(x):
    return x.chunk(2, dim=-1)


register(
    "rotate_half", "03_rope", "(x)", "(x1, x2) -> (-x2, x1) on the two halves of the last dimension",
    reference=rotate_half,
    cases=_rotate_half_cases,
    mistakes=[
        (lambda x: torch.cat((_halves(x)[1], -_halves(x)[0]), -1),
         "the sign is on the wrong half: (x2, -x1) rotates by -90 degrees",
         "the first half of the output is -x2, the second half x1"),
        (lambda x: torch.cat((_halves(x)[1], _halves(x)[0]), -1), "the halves are swapped but nothing is negated",
         "a 90-degree rotation of (a, b) is (-b, a)"),
        (lambda x: torch.stack((-x[..., 1::2], x[..., ::2]), -1).flatten(-2),
         "you rotated neighbouring pairs (2i, 2i+1), Meta's complex layout; Hugging Face's weights pair i with i + d/2",
         "split into the first and second halves: x1, x2 = x.chunk(2, dim=-1)"),
        (lambda x: torch.cat((-_halves(x)[0], _halves(x)[1]), -1), "the halves are not swapped",
         "output = cat(-x2, x1)"),
        (lambda x: x.flip(-1), "flip reverses the order of the whole last dimension; rotate_half swaps the two halves as blocks and negates one",
         "x1, x2 = x.chunk(2, dim=-1); return torch.cat((-x2, x1), dim=-1)"),
        (lambda x: torch.cat((-_halves(x)[1], _halves(x)[0])),
         "the halves are joined along dim 0 (torch.cat's default), not along the last dimension they were split from",
         "torch.cat((-x2, x1), dim=-1)"),
        (lambda x: torch.cat((-x.chunk(2)[1], x.chunk(2)[0]), -1),
         "the halves are taken along dim 0 (chunk's default), not along the last dimension",
         "x1, x2 = x.chunk(2, dim=-1)"),
        (lambda x: torch.cat((-x[..., x.shape[0] // 2:], x[..., :x.shape[0] // 2]), -1),
         "the split point is x.shape[0] // 2 (the first dimension); the halves are of the last dimension",
         "d = x.shape[-1] // 2; x1, x2 = x[..., :d], x[..., d:]"),
        (lambda x: torch.cat((-_halves(x)[1], -_halves(x)[0]), -1), "both halves are negated; only x2 changes sign",
         "torch.cat((-x2, x1), dim=-1)"),
        (lambda x: torch.stack((x[..., 1::2], -x[..., ::2]), -1).flatten(-2),
         "you rotated neighbouring pairs (2i, 2i+1), Meta's complex layout; Hugging Face's weights pair i with i + d/2",
         "split into the first and second halves: x1, x2 = x.chunk(2, dim=-1)"),
        (lambda x: torch.cat((-x[..., 1::2], x[..., ::2]), -1),
         "the odd and even slots (x[..., 1::2], x[..., ::2]) are not the two halves: x1 is the first half of the last dimension, x2 the second",
         "x1, x2 = x.chunk(2, dim=-1); return torch.cat((-x2, x1), dim=-1)"),
        (lambda x: torch.cat((-_halves(x)[1], _halves(x)[0]), -1).flip(-1),
         "the result is reversed (flip) after the rotation", "return torch.cat((-x2, x1), dim=-1) as it is"),
    ],
)


def _rope_inputs(g, batch, heads, kv_heads, seq, dim, offset=0, base=10000.0, dtype=torch.float32):
    positions = torch.arange(offset, offset + seq)[None].expand(batch, seq)
    cos, sin = LlamaRotaryEmbedding(dim, base=base)(positions, offset + seq, dtype)
    q = torch.randn(batch, heads, seq, dim, generator=g).to(dtype)
    k = torch.randn(batch, kv_heads, seq, dim, generator=g).to(dtype)
    return q, k, cos, sin


def _apply_rope_cases() -> Cases:
    g = _gen(3)
    return [
        ("batch 2, 4 heads, 2 kv heads, 5 positions", _rope_inputs(g, 2, 4, 2, 5, 8)),
        ("batch 3, 3 heads, 3 kv heads (batch = heads)", _rope_inputs(g, 3, 3, 3, 4, 16)),
        ("positions 100..106 (a cache offset)", _rope_inputs(g, 1, 2, 1, 6, 32, offset=100)),
        ("float16", _rope_inputs(g, 1, 4, 4, 3, 64, dtype=torch.float16)),
    ]


def _rope_minus(q, k, cos, sin):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos - rotate_half(q) * sin, k * cos - rotate_half(k) * sin


def _rope_no_unsqueeze(q, k, cos, sin):
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def _rope_cos_sin_swapped(q, k, cos, sin):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * sin + rotate_half(q) * cos, k * sin + rotate_half(k) * cos


def _rope_q_only(q, k, cos, sin):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k


register(
    "apply_rotary_pos_emb", "03_rope", "(q, k, cos, sin)",
    "rotate q (b, heads, seq, d) and k (b, kv_heads, seq, d) by cos/sin (b, seq, d), unsqueezed at dim 1",
    reference=apply_rotary_pos_emb,
    cases=_apply_rope_cases,
    mistakes=[
        (_rope_minus, "the sine term has the wrong sign: q*cos - rotate_half(q)*sin rotates backwards",
         "q_embed = q * cos + rotate_half(q) * sin (rotate_half already holds the minus)"),
        (_rope_no_unsqueeze, "cos and sin were not unsqueezed at dim 1 (not at all, or at dim 0), so (b, seq, d) broadcast against (heads, seq, d): batch lined up with heads",
         "cos, sin = cos.unsqueeze(1), sin.unsqueeze(1) gives (b, 1, seq, d), shared by all heads"),
        (_rope_cos_sin_swapped, "cos and sin are swapped", "x * cos + rotate_half(x) * sin"),
        (lambda q, k, cos, sin: (q * cos.unsqueeze(2) + rotate_half(q) * sin.unsqueeze(2), k * cos.unsqueeze(2) + rotate_half(k) * sin.unsqueeze(2)),
         "cos and sin were unsqueezed at dim 2, giving (b, seq, 1, d); the heads axis of q (b, heads, seq, d) is dim 1",
         "cos.unsqueeze(1), sin.unsqueeze(1): (b, 1, seq, d), shared by all heads"),
        (_rope_q_only, "only q is rotated; k must be rotated too (by its own position)", "apply the same formula to k"),
        (lambda q, k, cos, sin: (q * cos[:, None] + rotate_half(q) * cos[:, None], k * cos[:, None] + rotate_half(k) * cos[:, None]),
         "sin is never used: rotate_half(x) is multiplied by cos too", "x * cos + rotate_half(x) * sin"),
        (lambda q, k, cos, sin: (q * cos[:, None] + q * sin[:, None], k * cos[:, None] + k * sin[:, None]),
         "rotate_half is missing: the sin term multiplies x itself", "x * cos + rotate_half(x) * sin"),
        (lambda q, k, cos, sin: tuple(reversed(apply_rotary_pos_emb(q, k, cos, sin))),
         "q and k are returned in the wrong order", "return (q_embed, k_embed)"),
        (lambda q, k, cos, sin: (q * cos[:, None] + torch.stack((-q[..., 1::2], q[..., ::2]), -1).flatten(-2) * sin[:, None],
                                 k * cos[:, None] + torch.stack((-k[..., 1::2], k[..., ::2]), -1).flatten(-2) * sin[:, None]),
         "the rotation pairs neighbouring dimensions (2i, 2i+1), Meta's layout; rotate_half pairs i with i + d/2 (the halves)",
         "use rotate_half(x) = cat((-x2, x1), -1) on the two halves"),
    ],
)


register(
    "rope_inv_freq", "03_rope", "(head_dim, base)",
    "the rotation frequencies theta_i = base^(-2i/d), i = 0 .. d/2 - 1, as float32 of shape (head_dim // 2,)",
    reference=rope_inv_freq,
    cases=lambda: [("head_dim 8", (8, 10000.0)), ("head_dim 128 (Llama 2)", (128, 10000.0)),
                   ("base 500000", (64, 500000.0)), ("head_dim 2", (2, 10000.0))],
    mistakes=[
        (lambda d, base: 1.0 / base ** (torch.arange(0, d // 2).float() / d),
         "the exponent is i/d instead of 2i/d, so the slowest rotation is far too fast",
         "use torch.arange(0, head_dim, 2) / head_dim (0, 2/d, 4/d, ...)"),
        (lambda d, base: base ** (torch.arange(0, d, 2).float() / d),
         "base^(+2i/d) is the wavelength factor, not the frequency", "take 1 / base^(2i/d)"),
        (lambda d, base: 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float64) / d),
         "the result is float64", "compute the exponents in float32 (torch.arange(...).float())"),
        (lambda d, base: 1.0 / base ** (torch.arange(0, d).float() / d),
         "one frequency per dimension (head_dim of them); there is one per pair of dimensions, head_dim // 2",
         "torch.arange(0, head_dim, 2): the even exponents 0, 2, ..., d - 2"),
        (lambda d, base: 1.0 / base ** (torch.arange(0, d, 2) // d).float(),
         "integer division (//) makes every exponent 0, so every frequency is 1", "true division: torch.arange(0, d, 2).float() / d"),
        (lambda d, base: 1.0 / base ** (torch.arange(2, d + 1, 2).float() / d),
         "the exponents start at 2/d (off by one in i): the first frequency must be base^0 = 1", "torch.arange(0, head_dim, 2)"),
        (lambda d, base: 1.0 / base ** (torch.arange(0, d + 1, 2).float() / d),
         "one frequency too many (off by one at the end of arange): there are head_dim // 2", "torch.arange(0, head_dim, 2) stops before head_dim"),
        (lambda d, base: 1.0 / 10000.0 ** (torch.arange(0, d, 2).float() / d),
         "the base is hard-coded to 10000; use the `base` argument (Llama 3 uses 500000)", "base ** (torch.arange(0, d, 2).float() / d)"),
        (lambda d, base: 1.0 / base ** (torch.arange(0, d, 2).float() / (d // 2)),
         "the exponent is divided by head_dim // 2 instead of head_dim: 2i / (d/2) runs up to 2", "divide by head_dim: arange(0, d, 2) / d"),
    ],
)


def _rope_cos_sin_reference(position_ids: torch.Tensor, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    return LlamaRotaryEmbedding(head_dim, base=base)(position_ids, int(position_ids.max()) + 1, torch.float32)


register(
    "rope_cos_sin", "03_rope", "(position_ids, head_dim, base)",
    "cos and sin (batch, seq, head_dim), float32, of the angles position * theta_i, laid out as in rotate_half (i and i + d/2 share theta_i)",
    reference=_rope_cos_sin_reference,
    # An angle of 4000 radians in float32 is only known to ~4000 * 1.2e-7 = 5e-4: correct formulas
    # (float32 or float64, outer or broadcast, 1/base^x or base^-x) round it differently.
    tolerance=lambda args: (max(1e-5, 8 * torch.finfo(torch.float32).eps * float(args[0].max())), 1e-5),
    cases=lambda: [("positions 0..5", (torch.arange(6)[None], 8, 10000.0)),
                   ("batch of 2, positions 10..13", (torch.arange(10, 14)[None].repeat(2, 1), 16, 10000.0)),
                   ("position 4000, head_dim 128", (torch.tensor([[0, 1, 4000]]), 128, 10000.0)),
                   ("base 500000 (Llama 3)", (torch.arange(5)[None], 16, 500000.0))],
    mistakes=[
        (lambda p, d, base: tuple(f(torch.repeat_interleave(p[..., None].float() * rope_inv_freq(d, base), 2, -1)) for f in (torch.cos, torch.sin)),
         "each frequency is repeated in neighbouring slots (2i, 2i+1), Meta's complex layout; rotate_half pairs i with i + d/2",
         "emb = torch.cat((freqs, freqs), dim=-1)"),
        (lambda p, d, base: tuple(f(p[..., None].float() * rope_inv_freq(d, base)) for f in (torch.cos, torch.sin)),
         "the angles cover only head_dim / 2 slots", "concatenate the angles with themselves: cat((freqs, freqs), -1)"),
        (lambda p, d, base: tuple(f(torch.cat([p[..., None].float() * rope_inv_freq(d, base)] * 2, -1)) for f in (torch.sin, torch.cos)),
         "cos and sin are swapped: the function returns (cos, sin)", "return emb.cos(), emb.sin() in that order"),
        (lambda p, d, base: tuple(f(torch.cat([(p[..., None].float() + 1) * rope_inv_freq(d, base)] * 2, -1)) for f in (torch.cos, torch.sin)),
         "positions counted from 1: position_ids already hold 0, 1, 2, ...", "use position_ids as they are"),
        (lambda p, d, base: tuple(f(torch.cat([p[..., None].float() * rope_inv_freq(d, 10000.0)] * 2, -1)) for f in (torch.cos, torch.sin)),
         "the base is hard-coded to 10000; use the `base` argument", "inv_freq = 1 / base ** (arange(0, d, 2) / d)"),
        (lambda p, d, base: tuple(f(torch.cat([p[..., None].float() / base ** (torch.arange(0, d // 2).float() / d)] * 2, -1)) for f in (torch.cos, torch.sin)),
         "the frequencies use the exponent i/d instead of 2i/d", "inv_freq = 1 / base ** (torch.arange(0, d, 2).float() / d)"),
        (lambda p, d, base: tuple(f(torch.cat([p[..., None].float() * rope_inv_freq(d, base)] * 2, 0)) for f in (torch.cos, torch.sin)),
         "the two copies of the angles are joined along dim 0, not along the last dimension", "torch.cat((freqs, freqs), dim=-1)"),
        (lambda p, d, base: tuple(f(torch.cat([p[0][..., None].float() * rope_inv_freq(d, base)] * 2, -1)) for f in (torch.cos, torch.sin)),
         "the batch dimension is dropped (position_ids[0]): cos and sin must be (batch, seq, head_dim)", "use position_ids[..., None] * inv_freq"),
        (lambda p, d, base: tuple(f(torch.cat([p[..., None].float() * rope_inv_freq(d, base)] * 2, -1) * 180 / torch.pi) for f in (torch.cos, torch.sin)),
         "the angles are converted to degrees; torch.cos and torch.sin take radians", "use position * inv_freq as it is"),
    ],
)


register(
    "dynamic_ntk_base", "03_rope", "(base, head_dim, seq_len, max_position_embeddings, factor)",
    "the rotary base dynamic-NTK scaling uses for a sequence of seq_len tokens (unchanged up to the training context)",
    reference=dynamic_ntk_base,
    cases=lambda: [("inside the context", (10000.0, 128, 2048, 4096, 2.0)), ("at the context", (10000.0, 128, 4096, 4096, 2.0)),
                   ("twice the context", (10000.0, 128, 8192, 4096, 2.0)), ("small head, factor 4", (10000.0, 16, 300, 256, 4.0))],
    mistakes=[
        (lambda b, d, L, Lt, f: b * ((f * L / Lt) - (f - 1)) ** (d / (d - 2)),
         "the base also changes inside the training context (at L = 2048 of 4096 the formula gives a smaller base)",
         "return base unchanged while seq_len <= max_position_embeddings"),
        (lambda b, d, L, Lt, f: b if L <= Lt else b * ((f * L / Lt) - (f - 1)),
         "the exponent d / (d - 2) is missing", "raise the length factor to head_dim / (head_dim - 2)"),
        (lambda b, d, L, Lt, f: b if L <= Lt else b * (f * L / Lt) ** (d / (d - 2)),
         "the '- (factor - 1)' term is missing, so the base jumps as soon as the context is exceeded",
         "use (factor * seq_len / max_position_embeddings) - (factor - 1)"),
        (lambda b, d, L, Lt, f: b if L <= Lt else b * (L / Lt) ** (d / (d - 2)),
         "the scaling factor is missing: the length ratio is factor * seq_len / max_position_embeddings - (factor - 1)",
         "multiply seq_len / max_position_embeddings by factor, then subtract factor - 1"),
        (lambda b, d, L, Lt, f: b if L <= Lt else b * ((f * L / Lt) - (f - 1)) ** ((d - 2) / d),
         "the exponent is upside down: (d - 2) / d instead of d / (d - 2)", "raise the length factor to head_dim / (head_dim - 2)"),
        (lambda b, d, L, Lt, f: b if L <= Lt else b * ((f * Lt / L) - (f - 1)) ** (d / (d - 2)),
         "the length ratio is upside down: max_position_embeddings / seq_len instead of seq_len / max_position_embeddings",
         "factor * seq_len / max_position_embeddings - (factor - 1)"),
        (lambda b, d, L, Lt, f: b if L <= Lt else b ** (d / (d - 2)) * ((f * L / Lt) - (f - 1)),
         "the exponent d / (d - 2) raises the base, not the length factor", "base * (length factor) ** (head_dim / (head_dim - 2))"),
        (lambda b, d, L, Lt, f: b if L <= Lt else b * ((f * L // Lt) - (f - 1)) ** (d / (d - 2)),
         "integer division (//) floors factor * seq_len / max_position_embeddings", "use true division: factor * seq_len / max_position_embeddings"),
        (lambda b, d, L, Lt, f: b if L <= Lt else b / ((f * L / Lt) - (f - 1)) ** (d / (d - 2)),
         "the base is divided by the scaling; a longer context needs a LARGER base (slower rotations)", "multiply: base * (...) ** (d / (d - 2))"),
    ],
)
