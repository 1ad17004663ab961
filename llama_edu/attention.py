"""Causal self-attention with grouped-query heads.

    Attention(Q, K, V) = softmax(Q K^T / sqrt(d) + M) V        (Vaswani et al. 2017, eq. 1)

M is the mask: query i may look at key j when j is not in its future (j <= position of i) and
key j is not padding. Grouped-query attention (Ainslie et al. 2023): ``num_key_value_heads``
key/value heads are each shared by a group of query heads, so the cache keeps only the small
version. MHA (kv heads = heads), GQA and MQA (one kv head) are the same code.

Implementations (``config.attn_implementation``):
- ``"eager"``: the formula written out; returns the attention weights (for maps).
- ``"sdpa"`` (default): ``torch.nn.functional.scaled_dot_product_attention``, which picks a
  fused kernel (flash / memory-efficient / math) for the device and handles GQA itself.
- ``"flash_attention_2"``: the ``flash_attn`` package on CUDA in fp16/bf16, when no mask is
  needed (no padding, no preallocated cache); otherwise SDPA.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .cache import Cache
from .config import LlamaConfig
from .rope import apply_rotary_pos_emb


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(batch, kv_heads, seq, head_dim) -> (batch, kv_heads * n_rep, seq, head_dim), each kv
    head repeated for the n_rep query heads of its group (like ``repeat_interleave`` on dim 1)."""
    if n_rep == 1:
        return hidden_states
    batch, kv_heads, seq, head_dim = hidden_states.shape
    expanded = hidden_states[:, :, None].expand(batch, kv_heads, n_rep, seq, head_dim)
    return expanded.reshape(batch, kv_heads * n_rep, seq, head_dim)


def causal_mask(
    cache_position: torch.Tensor,
    kv_length: int,
    padding_mask: torch.Tensor | None = None,
    unmask_empty_rows: bool = False,
) -> torch.Tensor:
    """The one mask of every path: True where a query may attend, shape (batch or 1, 1, q, kv).

    ``cache_position`` (q,) holds the slot of each query token in the keys: key j is visible
    from query i when j <= cache_position[i] (its past and itself; with a preallocated cache
    this also hides the slots not written yet). ``padding_mask`` (batch, kv_length), 1 = token
    and 0 = padding, hides padding keys. A query at a padding position then sees nothing; with
    ``unmask_empty_rows`` such rows see everything instead (their outputs are never used, and
    fused SDPA kernels return NaN for an empty row).
    """
    keys = torch.arange(kv_length, device=cache_position.device)
    allowed = (keys <= cache_position[:, None])[None, None]  # (kv,) against (q, 1): (1, 1, q, kv)
    if padding_mask is not None:
        allowed = allowed & padding_mask[:, None, None, :].bool()  # (batch, 1, q, kv)
        if unmask_empty_rows:
            allowed = allowed | ~allowed.any(dim=-1, keepdim=True)
    return allowed


def eager_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, dropout: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(QK^T/sqrt(d) + M) V with query (b, h, q, d), key/value (b, h, k, d) and the
    boolean ``mask`` of :func:`causal_mask` (None: causal). Returns the output (b, h, q, d) and the
    weights (b, h, q, k); the softmax runs in float32."""
    scores = torch.matmul(query, key.transpose(2, 3)) / math.sqrt(query.shape[-1])  # (b, h, q, k)
    if mask is None and query.shape[2] > 1:
        past = key.shape[2] - query.shape[2]
        mask = causal_mask(torch.arange(past, key.shape[2], device=query.device), key.shape[2])
    if mask is not None:
        # The dtype's most negative number rather than -inf: a row with nothing to attend to
        # (a padding position) becomes uniform instead of NaN, in fp16 and bf16 too.
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=dropout > 0)
    return torch.matmul(weights, value), weights


class LlamaAttention(nn.Module):
    """Multi-head (grouped-query) self-attention with rotary positions and an optional cache."""

    def __init__(self, config: LlamaConfig, layer_idx: int | None = None):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.hidden_size = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.attention_dropout = config.attention_dropout
        bias = config.attention_bias
        self.q_proj = nn.Linear(self.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(self.hidden_size, self.num_key_value_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(self.hidden_size, self.num_key_value_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, self.hidden_size, bias=bias)

    def forward(
        self,
        hidden_states: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        cache_position: torch.Tensor | None = None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """hidden_states (batch, seq, hidden) -> (batch, seq, hidden), and the weights (batch, heads,
        seq, keys) if ``output_attentions``. cos/sin (batch, [1,] seq, head_dim); ``mask`` from
        :func:`causal_mask`, or None for plain causal attention."""
        bsz, q_len, _ = hidden_states.shape
        # Head counts come from the weights: a tensor-parallel shard runs the same code.
        q = self.q_proj(hidden_states).view(bsz, q_len, -1, self.head_dim).transpose(1, 2)  # (b, heads, q, d)
        k = self.k_proj(hidden_states).view(bsz, q_len, -1, self.head_dim).transpose(1, 2)  # (b, kv_heads, q, d)
        v = self.v_proj(hidden_states).view(bsz, q_len, -1, self.head_dim).transpose(1, 2)

        q, k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1 if cos.dim() == 3 else None)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx, cache_position)  # (b, kv_heads, keys, d)

        dropout = self.attention_dropout if self.training else 0.0
        impl = "eager" if output_attentions else self.config.attn_implementation
        weights = None
        if impl == "flash_attention_2" and mask is None:
            out = _flash_attention(q, k, v, dropout)  # (b, q, heads, d)
        else:
            if impl == "eager":
                n_rep = q.shape[1] // k.shape[1]
                out, weights = eager_attention(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), mask, dropout)
            else:
                out = F.scaled_dot_product_attention(
                    q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=mask is None and q_len > 1, enable_gqa=True
                )
            out = out.transpose(1, 2)  # (b, q, heads, d)
        out = out.reshape(bsz, q_len, -1)
        return self.o_proj(out), weights


def check_flash_attention_available(dtype: torch.dtype | None = None) -> None:
    """Raise a clear error when ``attn_implementation="flash_attention_2"`` cannot run here."""
    try:
        import flash_attn  # noqa: F401  (an optional dependency, not a cycle)
    except ImportError:
        raise ImportError(
            'attn_implementation="flash_attention_2" needs the flash_attn package (pip install flash-attn) '
            'and an NVIDIA GPU; use attn_implementation="sdpa", which uses flash kernels through PyTorch'
        ) from None
    if not torch.cuda.is_available():
        raise ValueError('attn_implementation="flash_attention_2" needs a CUDA device; use "sdpa" on CPU')
    if dtype is not None and dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f'flash_attention_2 runs in float16 or bfloat16 only, the model is {dtype}; use model.to(torch.bfloat16)')


def _flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float) -> torch.Tensor:
    """flash_attn_func on (b, heads, q, d) inputs; it handles GQA itself (fewer k/v heads)
    and aligns the causal mask bottom-right, which is what decoding with a cache needs."""
    from flash_attn import flash_attn_func  # optional dependency

    return flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout, causal=q.shape[2] > 1)
