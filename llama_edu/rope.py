"""Rotary position embeddings (RoFormer, Su et al. 2021), with linear and dynamic-NTK scaling.

RoPE encodes position m by rotating each pair of query/key dimensions by the angle m * theta_i,
with theta_i = base^(-2i/d) (eq. 15 of the paper). Because a rotation by m followed by the dot
product with a key rotated by n only depends on m - n, attention scores see relative positions.

Llama's Hugging Face weights use the "rotate_half" pairing: dimension i is paired with
i + d/2 (not with i + 1 as in Meta's complex-number code); the conversion scripts permute the
q/k projection rows so both give the same model.

Scaling, for running past the training context ``max_position_embeddings``:
- linear (Chen et al. 2023, "position interpolation"): positions are divided by ``factor``;
- dynamic NTK (bloc97/emozilla): when the sequence is longer than the training context the
  base grows, base' = base * (factor * L / L_train - (factor - 1)) ** (d / (d - 2)).
  It depends only on the current total length L. (transformers 4.37 keeps the grown base for
  later, shorter inputs, issue #25306; this module is stateless, so it cannot.)
- llama3 (Llama 3.1): a fixed remap of the frequencies, see :func:`llama3_inv_freq`.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def rope_inv_freq(head_dim: int, base: float, device: torch.device | None = None) -> torch.Tensor:
    """theta_i = base^(-2i/d) for i = 0 .. d/2 - 1, float32, shape (head_dim // 2,)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    return 1.0 / (base**exponents)


def dynamic_ntk_base(base: float, head_dim: int, seq_len: int, max_position_embeddings: int, factor: float) -> float:
    """The rotary base dynamic-NTK scaling uses for a sequence of total length ``seq_len``."""
    if seq_len <= max_position_embeddings:
        return base
    return base * ((factor * seq_len / max_position_embeddings) - (factor - 1)) ** (head_dim / (head_dim - 2))


def llama3_inv_freq(
    inv_freq: torch.Tensor, factor: float, low_freq_factor: float, high_freq_factor: float,
    original_max_position_embeddings: int,
) -> torch.Tensor:
    """Llama 3.1's frequency remap, (head_dim // 2,) -> (head_dim // 2,).

    A pair whose wavelength 2*pi / theta_i is shorter than L / high_freq_factor (L = the original
    context, 8192) turns many times within L: it encodes local order and is kept. One whose
    wavelength is longer than L / low_freq_factor never completed a turn in training: it is
    slowed down by ``factor`` (position interpolation), so 8x longer contexts stay inside the
    angles it has seen. In between, the two are blended linearly in L / wavelength.
    """
    wavelen = 2 * math.pi / inv_freq
    smooth = (original_max_position_embeddings / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    slowed = torch.where(wavelen > original_max_position_embeddings / low_freq_factor, inv_freq / factor, blended)
    return torch.where(wavelen < original_max_position_embeddings / high_freq_factor, inv_freq, slowed)


class LlamaRotaryEmbedding(nn.Module):
    """Computes the cos/sin tables for given positions. Holds no state and no buffers, so the
    model can be built on the meta device and a short input after a long one is unaffected."""

    def __init__(
        self,
        dim: int,
        max_position_embeddings: int = 2048,
        base: float = 10000.0,
        scaling: dict | None = None,
    ):
        super().__init__()
        self.dim = dim
        self.max_position_embeddings = max_position_embeddings
        self.base = base
        self.scaling_type = scaling["type"] if scaling else None
        self.scaling_factor = float(scaling["factor"]) if scaling else 1.0
        self.llama3 = {k: v for k, v in scaling.items() if k != "type"} if self.scaling_type == "llama3" else None  # type: ignore[union-attr]

    def forward(self, position_ids: torch.Tensor, seq_len: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids (batch, seq) and the total length seq_len (past + new tokens) ->
        cos, sin of shape (batch, seq, dim) in ``dtype``. The angles are computed in float32."""
        base = self.base
        if self.scaling_type == "dynamic":
            base = dynamic_ntk_base(base, self.dim, seq_len, self.max_position_embeddings, self.scaling_factor)
        inv_freq = rope_inv_freq(self.dim, base, position_ids.device)  # (dim/2,)
        if self.llama3 is not None:
            inv_freq = llama3_inv_freq(inv_freq, **self.llama3)
        positions = position_ids.float()
        if self.scaling_type == "linear":
            positions = positions / self.scaling_factor
        freqs = positions[..., None] * inv_freq  # (batch, seq, dim/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # rotate_half pairing: i with i + dim/2
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def extra_repr(self) -> str:
        s = f"dim={self.dim}, base={self.base}"
        return s + (f", scaling={self.scaling_type} x{self.scaling_factor}" if self.scaling_type else "")


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last dimension: a 90-degree rotation of
    every (i, i + d/2) pair."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int | None = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate queries (batch, heads, seq, dim) and keys (batch, kv_heads, seq, dim) by the angles
    whose cos/sin (batch, seq, dim) come from :class:`LlamaRotaryEmbedding` (eq. 34 of the paper):

        q' = q * cos + rotate_half(q) * sin

    cos/sin are unsqueezed at ``unsqueeze_dim`` to broadcast over heads, as in transformers;
    ``None`` when the caller already did it once for all layers.

    Queries and keys get the same rotation, so they are rotated together, stacked along the
    heads: the same numbers, with 8 operations instead of 12 (on a small model each operation
    costs its dispatch, not its arithmetic). The two results are views of one tensor."""
    if unsqueeze_dim is not None:
        cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    heads = 1 if unsqueeze_dim is None else unsqueeze_dim  # the heads axis of q and k
    qk = torch.cat((q, k), dim=heads)  # (batch, heads + kv_heads, seq, dim)
    qk = qk * cos + rotate_half(qk) * sin
    return qk.tensor_split((q.shape[heads],), dim=heads)  # (q, k) again
