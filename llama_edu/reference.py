"""A flat Llama forward in llama2.c's style: the whole model in one function, for checking.

It runs a Meta-layout state dict (``tok_embeddings``, ``layers.N.attention.wq``, ...,
interleaved q/k) through Meta's own math: complex-number RoPE, ``freqs_cis = polar(1, m *
theta_i)`` and ``x_rotated = x_complex * freqs_cis``, no caches, no padding, no options. It shares
nothing with the package's model but the RoPE frequencies, so comparing the two checks each.
Notebook 06 builds the full model around it; the tests compare with it.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from .rope import rope_inv_freq


def meta_apply_scaling(freqs: torch.Tensor, scale_factor: float = 8.0, high_freq_factor: float = 4.0) -> torch.Tensor:
    """Llama 3.1's ``use_scaled_rope`` as Meta's llama-models computes it, one frequency at a
    time (low_freq_factor 1, original context 8192): keep the fast ones, divide the slow ones by
    ``scale_factor``, blend in between."""
    low_freq_factor, old_context_len = 1.0, 8192
    new = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old_context_len / high_freq_factor:
            new.append(freq)
        elif wavelen > old_context_len / low_freq_factor:
            new.append(freq / scale_factor)
        else:
            smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            new.append((1 - smooth) * freq / scale_factor + smooth * freq)
    return torch.stack(new)


def reference_forward(
    sd: dict[str, torch.Tensor], params: dict[str, Any], tokens: torch.Tensor, start_pos: int = 0
) -> torch.Tensor:
    """Logits (batch, seq, vocab) of Meta's ``Transformer.forward`` on an unsharded Meta state
    dict (Meta key names, interleaved q/k), with Meta's complex-number RoPE:
    ``freqs_cis = polar(1, m * theta_i)`` and ``x_rotated = x_complex * freqs_cis``.

    The tokens sit at positions ``start_pos ..`` (attending only to each other: no cache);
    ``params["use_scaled_rope"]`` applies Llama 3.1's :func:`meta_apply_scaling`. Without an
    ``output.weight`` the embedding is the output layer (tied, as in Llama 3.2 1B/3B)."""
    dim, n_heads = params["dim"], params["n_heads"]
    n_kv = params.get("n_kv_heads") or n_heads
    head_dim, eps = dim // n_heads, params.get("norm_eps", 1e-5)
    theta = float(params.get("rope_theta", 10000.0))
    bsz, seqlen = tokens.shape
    dev = tokens.device

    def rmsnorm(x, w):
        return (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * w

    # precompute_freqs_cis: one unit complex number per (position, pair)
    freqs = rope_inv_freq(head_dim, theta, dev)  # theta_i = theta^(-2i/d)
    if params.get("use_scaled_rope"):
        freqs = meta_apply_scaling(freqs, params.get("rope_scaling_factor") or 8.0, params.get("rope_high_freq_factor") or 4.0)
    positions = torch.arange(start_pos, start_pos + seqlen, device=dev).float()
    angles = torch.outer(positions, freqs)  # (seq, head_dim/2): m * theta_i
    freqs_cis = torch.polar(torch.ones_like(angles), angles)

    def rope(x):  # (b, s, heads, head_dim): neighbours (2i, 2i+1) are one complex number
        xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(xc * freqs_cis[None, :, None, :]).flatten(3).type_as(x)

    mask = torch.full((seqlen, seqlen), float("-inf"), device=dev).triu(1)
    h = F.embedding(tokens, sd["tok_embeddings.weight"])
    for i in range(params["n_layers"]):
        p = f"layers.{i}."
        x = rmsnorm(h, sd[p + "attention_norm.weight"])
        xq = (x @ sd[p + "attention.wq.weight"].T).view(bsz, seqlen, n_heads, head_dim)
        xk = (x @ sd[p + "attention.wk.weight"].T).view(bsz, seqlen, n_kv, head_dim)
        xv = (x @ sd[p + "attention.wv.weight"].T).view(bsz, seqlen, n_kv, head_dim)
        xq, xk = rope(xq), rope(xk)
        rep = n_heads // n_kv  # repeat_kv
        xk, xv = xk.repeat_interleave(rep, dim=2), xv.repeat_interleave(rep, dim=2)
        q, k, v = (t.transpose(1, 2) for t in (xq, xk, xv))  # (b, heads, s, head_dim)
        scores = q @ k.transpose(2, 3) / math.sqrt(head_dim) + mask
        out = (F.softmax(scores.float(), dim=-1).type_as(q) @ v).transpose(1, 2).reshape(bsz, seqlen, -1)
        h = h + out @ sd[p + "attention.wo.weight"].T
        x = rmsnorm(h, sd[p + "ffn_norm.weight"])
        ff = F.silu(x @ sd[p + "feed_forward.w1.weight"].T) * (x @ sd[p + "feed_forward.w3.weight"].T)
        h = h + ff @ sd[p + "feed_forward.w2.weight"].T
    return (rmsnorm(h, sd["norm.weight"]) @ sd.get("output.weight", sd["tok_embeddings.weight"]).T).float()
