"""Exercises of notebook 04_attention."""

from __future__ import annotations

import math
import torch
import torch.nn.functional as F
from ...attention import causal_mask as _package_causal_mask
from ...attention import eager_attention, repeat_kv
from ...cache import StaticCache
from ...config import LlamaConfig

from .checking import Cases, register, _gen


def _causal_mask_reference(q_len: int, kv_len: int, dtype: torch.dtype) -> torch.Tensor:
    """The package's boolean mask for q_len new tokens after kv_len - q_len cached ones, made additive."""
    allowed = _package_causal_mask(torch.arange(kv_len - q_len, kv_len), kv_len)[0, 0]
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)


def _mask_from(allowed: torch.Tensor, dtype: torch.dtype, fill: float | None = None) -> torch.Tensor:
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min if fill is None else fill)


def _positions(q_len, kv_len):
    return torch.arange(q_len)[:, None], torch.arange(kv_len)[None, :]


register(
    "causal_mask", "04_attention", "(q_len, kv_len, dtype)",
    "the (q_len, kv_len) additive mask: 0 where key j <= query i + (kv_len - q_len), torch.finfo(dtype).min elsewhere",
    reference=_causal_mask_reference,
    cases=lambda: [("4 queries, 4 keys", (4, 4, torch.float32)), ("1 query after 5 cached keys", (1, 6, torch.float32)),
                   ("3 queries after 5 cached keys", (3, 8, torch.float32)), ("float16, 5x5", (5, 5, torch.float16)),
                   ("bfloat16, 2 queries, 7 keys", (2, 7, torch.bfloat16))],
    mistakes=[
        (lambda q, k, dt: _mask_from(_positions(q, k)[1] <= _positions(q, k)[0], dt),
         "the cache offset is ignored: with kv_len > q_len, query i is token (kv_len - q_len) + i and sees all the cached keys",
         "allow key j when j <= i + (kv_len - q_len)"),
        (lambda q, k, dt: _mask_from(_positions(q, k)[1] < _positions(q, k)[0] + (k - q), dt),
         "off by one: each query is masked from its own key (j < i instead of j <= i)", "use <=: a token attends to itself"),
        (lambda q, k, dt: _mask_from(_positions(q, k)[1] <= _positions(q, k)[0] + (k - q) + 1, dt),
         "off by one: each query also sees the next token", "use j <= i + (kv_len - q_len), not + 1"),
        (lambda q, k, dt: _mask_from(_positions(q, k)[1] <= _positions(q, k)[0] + (k - q), dt, float("-inf")),
         "-inf instead of torch.finfo(dtype).min: a row with nothing to attend to (left padding) becomes NaN after softmax",
         "masked_fill with torch.finfo(dtype).min"),
        (lambda q, k, dt: _mask_from(_positions(q, k)[1] >= _positions(q, k)[0] + (k - q), dt),
         "the mask is upside down: queries see the future and not the past", "allow keys at or before the query's position"),
        (lambda q, k, dt: _mask_from(_positions(q, k)[1] <= _positions(q, k)[0] + (k - q), torch.float32),
         "the mask is always float32; it must be in `dtype` (and use that dtype's min)", "torch.zeros(..., dtype=dtype) and torch.finfo(dtype).min"),
        (lambda q, k, dt: _positions(q, k)[1] <= _positions(q, k)[0] + (k - q),
         "the mask is boolean (True = may attend); this exercise wants the additive form that is added to the scores",
         "torch.zeros(q_len, kv_len, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)"),
        (lambda q, k, dt: _mask_from(~(_positions(q, k)[1] <= _positions(q, k)[0] + (k - q)), dt),
         "the mask is inverted: 0 where the keys must be masked and min where they must be kept (tril where triu belongs, or ~allowed)",
         "fill torch.finfo(dtype).min above the shifted diagonal: torch.full(...).triu(kv_len - q_len + 1)"),
        (lambda q, k, dt: _mask_from(_positions(q, k)[1] <= _positions(q, k)[0] + (q - k), dt),
         "the cache offset has the wrong sign: q_len - kv_len instead of kv_len - q_len", "allow key j when j <= i + (kv_len - q_len)"),
        (lambda q, k, dt: _causal_mask_reference(k, q, dt) if q != k else _causal_mask_reference(q, k, dt).T,
         "the rows and columns are swapped: the mask is (q_len, kv_len), one row per query", "rows index the queries, columns the keys"),
        (lambda q, k, dt: _mask_from(_positions(q, k)[1] <= _positions(q, k)[0] + (k - q), dt, -1e9),
         "a fixed large negative number (-1e9) instead of torch.finfo(dtype).min: in float16 it is -inf, in float32 not the minimum",
         "masked_fill with torch.finfo(dtype).min"),
        (lambda q, k, dt: _mask_from(_positions(q, k)[1] <= _positions(q, k)[0] + (k - q), dt, -10000.0),
         "a fixed large negative number (-10000) instead of torch.finfo(dtype).min", "masked_fill with torch.finfo(dtype).min"),
        (lambda q, k, dt: _mask_from(_positions(q, k)[1] <= _positions(q, k)[0] + (k - q), dt, torch.finfo(torch.float32).min),
         "torch.finfo(torch.float32).min is used whatever the dtype: in a float16 or bfloat16 mask it becomes -inf",
         "torch.finfo(dtype).min, the minimum of the mask's own dtype"),
        (lambda q, k, dt: _mask_from(_positions(q, k)[1] <= _positions(q, k)[0] + (k - q), dt, 1.0),
         "the masked positions hold 1, not a huge negative number: the mask is added to the scores, so 1 hardly changes them",
         "masked_fill with torch.finfo(dtype).min"),
    ],
)


def _repeat_kv_cases() -> Cases:
    g = _gen(4)
    return [
        ("2 kv heads, n_rep 3", (torch.randn(1, 2, 3, 4, generator=g), 3)),
        ("batch 2, 4 kv heads, n_rep 2", (torch.randn(2, 4, 5, 8, generator=g), 2)),
        ("n_rep 1 (plain multi-head)", (torch.randn(1, 3, 2, 4, generator=g), 1)),
        ("1 kv head (multi-query), n_rep 4", (torch.randn(1, 1, 4, 8, generator=g), 4)),
    ]


register(
    "repeat_kv", "04_attention", "(hidden_states, n_rep)",
    "(b, kv_heads, seq, d) -> (b, kv_heads * n_rep, seq, d): each kv head repeated for its n_rep query heads",
    reference=repeat_kv,
    cases=_repeat_kv_cases,
    mistakes=[
        (lambda h, n: h.repeat(1, n, 1, 1),
         "`repeat` tiles the heads (0, 1, 0, 1): query head 1 gets kv head 1 instead of kv head 0",
         "consecutive query heads share a kv head: use repeat_interleave(n_rep, dim=1), or expand a new axis after the kv-head axis and reshape"),
        (lambda h, n: h.repeat_interleave(n, dim=2),
         "you repeated along the sequence axis (dim 2)", "repeat along the head axis, dim 1"),
        (lambda h, n: h.repeat_interleave(n, dim=0),
         "you repeated along the batch axis (dim 0)", "repeat along the head axis, dim 1"),
        (lambda h, n: h.repeat_interleave(n, dim=-1),
         "you repeated along the last dimension (head_dim): each head's vector got longer instead of being shared by more heads",
         "repeat along the head axis, dim 1"),
        (lambda h, n: h[:, :, None].expand(h.shape[0], h.shape[1], n, *h.shape[2:]),
         "the n_rep axis is not merged into the heads: the result has 5 dimensions",
         "reshape to (b, kv_heads * n_rep, seq, d) after the expand"),
        (lambda h, n: h.repeat_interleave(n), "repeat_interleave without dim= flattens the tensor first", "repeat_interleave(n_rep, dim=1)"),
        (lambda h, n: h.repeat(n, 1, 1, 1), "the batch is tiled (repeat along dim 0), not the heads", "repeat along the head axis, dim 1"),
        (lambda h, n: h.repeat(1, 1, n, 1), "the sequence is tiled (repeat along dim 2), not the heads", "repeat along the head axis, dim 1"),
        (lambda h, n: h[:, :, None].expand(h.shape[0], h.shape[1], n, *h.shape[2:]).reshape(h.shape[0], h.shape[1] * n, h.shape[3], h.shape[2]),
         "the reshape swaps seq and head_dim: the last two sizes are (seq, d)", "reshape to (b, kv_heads * n_rep, seq, d)"),
    ],
)


def _attention_reference(q, k, v, mask):
    return eager_attention(q, k, v, mask == 0)[0]  # the package takes the mask as booleans (True = attend)


def _attention_cases() -> Cases:
    g = _gen(5)

    def qkv(b, h, q_len, kv_len, d, scale=1.0, dtype=torch.float32):
        q = (torch.randn(b, h, q_len, d, generator=g) * scale).to(dtype)
        k = (torch.randn(b, h, kv_len, d, generator=g) * scale).to(dtype)
        v = torch.randn(b, h, kv_len, d, generator=g).to(dtype)
        return q, k, v, _causal_mask_reference(q_len, kv_len, dtype)

    return [
        ("4 tokens, causal", qkv(1, 2, 4, 4, 8)),
        ("batch 2, 3 heads, 6 tokens, head_dim 16", qkv(2, 3, 6, 6, 16)),
        ("3 new queries after 5 cached keys", qkv(1, 2, 3, 8, 8)),
        ("one query (decoding), 7 keys", qkv(2, 2, 1, 7, 32)),
        ("large scores (x4)", qkv(1, 1, 5, 5, 64, scale=4.0)),
        ("float16", qkv(1, 2, 5, 5, 16, dtype=torch.float16)),
    ]


def _scores(q, k):
    return q @ k.transpose(-2, -1)


register(
    "attention", "04_attention", "(q, k, v, mask)",
    "softmax(q k^T / sqrt(d) + mask) v with the softmax in float32 over the keys; q (b, h, q_len, d), k/v (b, h, kv_len, d)",
    reference=_attention_reference,
    cases=_attention_cases,
    mistakes=[
        (lambda q, k, v, m: F.softmax(_scores(q, k) / math.sqrt(q.shape[-1]) + m, dim=-2, dtype=torch.float32).to(q.dtype) @ v,
         "the softmax runs over the queries (dim=-2): each key's column sums to 1 instead of each query's row",
         "softmax over the last dimension, the keys: every query distributes its attention over the keys"),
        (lambda q, k, v, m: F.softmax(_scores(q, k) + m, dim=-1, dtype=torch.float32).to(q.dtype) @ v,
         "the scores are not divided by sqrt(d), so the softmax is too peaked", "divide q k^T by math.sqrt(head_dim)"),
        (lambda q, k, v, m: F.softmax(_scores(q, k) / q.shape[-1] + m, dim=-1, dtype=torch.float32).to(q.dtype) @ v,
         "the scores are divided by d instead of sqrt(d)", "use math.sqrt(q.shape[-1])"),
        (lambda q, k, v, m: F.softmax(_scores(q, k) / math.sqrt(q.shape[-1]), dim=-1, dtype=torch.float32).to(q.dtype) @ v,
         "the mask is not applied: queries see future tokens", "add the mask to the scores before the softmax"),
        (lambda q, k, v, m: F.softmax(_scores(q, k) / math.sqrt(q.shape[-1]) * m, dim=-1, dtype=torch.float32).to(q.dtype) @ v,
         "the mask is multiplied; it is additive (0 keeps a score, a huge negative number removes it)", "scores + mask"),
        (lambda q, k, v, m: (F.softmax(_scores(q, k) / math.sqrt(q.shape[-1]) + m, dim=-1, dtype=torch.float32).to(q.dtype) @ v).transpose(1, 2),
         "the output is transposed to (b, q_len, h, d)", "return weights @ v, shape (b, h, q_len, d)"),
        (lambda q, k, v, m: ((F.softmax(_scores(q, k) / math.sqrt(q.shape[-1]), dim=-1, dtype=torch.float32) + m).to(q.dtype) @ v),
         "the mask is added after the softmax: the weights stop summing to 1 and masked keys get a huge negative weight",
         "add the mask to the scores, then take the softmax"),
        (lambda q, k, v, m: F.softmax(_scores(q, k) / math.sqrt(k.shape[-2]) + m, dim=-1, dtype=torch.float32).to(q.dtype) @ v,
         "the scores are divided by the square root of the number of keys (k.shape[-2]); the scale is the square root of head_dim",
         "math.sqrt(q.shape[-1])"),
        (lambda q, k, v, m: F.softmax(q @ k / math.sqrt(q.shape[-1]) + m, dim=-1, dtype=torch.float32).to(q.dtype) @ v,
         "k is not transposed: the scores are q k^T, so k must be (b, h, d, kv_len) in the product",
         "q @ k.transpose(-2, -1)"),
        (lambda q, k, v, m: F.softmax(_scores(q, k) / math.sqrt(q.shape[-2]) + m, dim=-1, dtype=torch.float32).to(q.dtype) @ v,
         "the scores are divided by the square root of the number of queries (q.shape[-2]); the scale is the square root of head_dim",
         "math.sqrt(q.shape[-1])"),
        (lambda q, k, v, m: F.softmax(_scores(q, k) / math.sqrt(q.shape[1] * q.shape[-1]) + m, dim=-1, dtype=torch.float32).to(q.dtype) @ v,
         "the scores are divided by sqrt(heads * head_dim), the model's hidden size; the scale is sqrt(head_dim), one head's size",
         "math.sqrt(q.shape[-1])"),
        (lambda q, k, v, m: F.softmax(_scores(q, k) / math.sqrt(q.shape[-1]), dim=-1, dtype=torch.float32).masked_fill(m < 0, 0).to(q.dtype) @ v,
         "the mask zeroes the weights after the softmax: the rows no longer sum to 1 (the masked keys still took their share)",
         "add the mask to the scores before the softmax"),
        (lambda q, k, v, m: F.softmax(_scores(q, k) * math.sqrt(q.shape[-1]) + m, dim=-1, dtype=torch.float32).to(q.dtype) @ v,
         "the scores are multiplied by sqrt(d); the scale divides", "q @ k^T / math.sqrt(head_dim)"),
        (lambda q, k, v, m: (F.softmax(_scores(q, k) + m, dim=-1, dtype=torch.float32) / math.sqrt(q.shape[-1])).to(q.dtype) @ v,
         "the 1/sqrt(d) scale is applied after the softmax; it scales the scores before it", "softmax(q k^T / sqrt(d) + mask)"),
        (lambda q, k, v, m: F.softmax(_scores(q, k) / math.sqrt(q.shape[-1]) + m, dim=-1, dtype=torch.float32).to(q.dtype),
         "you returned the attention weights; the output is the weights times v", "return weights @ v"),
        (lambda q, k, v, m: F.softmax(_scores(q, k) / math.sqrt(q.shape[-1]) + m, dim=1, dtype=torch.float32).to(q.dtype) @ v,
         "the softmax runs over dim 1 (the heads); it runs over the keys, the last dimension", "softmax(..., dim=-1)"),
        (lambda q, k, v, m: F.softmax(_scores(q, k) / math.sqrt(q.shape[-1]) + m.transpose(-2, -1), dim=-1, dtype=torch.float32).to(q.dtype) @ v,
         "the mask is transposed: it is (q_len, kv_len), rows for queries, like the scores", "add the mask as it is"),
        (lambda q, k, v, m: F.softmax(_scores(q, k) / math.sqrt(q.shape[-1]) - m, dim=-1, dtype=torch.float32).to(q.dtype) @ v,
         "the mask is subtracted: its huge negative numbers become huge positive ones, so the masked keys win (sign)",
         "scores + mask"),
        (lambda q, k, v, m: F.softmax(_scores(q, k) / math.sqrt(q.shape[-1]) + m, dim=-1, dtype=torch.float32).to(q.dtype) @ v.transpose(-2, -1),
         "v is transposed: the weights (q_len, kv_len) multiply v (kv_len, d) as it is", "weights @ v"),
        (lambda q, k, v, m: F.softmax(_scores(q, k) / math.sqrt(q.shape[-1]) + m, dim=-1, dtype=torch.float32) @ v.float(),
         "the output stays float32 (dtype): cast the softmax back to q's dtype before multiplying by v",
         "F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v"),
    ],
)


def _kv_cache_bytes_reference(config: LlamaConfig, batch_size: int, seq_len: int, dtype: torch.dtype) -> int:
    cache = StaticCache(config, batch_size, seq_len, device="meta", dtype=dtype)
    return sum(t.numel() * t.element_size() for t in cache.key_cache + cache.value_cache)


def _kv_bytes(c, b, s, dt, heads=None, kv=2, layers=None):
    heads = c.num_key_value_heads if heads is None else heads
    layers = c.num_hidden_layers if layers is None else layers
    return kv * layers * b * heads * s * c.head_dim * torch.empty(0, dtype=dt).element_size()


register(
    "kv_cache_bytes", "04_attention", "(config, batch_size, seq_len, dtype)",
    "bytes the keys and values of every layer take for batch_size sequences of seq_len tokens",
    reference=_kv_cache_bytes_reference,
    cases=lambda: [("Llama 2 7B, fp16, 4096 tokens", (LlamaConfig.from_preset("llama2-7b"), 1, 4096, torch.float16)),
                   ("Llama 2 70B (8 kv heads), bf16, batch 4", (LlamaConfig.from_preset("llama2-70b"), 4, 2048, torch.bfloat16)),
                   ("stories260K, float32", (LlamaConfig.from_preset("stories260k"), 2, 512, torch.float32))],
    mistakes=[
        (lambda c, b, s, dt: _kv_bytes(c, b, s, dt, heads=c.num_attention_heads),
         "you counted num_attention_heads; the cache holds only num_key_value_heads (grouped-query attention)",
         "use config.num_key_value_heads"),
        (lambda c, b, s, dt: _kv_bytes(c, b, s, dt, kv=1), "only the keys (or only the values) are counted", "multiply by 2: keys and values"),
        (lambda c, b, s, dt: _kv_bytes(c, b, s, dt, layers=1), "one layer only", "every layer has its own cache: multiply by num_hidden_layers"),
        (lambda c, b, s, dt: _kv_bytes(c, 1, s, dt), "batch_size is missing: every sequence of the batch has its own keys and values",
         "multiply by batch_size"),
        (lambda c, b, s, dt: _kv_bytes(c, b, s, torch.float32), "4 bytes per value whatever the dtype", "use torch.empty(0, dtype=dtype).element_size()"),
        (lambda c, b, s, dt: _kv_bytes(c, b, s, dt) * 8, "you counted bits, not bytes (torch.finfo(dtype).bits)",
         "divide the bits by 8 (//), or use torch.empty(0, dtype=dtype).element_size()"),
        (lambda c, b, s, dt: _kv_bytes(c, b, c.max_position_embeddings, dt),
         "you used config.max_position_embeddings instead of seq_len", "the cache holds seq_len positions"),
        (lambda c, b, s, dt: _kv_bytes(c, b, s, dt) / 2**30, "the result is in GiB; the exercise wants bytes as an int",
         "return the byte count itself"),
        (lambda c, b, s, dt: _kv_bytes(c, b, s, dt) / 1e9, "the result is in GB; the exercise wants bytes as an int",
         "return the byte count itself"),
    ],
)
