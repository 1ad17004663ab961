"""Causal self-attention with grouped-query heads, in three implementations.

    Attention(Q, K, V) = softmax(Q K^T / sqrt(d) + M) V        (Vaswani et al. 2017, eq. 1)

M is the mask: 0 where a query may look, the dtype's most negative number where it may not
(future tokens, padding). Using ``finfo(dtype).min`` rather than ``-inf`` and a float32
softmax means a row with nothing to attend to (a left-padding position) gives a uniform
distribution instead of NaN, in fp16 and bf16 too.

Grouped-query attention (Ainslie et al. 2023): ``num_key_value_heads`` key/value heads are
shared by groups of query heads. ``repeat_kv`` expands them to one per query head just before
the product, so the cache keeps the small version. MHA (kv heads = heads), GQA and MQA
(one kv head) are the same code.

Implementations (``config.attn_implementation``):
- ``"eager"``: the formula above written out; can return the attention weights (for maps).
- ``"sdpa"`` (default): ``torch.nn.functional.scaled_dot_product_attention``, which picks a
  fused kernel (flash / memory-efficient / math) for the device.
- ``"flash_attention_2"``: the ``flash_attn`` package on CUDA in fp16/bf16; batches with
  padding go through SDPA.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .cache import Cache
from .config import LlamaConfig
from .mlp import sliced_linear
from .rope import apply_rotary_pos_emb


def is_compiling() -> bool:
    """True while torch.compile traces the code: value checks (host syncs) are skipped then."""
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and hasattr(compiler, "is_compiling") and compiler.is_compiling())


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(batch, kv_heads, seq, head_dim) -> (batch, kv_heads * n_rep, seq, head_dim), each kv
    head repeated for the n_rep query heads of its group (like ``repeat_interleave`` on dim 1)."""
    if n_rep == 1:
        return hidden_states
    batch, kv_heads, seq, head_dim = hidden_states.shape
    expanded = hidden_states[:, :, None].expand(batch, kv_heads, n_rep, seq, head_dim)
    return expanded.reshape(batch, kv_heads * n_rep, seq, head_dim)


def causal_mask(
    attention_mask: torch.Tensor | None,
    query_length: int,
    key_length: int,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """The additive mask M of shape (batch or 1, 1, query_length, key_length).

    Query i (the (key_length - query_length + i)-th token overall) may see keys 0 .. that
    index, and only keys where the 2-D padding mask ``attention_mask`` (batch, key_length) is 1.
    """
    past = key_length - query_length
    q_pos = torch.arange(query_length, device=device)[:, None] + past
    allowed = torch.arange(key_length, device=device)[None, :] <= q_pos  # (q, k)
    allowed = allowed[None, None]  # (1, 1, q, k)
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, :].bool()
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)


def prepare_attention_mask(
    attention_mask: torch.Tensor | None,
    batch_size: int,
    query_length: int,
    past_length: int,
    dtype: torch.dtype,
    device: torch.device,
    implementation: str,
) -> torch.Tensor | None:
    """Turn the user's mask into what the attention kernel takes (done once per forward).

    ``attention_mask`` is None, a 2-D padding mask (batch, past + query) of 1 = token /
    0 = padding, or a 4-D mask (batch, 1, query, past + query) of 1 = may attend. Returns an
    additive float mask, or None when a plain causal mask is enough: eager and SDPA then use
    the faster built-in causal path.
    """
    key_length = past_length + query_length
    if attention_mask is not None and attention_mask.dim() == 4:
        expected = (batch_size, 1, query_length, key_length)
        if tuple(attention_mask.shape) != expected:
            raise ValueError(f"4-D attention_mask has shape {tuple(attention_mask.shape)}, expected {expected}")
        return torch.zeros(expected, dtype=dtype, device=device).masked_fill(
            ~attention_mask.to(device).bool(), torch.finfo(dtype).min
        )
    if attention_mask is not None:
        if attention_mask.dim() != 2 or tuple(attention_mask.shape) != (batch_size, key_length):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)} but must be (batch, past + new tokens) = "
                f"{(batch_size, key_length)}: one 1/0 entry per token, the cached ones included"
            )
        if not is_compiling() and bool(attention_mask.all()):  # (a host sync: skipped when compiled)
            attention_mask = None  # no padding: nothing beyond causality to mask
    if attention_mask is None and (query_length == 1 or (implementation != "eager" and past_length == 0)):
        return None  # the kernel's own causal flag (or nothing at all, for a single query)
    mask = causal_mask(attention_mask, query_length, key_length, dtype, device)
    if implementation != "eager" and attention_mask is not None:
        # Rows with nothing to attend to (queries at left-padding positions) make some fused
        # SDPA kernels return NaN; let them attend everywhere: their outputs are ignored anyway.
        fully_masked = (mask == torch.finfo(dtype).min).all(dim=-1, keepdim=True)
        mask = mask.masked_fill(fully_masked, 0.0)
    return mask


def eager_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    dropout: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(QK^T/sqrt(d) + M) V with query (b, h, q, d), key/value (b, h, k, d).
    Returns the output (b, h, q, d) and the weights (b, h, q, k)."""
    scores = torch.matmul(query, key.transpose(2, 3)) / math.sqrt(query.shape[-1])  # (b, h, q, k)
    if mask is None and query.shape[2] > 1:
        mask = causal_mask(None, query.shape[2], key.shape[2], scores.dtype, scores.device)
    if mask is not None:
        # fp16 can overflow score + min to -inf; clamp so fully masked rows stay finite.
        scores = torch.clamp_min(scores + mask, torch.finfo(scores.dtype).min)
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
        attention_mask: torch.Tensor | None = None,
        past_key_value: Cache | None = None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """hidden_states (batch, seq, hidden) -> (batch, seq, hidden), and the attention weights
        (batch, heads, seq, past + seq) when ``output_attentions``. ``attention_mask`` is the
        prepared additive mask (see :func:`prepare_attention_mask`)."""
        bsz, q_len, _ = hidden_states.shape
        tp = self.config.pretraining_tp
        q = sliced_linear(hidden_states, self.q_proj, tp)
        k = sliced_linear(hidden_states, self.k_proj, tp)
        v = sliced_linear(hidden_states, self.v_proj, tp)
        q = q.view(bsz, q_len, self.num_heads, self.head_dim).transpose(1, 2)  # (b, heads, q, d)
        k = k.view(bsz, q_len, self.num_key_value_heads, self.head_dim).transpose(1, 2)  # (b, kv_heads, q, d)
        v = v.view(bsz, q_len, self.num_key_value_heads, self.head_dim).transpose(1, 2)

        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if past_key_value is not None:
            k, v = past_key_value.update(k, v, self.layer_idx)  # (b, kv_heads, past + q, d)

        dropout = self.attention_dropout if self.training else 0.0
        impl = "eager" if output_attentions else self.config.attn_implementation
        weights = None
        if impl == "flash_attention_2" and attention_mask is None:
            out = _flash_attention(q, k, v, dropout)  # (b, q, heads, d)
        else:
            k, v = repeat_kv(k, self.num_key_value_groups), repeat_kv(v, self.num_key_value_groups)
            if impl == "eager":
                out, weights = eager_attention(q, k, v, attention_mask, dropout)
            else:
                if attention_mask is not None and q.device.type == "cuda":
                    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()  # pytorch#112577
                out = F.scaled_dot_product_attention(
                    q, k, v, attn_mask=attention_mask, dropout_p=dropout,
                    is_causal=attention_mask is None and q_len > 1,
                )
            out = out.transpose(1, 2)  # (b, q, heads, d)
        out = out.reshape(bsz, q_len, self.hidden_size)
        return sliced_linear(out, self.o_proj, tp, split_input=True), weights


def check_flash_attention_available(dtype: torch.dtype | None = None) -> None:
    """Raise a clear error when ``attn_implementation="flash_attention_2"`` cannot run here."""
    try:
        import flash_attn  # noqa: F401
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
    from flash_attn import flash_attn_func

    check_flash_attention_available(q.dtype)
    return flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout, causal=q.shape[2] > 1)
