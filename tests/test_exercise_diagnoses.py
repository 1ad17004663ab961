"""A held-out set of plausible mistakes, written the way a learner would (not copies of the
registered ones), each with the words a useful diagnosis must contain. The checkers must reject
every one and name at least 4 in 5; the rest must at least say where the first difference is.

Run as a script to print the table and the rate (also against an older checker:
``PYTHONPATH=/path/to/old python tests/test_exercise_diagnoses.py``)."""

from __future__ import annotations

import contextlib
import io
import math
import re
import sys

import pytest
import torch
import torch.nn.functional as F

from llama_edu.exercises import check


def _chunks(x):
    return x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]


def _rh(x):
    a, b = _chunks(x)
    return torch.cat((-b, a), dim=-1)


def _mask_rows(q, k, dt, keep):
    i = torch.arange(q).unsqueeze(1) + (k - q)
    j = torch.arange(k).unsqueeze(0)
    m = torch.zeros(q, k, dtype=dt)
    m[~keep(i, j)] = torch.finfo(dt).min
    return m


def _probs_sorted(logits):
    p = torch.softmax(logits, dim=-1)
    return torch.sort(p, dim=-1, descending=True)


def _tp_keep_while_below(logits, top_p):
    sp, idx = _probs_sorted(logits)
    cum = torch.cumsum(sp, -1)
    remove_sorted = cum > top_p
    remove = torch.zeros_like(remove_sorted).scatter(-1, idx, remove_sorted)
    return torch.where(remove, torch.full_like(logits, -float("inf")), logits)


def _tp_zero(logits, top_p):
    sp, idx = _probs_sorted(logits)
    remove_sorted = (torch.cumsum(sp, -1) - sp) >= top_p
    remove_sorted[..., 0] = False
    remove = torch.zeros_like(remove_sorted).scatter(-1, idx, remove_sorted)
    return logits.masked_fill(remove, 0)


def _tp_on_logits(logits, top_p):
    sl, idx = torch.sort(logits, dim=-1, descending=True)
    remove_sorted = (torch.cumsum(sl, -1) - sl) >= top_p
    remove_sorted[..., 0] = False
    remove = torch.zeros_like(remove_sorted).scatter(-1, idx, remove_sorted)
    return logits.masked_fill(remove, -float("inf"))


def _greedy_full(model, ids, n):
    for _ in range(n):
        nxt = model(input_ids=ids).logits[:, -1, :].argmax(dim=-1, keepdim=True)
        ids = torch.cat((ids, nxt), dim=1)
    return ids


def _greedy_new_only(model, ids, n):
    out = model(ids, use_cache=True)
    new = []
    for _ in range(n):
        t = out.logits[:, -1].argmax(-1, keepdim=True)
        new.append(t)
        out = model(t, past_key_values=out.past_key_values, use_cache=True)
    return torch.cat(new, -1)


def _greedy_extra(model, ids, n):
    out = model(ids, use_cache=True)
    t = out.logits[:, -1].argmax(-1, keepdim=True)
    ids = torch.cat([ids, t], -1)
    for _ in range(n):
        out = model(t, past_key_values=out.past_key_values, use_cache=True)
        t = out.logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, t], -1)
    return ids


def _chat(messages, strip=True, close=" </s>", bos_every=True):
    sys_msg = None
    if messages[0]["role"] == "system":
        sys_msg, messages = messages[0]["content"], messages[1:]
    text = ""
    for k, m in enumerate(messages):
        c = m["content"]
        if k == 0 and sys_msg:
            c = f"<<SYS>>\n{sys_msg}\n<</SYS>>\n\n{c}"
        c = c.strip() if strip else c
        if m["role"] == "user":
            text += ("<s>" if bos_every or k == 0 else "") + f"[INST] {c} [/INST]"
        else:
            text += f" {c}{close}"
    return text


def _loss_per_row(logits, labels):
    lg, lb = logits[:, :-1], labels[:, 1:]
    rows = [F.cross_entropy(lg[b], lb[b], ignore_index=-100) for b in range(lg.shape[0])]
    return torch.stack(rows).mean()


def _f1_counts(t, p):
    tp = sum(a == 1 and b == 1 for a, b in zip(t, p))
    fp = sum(a == 0 and b == 1 for a, b in zip(t, p))
    fn = sum(a == 1 and b == 0 for a, b in zip(t, p))
    return tp, fp, fn


def _precision(t, p):
    tp, fp, fn = _f1_counts(t, p)
    return tp / (tp + fp) if tp + fp else 0.0


def _recall(t, p):
    tp, fp, fn = _f1_counts(t, p)
    return tp / (tp + fn) if tp + fn else 0.0


def _labels(ids, spans, fill=-100, shift=0, incl=0):
    out = torch.full_like(ids, fill)
    for s, e in spans:
        out[s + shift: e + incl] = ids[s + shift: e + incl]
    return out


def _labels_inverted(ids, spans):
    out = ids.clone()
    for s, e in spans:
        out[s:e] = -100
    return out


def _nf4(packed, absmax, code, low_first=False, scale=True):
    hi, lo = (packed >> 4).long(), (packed & 15).long()
    idx = torch.stack((lo, hi) if low_first else (hi, lo), -1).flatten()
    vals = code[idx]
    if scale:
        vals = (vals.view(-1, 64) * absmax.view(-1, 1)).flatten()
    return vals


def _count(c, attn_heads_for_kv=False, tied=True, embed=True, norms=True):
    d = c.hidden_size
    kv = c.num_attention_heads if attn_heads_for_kv else c.num_key_value_heads
    layer = d * d + 2 * d * kv * c.head_dim + d * c.num_attention_heads * c.head_dim - d * d + d * d + 3 * d * c.intermediate_size
    layer += 2 * d if norms else 0
    head = 0 if (c.tie_word_embeddings and tied) else c.vocab_size * d
    return (c.vocab_size * d if embed else 0) + c.num_hidden_layers * layer + d + head


# (exercise, the learner's wrong answer, a regex the diagnosis must match to name the mistake)
HELD_OUT = [
    # 00 softmax
    ("softmax", lambda x, dim: torch.exp(x) / torch.sum(torch.exp(x), dim=dim, keepdim=True), r"overflow"),
    ("softmax", lambda x, dim: (lambda e: e / e.sum(dim, keepdim=True))(torch.exp(x - x.max())), r"maximum of the whole tensor|whole tensor"),
    ("softmax", lambda x, dim: x - torch.logsumexp(x, dim, keepdim=True), r"log-probabilities|log_softmax"),
    ("softmax", lambda x, dim: (lambda e: e / e.sum(-1, keepdim=True))(torch.exp(x - x.max(-1, keepdim=True).values)), r"last dimension"),
    ("softmax", lambda x, dim: (lambda e: e / e.sum())(torch.exp(x - x.max(dim, keepdim=True).values)), r"sum of all the elements"),
    # 01 merge_pair
    ("merge_pair", lambda s, p: "|".join(s).replace("|".join(p), "".join(p)).split("|") if s else [], r"joined string"),
    ("merge_pair", lambda s, p: next((s[:i] + [p[0] + p[1]] + s[i + 2:] for i in range(len(s) - 1) if (s[i], s[i + 1]) == tuple(p)), list(s)), r"only the first occurrence"),
    # 02 rms_norm
    ("rms_norm", lambda h, w, eps: w * (h.float() / (torch.sqrt(torch.mean(h.float() ** 2, dim=-1, keepdim=True)) + eps)).to(h.dtype), r"eps is added outside"),
    ("rms_norm", lambda h, w, eps: w * h / torch.sqrt((h * h).mean(-1, keepdim=True) + eps), r"no float32 upcast"),
    ("rms_norm", lambda h, w, eps: w * (h.float() / h.float().norm(dim=-1, keepdim=True).clamp_min(eps)).to(h.dtype), r"L2 norm|sum of squares"),
    ("rms_norm", lambda h, w, eps: w * (h.float() * torch.rsqrt(h.float().pow(2).mean(0, keepdim=True) + eps)).to(h.dtype), r"wrong dimension|over the last dimension"),
    ("rms_norm", lambda h, w, eps: (h.float() - h.float().mean(-1, keepdim=True)) / torch.sqrt(h.float().var(-1, keepdim=True, unbiased=False) + eps) * w, r"LayerNorm"),
    ("rms_norm", lambda h, w, eps: (h.float() * torch.rsqrt(h.float().pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype), r"gain `weight` is missing"),
    # 03 rope
    ("rotate_half", lambda x: torch.cat((_chunks(x)[1], -_chunks(x)[0]), -1), r"sign is on the wrong half"),
    ("rotate_half", lambda x: torch.cat((-_chunks(x)[1], _chunks(x)[0])), r"dim 0|along dimension 0|concatenat"),
    ("rotate_half", lambda x: torch.flip(x, [-1]), r"reversed|flip"),
    ("rotate_half", lambda x: torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).reshape(x.shape), r"neighbouring pairs"),
    ("apply_rotary_pos_emb", lambda q, k, c, s: (q * c[:, None] - _rh(q) * s[:, None], k * c[:, None] - _rh(k) * s[:, None]), r"sine term has the wrong sign"),
    ("apply_rotary_pos_emb", lambda q, k, c, s: (q * c.unsqueeze(2) + _rh(q) * s.unsqueeze(2), k * c.unsqueeze(2) + _rh(k) * s.unsqueeze(2)), r"unsqueezed at dim 2"),
    ("apply_rotary_pos_emb", lambda q, k, c, s: (q * c[:, None] + _rh(q) * s[:, None], k), r"only q is rotated"),
    ("apply_rotary_pos_emb", lambda q, k, c, s: q * c[:, None] + _rh(q) * s[:, None], r"tuple of 2|\(q_embed, k_embed\)|both"),
    ("rope_inv_freq", lambda d, base: base ** (-torch.arange(d // 2).float() / d), r"exponent is i/d"),
    ("rope_inv_freq", lambda d, base: 1.0 / base ** (torch.arange(d).float() / d), r"one (frequency|theta) per (dimension|pair)|head_dim // 2"),
    ("rope_inv_freq", lambda d, base: torch.tensor([base ** (2 * i / d) for i in range(d // 2)]), r"wavelength"),
    ("rope_cos_sin", lambda p, d, b: (lambda a: (a.cos(), a.sin()))(torch.stack([p[..., None].float() / b ** (torch.arange(0, d, 2).float() / d)] * 2, -1).flatten(-2)), r"neighbouring slots"),
    ("rope_cos_sin", lambda p, d, b: (lambda a: (a.sin(), a.cos()))(torch.cat([p[..., None].float() / b ** (torch.arange(0, d, 2).float() / d)] * 2, -1)), r"cos and sin are swapped|swapped"),
    ("rope_cos_sin", lambda p, d, b: (lambda a: (a.cos(), a.sin()))(p[..., None].float() / b ** (torch.arange(0, d, 2).float() / d)), r"head_dim / 2 slots"),
    ("dynamic_ntk_base", lambda b, d, L, Lt, f: b * ((f * L / Lt) - (f - 1)) ** (d / (d - 2)), r"inside the training context"),
    ("dynamic_ntk_base", lambda b, d, L, Lt, f: b if L <= Lt else b * (L / Lt) ** (d / (d - 2)), r"factor"),
    # 04 attention
    ("causal_mask", lambda q, k, dt: torch.triu(torch.full((q, k), torch.finfo(dt).min, dtype=dt), diagonal=1), r"cache offset is ignored"),
    ("causal_mask", lambda q, k, dt: torch.triu(torch.full((q, k), torch.finfo(dt).min, dtype=dt), diagonal=k - q), r"off by one"),
    ("causal_mask", lambda q, k, dt: torch.triu(torch.full((q, k), float("-inf"), dtype=dt), diagonal=k - q + 1), r"-inf instead"),
    ("causal_mask", lambda q, k, dt: torch.ones(q, k, dtype=torch.bool).tril(k - q), r"boolean|additive"),
    ("causal_mask", lambda q, k, dt: _mask_rows(q, k, dt, lambda i, j: j >= i), r"upside down"),
    ("repeat_kv", lambda h, n: torch.cat([h] * n, dim=1), r"tiles the heads"),
    ("repeat_kv", lambda h, n: h.repeat_interleave(n, dim=-1), r"last dimension|head_dim|dim -1|dim 3"),
    ("repeat_kv", lambda h, n: h.repeat_interleave(n, dim=2), r"sequence axis"),
    ("attention", lambda q, k, v, m: torch.softmax(q @ k.transpose(2, 3) / math.sqrt(q.size(-1)) + m, dim=2) @ v, r"softmax runs over the queries"),
    ("attention", lambda q, k, v, m: torch.softmax((q @ k.mT).float() + m, -1).to(q.dtype) @ v, r"not divided by sqrt\(d\)"),
    ("attention", lambda q, k, v, m: (torch.softmax((q @ k.mT / math.sqrt(q.shape[-1])).float(), -1) + m).to(q.dtype) @ v, r"after the softmax"),
    ("attention", lambda q, k, v, m: torch.softmax((q @ k.mT / math.sqrt(q.shape[-1])).float(), -1).to(q.dtype) @ v, r"mask is not applied"),
    ("attention", lambda q, k, v, m: torch.softmax((q @ k / math.sqrt(q.shape[-1])).float() + m, -1).to(q.dtype) @ v, r"not transposed|k\^T|transpose"),
    ("attention", lambda q, k, v, m: torch.softmax((q @ k.mT / math.sqrt(k.shape[-2])).float() + m, -1).to(q.dtype) @ v, r"sqrt of the (wrong|sequence)|number of keys|head_dim"),
    ("kv_cache_bytes", lambda c, b, s, dt: 2 * c.num_hidden_layers * b * c.hidden_size * s * torch.finfo(dt).bits // 8, r"num_attention_heads"),
    ("kv_cache_bytes", lambda c, b, s, dt: 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * s * torch.finfo(dt).bits // 8, r"batch_size is missing"),
    ("kv_cache_bytes", lambda c, b, s, dt: 2 * c.num_hidden_layers * b * c.num_key_value_heads * c.head_dim * s * torch.finfo(dt).bits / 8, r"should be an int"),
    # 05 block
    ("swiglu", lambda x, g, u, d: F.linear(F.linear(x, g) * F.silu(F.linear(x, u)), d), r"SiLU is on the up branch"),
    ("swiglu", lambda x, g, u, d: F.linear(torch.relu(F.linear(x, g)) * F.linear(x, u), d), r"ReLU"),
    ("swiglu", lambda x, g, u, d: F.linear(torch.sigmoid(F.linear(x, g)) * F.linear(x, u), d), r"sigmoid"),
    ("swiglu", lambda x, g, u, d: F.linear(F.silu(F.linear(x, g)) + F.linear(x, u), d), r"added|multipl"),
    ("decoder_layer", lambda L, x, c, s, m: L.post_attention_layernorm(L.input_layernorm(x + L.self_attn(x, c, s, m)[0]) + L.mlp(L.input_layernorm(x + L.self_attn(x, c, s, m)[0]))), r"post-norm"),
    ("decoder_layer", lambda L, x, c, s, m: (lambda h: h + L.mlp(L.input_layernorm(h)))(x + L.self_attn(L.input_layernorm(x), c, s, m)[0]), r"same norm is used twice"),
    ("decoder_layer", lambda L, x, c, s, m: (lambda h: h + L.mlp(L.post_attention_layernorm(x)))(x + L.self_attn(L.input_layernorm(x), c, s, m)[0]), r"MLP.*(input|x)"),
    ("decoder_layer", lambda L, x, c, s, m: (lambda h: (h + L.mlp(L.post_attention_layernorm(h)), None))(x + L.self_attn(L.input_layernorm(x), c, s, m)[0]), r"should be a tensor, got tuple|returns a tuple"),
    ("llama_intermediate_size", lambda d, m=256, f=None: int(2 * 4 * d / 3 * (f or 1)), r"multiple_of|round"),
    ("llama_intermediate_size", lambda d, m=256, f=None: m * math.ceil(int(8 * d / 3) / m), r"ffn_dim_multiplier"),
    # 06 count_parameters
    ("count_parameters", lambda c: _count(c, attn_heads_for_kv=True), r"num_key_value_heads"),
    ("count_parameters", lambda c: _count(c, tied=False), r"counted twice"),
    ("count_parameters", lambda c: _count(c, norms=False), r"RMSNorm weights"),
    ("count_parameters", lambda c: _count(c, embed=False), r"embedding"),
    # 07 permute_qk
    ("permute_qk", lambda w, n: w.reshape(n, 2, -1, w.shape[1]).transpose(1, 2).reshape(w.shape), r"inverse"),
    ("permute_qk", lambda w, n: w.reshape(-1, 2, w.shape[1]).transpose(0, 1).reshape(w.shape), r"whole matrix"),
    # 08 generation
    ("greedy_decode", _greedy_full, r"past_key_values|recomputes"),
    ("greedy_decode", _greedy_new_only, r"only the new tokens"),
    ("greedy_decode", _greedy_extra, r"one token too many"),
    ("top_p_filter", _tp_keep_while_below, r"crosses top_p"),
    ("top_p_filter", _tp_zero, r"set to 0"),
    ("top_p_filter", _tp_on_logits, r"logits, not (the )?probabilities|softmax"),
    ("top_k_filter", lambda x, k: x.masked_fill(x < torch.topk(x, k).values[..., -1:], float("-inf")), r"larger than the vocabulary"),
    ("top_k_filter", lambda x, k: torch.full_like(x, float("-inf")).scatter(-1, x.topk(min(k, x.shape[-1]), -1).indices, x.topk(min(k, x.shape[-1]), -1).values), r"ties"),
    ("repetition_penalty", lambda ids, x, p: x.scatter(-1, ids, x.gather(-1, ids) / p), r"negative logits are divided"),
    ("repetition_penalty", lambda ids, x, p: x.scatter(-1, ids, torch.where(x.gather(-1, ids) > 0, x.gather(-1, ids) * p, x.gather(-1, ids) / p)), r"inverted|upside|more likely"),
    ("temperature", lambda x, t: x / (1 / t), r"multiplied by the temperature"),
    # 09 chat
    ("llama2_chat_prompt", lambda ms: _chat(ms, strip=False), r"not stripped"),
    ("llama2_chat_prompt", lambda ms: _chat(ms, close=""), r"not closed by </s>"),
    ("llama2_chat_prompt", lambda ms: _chat(ms, bos_every=False), r"<s> is written once"),
    # 10 loss
    ("causal_lm_loss", lambda lg, lb: F.cross_entropy(lg.flatten(0, 1), lb.flatten(), ignore_index=-100), r"not shifted"),
    ("causal_lm_loss", lambda lg, lb: F.cross_entropy(lg[:, 1:].flatten(0, 1), lb[:, :-1].flatten(), ignore_index=-100), r"wrong way"),
    ("causal_lm_loss", lambda lg, lb: F.cross_entropy(lg[:, :-1].flatten(0, 1), lb[:, 1:].flatten(), ignore_index=-100, reduction="sum"), r"sum over tokens"),
    ("causal_lm_loss", _loss_per_row, r"per sequence|each sequence|per row"),
    # 11 f1
    ("spam_f1", lambda t, p: sum(int(a == b) for a, b in zip(t, p)) / len(t), r"accuracy"),
    ("spam_f1", _precision, r"precision"),
    ("spam_f1", _recall, r"recall"),
    # 12 lora
    ("lora_forward", lambda x, w, a, b, alpha, r: F.linear(x, w) + F.linear(F.linear(x, a), b), r"not scaled by alpha / r"),
    ("lora_forward", lambda x, w, a, b, alpha, r: F.linear(x, w) + alpha * F.linear(F.linear(x, a), b), r"scaled by alpha, not alpha / r"),
    ("lora_forward", lambda x, w, a, b, alpha, r: alpha / r * F.linear(F.linear(x, a), b), r"base output"),
    # 13 sft / dpo
    ("assistant_labels", lambda ids, spans: _labels(ids, spans, fill=0), r"hold 0"),
    ("assistant_labels", lambda ids, spans: _labels(ids, spans, incl=1), r"end is included"),
    ("assistant_labels", _labels_inverted, r"inverted"),
    ("dpo_loss", lambda pc, pr, rc, rr, b: -torch.log(torch.sigmoid(b * ((pc - rc) - (pr - rr)))).mean(), r"overflows"),
    ("dpo_loss", lambda pc, pr, rc, rr, b: -F.logsigmoid(b * (pc - pr)).mean(), r"reference model is missing"),
    ("dpo_loss", lambda pc, pr, rc, rr, b: F.softplus(b * ((pc - rc) - (pr - rr))).mean(), r"sign is flipped"),
    # 14 quantization
    ("absmax_quantize", lambda w: ((w / (w.abs().amax(1, keepdim=True).clamp_min(1e-12) / 127)).to(torch.int8), w.abs().amax(1) / 127), r"truncated|round"),
    ("absmax_quantize", lambda w: (torch.round(w / (w.abs().max() / 127)).to(torch.int8), (w.abs().max() / 127).repeat(w.shape[0])), r"one scale for the whole tensor"),
    ("absmax_dequantize", lambda q, s: q.float() / s.unsqueeze(1), r"divided by the scale"),
    ("absmax_dequantize", lambda q, s: q.float() * s, r"broadcast along the columns"),
    ("nf4_lookup", lambda p, a, c: _nf4(p, a, c, low_first=True), r"low nibble"),
    ("nf4_lookup", lambda p, a, c: _nf4(p, a, c, scale=False), r"not multiplied by their block"),
    # 16 distributed
    ("local_rows", lambda x, r, w: x[r::w], r"strided"),
    ("row_parallel_linear", lambda x, wt, world: torch.stack([xi @ wi.T for xi, wi in zip(x.chunk(world, -1), wt.chunk(world, -1))]).mean(0), r"averaged"),
    ("row_parallel_linear", lambda x, wt, world: x @ wt.T, r"all \d+ input features at once"),
]


def diagnose(name, fn):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        ok = check(name, fn)
    return ok, buf.getvalue()


def _first_difference_said(out):
    return bool(re.search(r"index \(|shape|dtype|expected|raised", out))


def table():
    rows = []
    for name, fn, phrase in HELD_OUT:
        ok, out = diagnose(name, fn)
        rows.append((name, phrase, ok, bool(re.search(phrase, out)), _first_difference_said(out), out))
    return rows


def test_every_held_out_mistake_is_rejected_and_most_are_named():
    rows = table()
    assert len(rows) >= 60
    accepted = [(n, p) for n, p, ok, *_ in rows if ok]
    assert not accepted, accepted
    named = sum(r[3] for r in rows)
    unnamed = [(n, p, out) for n, p, ok, hit, where, out in rows if not hit]
    assert named >= len(rows) - 1, f"{named}/{len(rows)} named; not named: {unnamed}"  # 100 of 101, then 101
    for n, p, out in unnamed:  # the rest still say where the answer first differs
        assert _first_difference_said(out), (n, p, out)


if __name__ == "__main__":
    rows = table()
    for name, phrase, ok, hit, where, out in rows:
        print(f"{'ACCEPTED' if ok else ('named   ' if hit else 'unnamed ')} {name:24s} {phrase}")
    named = sum(r[3] for r in rows)
    print(f"{named}/{len(rows)} named ({named / len(rows):.0%}); {sum(r[2] for r in rows)} accepted")
    sys.exit(0)


def _merge_in_place(symbols, pair):
    i = 0
    while i < len(symbols) - 1:
        if (symbols[i], symbols[i + 1]) == tuple(pair):
            symbols[i:i + 2] = [pair[0] + pair[1]]
        i += 1
    return symbols


def _labels_shifted_right(ids, spans):
    out = torch.full_like(ids, -100)
    for s, e in spans:
        out[s + 1:e + 1] = ids[s:e][: len(out[s + 1:e + 1])]
    return out


# Written after the registered mistakes were last changed. It was held out until the checker's
# diagnoses were extended (issue 18): its 11 unnamed mistakes then guided new registered mistakes and
# generic diagnoses, so FRESH is no longer held out either; the honest rate is a blind set's.
FRESH = [
    ("softmax", lambda x, dim: torch.exp(x - x.max(dim, keepdim=True).values) / torch.exp(x).sum(dim, keepdim=True), r"maximum|overflow"),
    ("rms_norm", lambda h, w, eps: w * (h.float() / torch.sqrt(h.float().pow(2).mean(-1, keepdim=True))).to(h.dtype) + eps, r"eps"),
    ("rms_norm", lambda h, w, eps: w * (h.float() / torch.sqrt(h.float().var(-1, keepdim=True) + eps)).to(h.dtype), r"variance|mean|LayerNorm"),
    ("rotate_half", lambda x: torch.cat((-x.chunk(2, 0)[1], x.chunk(2, 0)[0]), -1) if x.dim() > 1 else torch.cat((-x.chunk(2)[1], x.chunk(2)[0])), r"dim 0|dimension 0|last dimension"),
    ("apply_rotary_pos_emb", lambda q, k, c, s: (q * c[:, None] + _rh(q) * c[:, None], k * c[:, None] + _rh(k) * c[:, None]), r"sin"),
    ("causal_mask", lambda q, k, dt: torch.full((q, k), torch.finfo(dt).min, dtype=dt).triu(k - q + 1)[None, None], r"dimension of size 1|shape"),
    ("repeat_kv", lambda h, n: h.unsqueeze(1).expand(h.shape[0], n, *h.shape[1:]).reshape(h.shape[0], -1, *h.shape[2:]), r"tiles the heads"),
    ("attention", lambda q, k, v, m: torch.softmax((q @ k.mT / math.sqrt(q.shape[-2])).float() + m, -1).to(q.dtype) @ v, r"sqrt|scale|head_dim"),
    ("decoder_layer", lambda L, x, c, s, m: (lambda h: L.post_attention_layernorm(h) + L.mlp(L.post_attention_layernorm(h)))(x + L.self_attn(L.input_layernorm(x), c, s, m)[0]), r"residual|normalised"),
    ("count_parameters", lambda c: _count(c) - c.hidden_size, r"final norm"),
    ("greedy_decode", lambda m, ids, n: _greedy_full(m, ids, n - 1) if n > 1 else ids, r"one token short"),
    ("top_k_filter", lambda x, k: x.masked_fill(x < x.sort(-1).values[..., min(k, x.shape[-1]) - 1:min(k, x.shape[-1])], float("-inf")), r"smallest|ascending|sort"),
    ("temperature", lambda x, t: torch.log_softmax(x / t, -1), r"shift|constant|log|probabilit"),
    ("causal_lm_loss", lambda lg, lb: F.nll_loss(lg[:, :-1].flatten(0, 1), lb[:, 1:].flatten(), ignore_index=-100), r"log_softmax|log-probabilit|raw logits"),
    ("spam_f1", lambda t, p: (lambda tp, fp, fn: tp / (tp + fp + fn) if tp else 0.0)(*_f1_counts(t, p)), r"2 TP|harmonic|factor 2|Jaccard"),
    ("lora_forward", lambda x, w, a, b, alpha, r: F.linear(x, w) + (alpha // r) * F.linear(F.linear(x, a), b), r"integer division|alpha // r|alpha / r"),
    ("assistant_labels", _labels_shifted_right, r"shifted"),
    ("dpo_loss", lambda pc, pr, rc, rr, b: -F.logsigmoid(b * (pc - rc) - (pr - rr)).mean(), r"beta"),
    ("absmax_dequantize", lambda q, s: q.float() * s.unsqueeze(0), r"broadcast|column|row"),
    ("local_rows", lambda x, r, w: x[r * x.shape[0] // w:(r + 1) * x.shape[0] // w + 1], r"off by one|one row too many|B / world"),
    ("merge_pair", _merge_in_place, r"changed its input"),
    ("kv_cache_bytes", lambda c, b, s, dt: 2 * c.num_hidden_layers * b * c.num_key_value_heads * s * (c.hidden_size // c.num_key_value_heads) * torch.finfo(dt).bits // 8, r"head_dim|num_key_value_heads|hidden_size"),
]


def test_fresh_set_is_rejected_and_mostly_named():
    rows = [(n, p, *diagnose(n, fn)) for n, fn, p in FRESH]
    assert not [(n, p) for n, p, ok, out in rows if ok]
    named = sum(bool(re.search(p, out)) for n, p, ok, out in rows)
    # 9 of 22 when first run; 11 after generic diagnoses; 22 after issue 18's mistakes and argument variants
    assert named == len(rows), [(n, p, out) for n, p, ok, out in rows if not re.search(p, out)]
    for n, p, ok, out in rows:
        assert _first_difference_said(out) or "changed its input" in out, (n, out)


# --- LATER: written after the registered mistakes of issue 18, the learner's way (loops, other ops), to
# see that the matching generalises beyond the registered formulas. Not held out: it guided two mistakes.


def _l_sm_dim0_max(x, dim):
    e = torch.exp(x - x.max(0, keepdim=True).values)
    return e / e.sum(dim, keepdim=True)


def _l_rms_no_cast_back(h, w, eps):
    x = h.to(torch.float32)
    var = x.pow(2).mean(-1, keepdim=True)
    return w.float() * x * torch.rsqrt(var + eps)


def _l_rms_eps_sqrt(h, w, eps):
    x = h.float()
    return w * (x / (x.pow(2).mean(-1, keepdim=True).sqrt() + math.sqrt(eps))).to(h.dtype)


def _l_attn_scale_hidden(q, k, v, m):
    s = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(q.shape[1] * q.shape[-1])
    return torch.softmax((s + m).float(), -1).to(q.dtype) @ v


def _l_attn_mask_on_weights(q, k, v, m):
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    p = torch.softmax(s.float(), -1)
    p = p.masked_fill(m < 0, 0)
    return p.to(q.dtype) @ v


def _l_loss_mean_all(lg, lb):
    l = F.cross_entropy(lg[:, :-1].reshape(-1, lg.size(-1)), lb[:, 1:].reshape(-1), reduction="none", ignore_index=-100)
    return l.mean()


def _l_loss_label_logits_same(lg, lb):
    return F.cross_entropy(lg[:, 1:].reshape(-1, lg.size(-1)), lb[:, 1:].reshape(-1))


def _l_labels_inplace(ids, spans):
    keep = torch.zeros_like(ids, dtype=torch.bool)
    for s, e in spans:
        keep[s:e] = True
    ids[~keep] = -100
    return ids


def _l_labels_end_plus(ids, spans):
    out = torch.full_like(ids, -100)
    for s, e in spans:
        out[s:e + 1] = ids[s:e + 1]
    return out


def _l_greedy_no_prompt(model, ids, n):
    out = model(ids, use_cache=True)
    past = out.past_key_values
    tok = out.logits[:, -1:].argmax(-1)
    new = [tok]
    for _ in range(n - 1):
        out = model(tok, past_key_values=past, use_cache=True)
        past = out.past_key_values
        tok = out.logits[:, -1:].argmax(-1)
        new.append(tok)
    return torch.cat(new, 1)


def _l_repk_view(h, n):
    b, kv, s, d = h.shape
    return h[:, :, None, :, :].expand(b, kv, n, s, d).reshape(b, kv * n, d, s).transpose(-1, -2)


def _l_count_no_norms_no_final(c):
    d = c.hidden_size
    layer = 2 * d * d + 2 * d * c.num_key_value_heads * c.head_dim + 3 * d * c.intermediate_size
    return c.vocab_size * d * (1 if c.tie_word_embeddings else 2) + c.num_hidden_layers * layer


def _l_kv_bytes_heads_for_kv(c, b, s, dt):
    return 2 * c.num_hidden_layers * b * s * c.num_attention_heads * (c.hidden_size // c.num_attention_heads) * torch.tensor([], dtype=dt).element_size()


def _l_rope_apply_kq_sin_neg(q, k, cos, sin):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)

    def rh(x):
        a, b = x.chunk(2, -1)
        return torch.cat([b, -a], -1)
    return q * cos + rh(q) * sin, k * cos + rh(k) * sin


def _l_rope_cos_sin_int(p, d, base):
    inv = 1.0 / (base ** (torch.arange(0, d, 2) / d))
    f = p[:, :, None] * inv[None, None, :]
    emb = torch.cat((f, f), dim=-1)
    return emb.cos().half().float(), emb.sin().half().float()


def _l_nf4_swap_order(packed, absmax, code):
    lo = packed & 0x0F
    hi = packed >> 4
    idx = torch.stack([lo, hi], -1).flatten().long()
    return code[idx] * absmax.repeat_interleave(64)


def _l_q8_scale_from_max(w):
    x = w.reshape(-1, 32)
    d = x.max(dim=1, keepdim=True).values / 127
    inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
    q = (torch.sign(x * inv) * torch.floor((x * inv).abs() + 0.5)).to(torch.int8)
    return torch.cat([d.half().view(torch.uint8), q.view(torch.uint8)], 1).reshape(w.shape[0], -1)


def _l_bpe_max(piece, ranks):
    parts = [bytes([b]) for b in piece]
    while len(parts) > 1:
        best = None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and (best is None or r > best[0]):
                best = (r, i)
        if best is None:
            break
        i = best[1]
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return [ranks[p] for p in parts]


def _l_chat_no_strip_sys(ms):
    out = ""
    sys_ = None
    if ms[0]["role"] == "system":
        sys_, ms = ms[0]["content"], ms[1:]
    for i, m in enumerate(ms):
        c = m["content"].strip()
        if i == 0 and sys_:
            c = "<<SYS>>\n" + sys_ + "\n<</SYS>>\n" + c
        out += f"<s>[INST] {c} [/INST]" if m["role"] == "user" else f" {c} </s>"
    return out


def _l_lora_scale_r_only(x, w, a, b, alpha, r):
    return x @ w.T + (x @ a.T @ b.T) / r


def _l_dpo_mean_before(pc, pr, rc, rr, beta):
    z = beta * ((pc.mean() - rc.mean()) - (pr.mean() - rr.mean()))
    return -F.logsigmoid(z)


def _l_absq_no_clamp_trunc(w):
    s = w.abs().max(dim=1).values / 127
    s[s == 0] = 1
    return (w / s.unsqueeze(1)).to(torch.int8), s


def _l_local_rows_chunk_wrong(batch, rank, world):
    return batch.chunk(world, dim=1)[rank]


def _l_rowpar_mean(x, w, world):
    xs = torch.chunk(x, world, dim=-1); ws = torch.chunk(w, world, dim=1)
    return torch.stack([a @ b.T for a, b in zip(xs, ws)]).mean(0)


def _l_ntk_no_exp(base, d, L, Lt, f):
    if L <= Lt:
        return base
    return base * (f * L / Lt - (f - 1))


def _l_f1_swapped(t, p):
    tp = sum(1 for a, b in zip(t, p) if a == 0 and b == 0)
    fp = sum(1 for a, b in zip(t, p) if a == 1 and b == 0)
    fn = sum(1 for a, b in zip(t, p) if a == 0 and b == 1)
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def _l_decoder_no_second_residual(L, x, c, s, m):
    h = x + L.self_attn(L.input_layernorm(x), c, s, m)[0]
    return L.mlp(L.post_attention_layernorm(h))


def _l_swiglu_silu_manual_wrong(x, g, u, d):
    a = x @ g.T
    return ((a * torch.sigmoid(x @ u.T)) * (x @ u.T)) @ d.T


def _l_inter_no_int(d, m=256, f=None):
    h = 2 * 4 * d / 3
    if f:
        h = f * h
    return m * ((h + m - 1) // m)


def _l_perm_wrong(w, n):
    hd = w.shape[0] // n
    return w.view(n, 2, hd // 2, -1).transpose(1, 2).reshape(w.shape)


def _l_temp_mult(x, t):
    return x * t


def _l_topk_le(x, k):
    k = min(k, x.size(-1))
    v, _ = torch.topk(x, k)
    return torch.where(x <= v[..., -1, None], torch.full_like(x, -float("inf")), x)


def _l_rep_all_div(ids, x, p):
    out = x.clone()
    for b in range(ids.shape[0]):
        out[b, ids[b]] = out[b, ids[b]] / p
    return out


def _l_inv_freq_float64(d, base):
    return 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float64) / d))


def _l_mask_no_offset(q, k, dt):
    m = torch.zeros(q, k, dtype=dt)
    for i in range(q):
        for j in range(k):
            if j > i:
                m[i, j] = torch.finfo(dt).min
    return m


def _l_merge_str(symbols, pair):
    out = []
    i = 0
    while i < len(symbols):
        if i < len(symbols) - 1 and symbols[i] + symbols[i + 1] == pair[0] + pair[1]:
            out.append(pair[0] + pair[1]); i += 2
        else:
            out.append(symbols[i]); i += 1
    return out


def _l_dequant_float16(q, s):
    return q.half() * s.half()[:, None]


LATER = [
    ("softmax", _l_sm_dim0_max, r"dim|maximum"),
    ("rms_norm", _l_rms_no_cast_back, r"dtype|float32|cast"),
    ("rms_norm", _l_rms_eps_sqrt, r"eps"),
    ("attention", _l_attn_scale_hidden, r"sqrt|scale|head_dim"),
    ("attention", _l_attn_mask_on_weights, r"mask"),
    ("causal_lm_loss", _l_loss_mean_all, r"-100|ignored|count|mean"),
    ("causal_lm_loss", _l_loss_label_logits_same, r"shift"),
    ("assistant_labels", _l_labels_inplace, r"changed its input|in place"),
    ("assistant_labels", _l_labels_end_plus, r"end|off by one|half-open"),
    ("greedy_decode", _l_greedy_no_prompt, r"prompt|only the new"),
    ("repeat_kv", _l_repk_view, r"reshape|seq|head_dim|transpose"),
    ("count_parameters", _l_count_no_norms_no_final, r"norm"),
    ("kv_cache_bytes", _l_kv_bytes_heads_for_kv, r"num_key_value_heads|num_attention_heads"),
    ("apply_rotary_pos_emb", _l_rope_apply_kq_sin_neg, r"sign|wrong half|backwards"),
    ("rope_cos_sin", _l_rope_cos_sin_int, r"float16|dtype|precision|differs"),
    ("nf4_lookup", _l_nf4_swap_order, r"nibble"),
    ("q8_0_quantize", _l_q8_scale_from_max, r"max\|x\||magnitude|max\(x\)"),
    ("llama3_bpe_merge", _l_bpe_max, r"highest rank|lowest rank"),
    ("llama2_chat_prompt", _l_chat_no_strip_sys, r"<</SYS>>|newline|system"),
    ("lora_forward", _l_lora_scale_r_only, r"alpha"),
    ("dpo_loss", _l_dpo_mean_before, r"mean|per pair|average"),
    ("absmax_quantize", _l_absq_no_clamp_trunc, r"round|truncat"),
    ("local_rows", _l_local_rows_chunk_wrong, r"dim 1|dim 0|rows"),
    ("row_parallel_linear", _l_rowpar_mean, r"averaged|sum"),
    ("dynamic_ntk_base", _l_ntk_no_exp, r"exponent"),
    ("spam_f1", _l_f1_swapped, r"ham|label 0|label 1"),
    ("decoder_layer", _l_decoder_no_second_residual, r"residual"),
    ("swiglu", _l_swiglu_silu_manual_wrong, r"SiLU|sigmoid|gate"),
    ("llama_intermediate_size", _l_inter_no_int, r"int"),
    ("permute_qk", _l_perm_wrong, r"inverse|view|transpose"),
    ("temperature", _l_temp_mult, r"multipl|divide"),
    ("top_k_filter", _l_topk_le, r"k-th|<=|<"),
    ("repetition_penalty", _l_rep_all_div, r"negative"),
    ("rope_inv_freq", _l_inv_freq_float64, r"float64|float32|dtype"),
    ("causal_mask", _l_mask_no_offset, r"offset|kv_len - q_len|cache"),
    ("merge_pair", _l_merge_str, r"joined|whole symbols|string"),
    ("absmax_dequantize", _l_dequant_float16, r"float16|dtype|float32"),
]




def _m_sm_inplace(x, dim):
    x -= x.max(dim, keepdim=True).values
    x.exp_()
    return x / x.sum(dim, keepdim=True)


def _m_sm_float_keep(x, dim):
    x = x.float()
    e = (x - x.max(dim, keepdim=True).values).exp()
    return e / e.sum(dim, keepdim=True)


def _m_rms_fp16_weight_first(h, w, eps):
    x = h.float()
    return (w.float() * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)


def _m_rms_loop(h, w, eps):
    out = torch.empty_like(h)
    flat = h.reshape(-1, h.shape[-1]); o = out.view(-1, h.shape[-1])
    for i in range(flat.shape[0]):
        r = flat[i].float()
        o[i] = (r / torch.sqrt((r * r).sum() / (h.shape[-1] - 1) + eps)).to(h.dtype) * w
    return out


def _m_rot_loop(x):
    d = x.shape[-1] // 2
    out = torch.empty_like(x)
    out[..., :d] = x[..., d:]
    out[..., d:] = -x[..., :d]
    return out


def _m_rope_freq_exp(d, base):
    return torch.tensor([1 / base ** (2 * i / d) for i in range(1, d // 2 + 1)])


def _m_cos_sin_long(p, d, base):
    inv = 1.0 / base ** (torch.arange(0, d, 2).float() / d)
    a = p[..., None] * inv
    a = torch.cat([a, a], -1)
    return a.cos().to(torch.float64), a.sin().to(torch.float64)


def _m_ntk_int(base, d, L, Lt, f):
    if L <= Lt:
        return base
    return base * ((f * L // Lt) - (f - 1)) ** (d / (d - 2))


def _m_mask_neg_inf_where(q, k, dt):
    i = torch.arange(q)[:, None]; j = torch.arange(k)[None]
    return torch.where(j > i, torch.finfo(dt).min, 0.0).to(dt)


def _m_repk_loop(h, n):
    heads = []
    for i in range(h.shape[1]):
        for _ in range(n):
            heads.append(h[:, i])
    return torch.stack(heads, dim=2)


def _m_attn_noT_float(q, k, v, m):
    s = q @ k.transpose(-1, -2) / math.sqrt(q.size(-1))
    w = F.softmax(s + m, dim=-1)
    return (w @ v).float()


def _m_attn_scale_k(q, k, v, m):
    s = q @ (k / math.sqrt(k.shape[-1])).transpose(-1, -2)
    s = s / math.sqrt(k.shape[-1])
    return torch.softmax(s.float() + m, -1).to(q.dtype) @ v


def _m_kv_mb(c, b, s, dt):
    return 2 * c.num_hidden_layers * b * s * c.num_key_value_heads * c.head_dim * dt.itemsize // 2**20


def _m_swiglu_gate_up_swapped(x, g, u, d):
    return (F.silu(F.linear(x, u)) * F.linear(x, g)) @ d.T


def _m_dec_norm_after(L, x, c, s, m):
    h = x + L.input_layernorm(L.self_attn(x, c, s, m)[0])
    return h + L.post_attention_layernorm(L.mlp(h))


def _m_count_heads_kv(c):
    d = c.hidden_size
    att = 4 * d * d
    return c.vocab_size * d * (1 if c.tie_word_embeddings else 2) + c.num_hidden_layers * (att + 3 * d * c.intermediate_size + 2 * d) + d


def _m_perm_interleave_wrong_axis(w, n):
    hd = w.shape[0] // n
    return w.view(n, hd // 2, 2, -1).transpose(0, 1).reshape(w.shape)


def _m_greedy_sample(model, ids, n):
    out = model(ids, use_cache=True)
    for _ in range(n):
        nxt = out.logits[:, -1].softmax(-1).argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], 1)
        out = model(ids, use_cache=True)
    return ids


def _m_topk_sorted_idx(x, k):
    k = min(k, x.shape[-1])
    idx = x.argsort(-1, descending=True)[..., k:]
    return x.scatter(-1, idx, float("-inf"))


def _m_rep_div_all_seen_sign(ids, x, p):
    out = x.clone()
    for b in range(ids.shape[0]):
        for t in ids[b]:
            out[b, t] = out[b, t] / p
    return out


def _m_chat_sys_outside(ms):
    out = ""
    if ms[0]["role"] == "system":
        out = "<<SYS>>\n" + ms[0]["content"] + "\n<</SYS>>\n\n"; ms = ms[1:]
    for m in ms:
        c = m["content"].strip()
        out += f"<s>[INST] {c} [/INST]" if m["role"] == "user" else f" {c} </s>"
    return out


def _m_loss_no_ignore_mean_mask(lg, lb):
    lg, lb = lg[:, :-1], lb[:, 1:]
    mask = lb != -100
    lp = torch.log_softmax(lg, -1)
    nll = -lp.gather(-1, lb.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (nll * mask).mean()


def _m_lora_merge_wrong(x, w, a, b, alpha, r):
    return x @ (w + alpha / r * (a.T @ b.T)).T if a.shape[1] == b.shape[0] else x @ (w + alpha / r * b @ a)


def _m_labels_shift_left(ids, spans):
    out = torch.full_like(ids, -100)
    for s, e in spans:
        out[s - 1:e - 1] = ids[s:e]
    return out


def _m_dpo_no_mean_beta(pc, pr, rc, rr, beta):
    return -F.logsigmoid(beta * ((pc - rc) - (pr - rr))).sum() / beta


def _m_absq_rowmax_signed(w):
    m = w.max(dim=1).values
    s = torch.where(m == 0, torch.ones_like(m), m / 127)
    return torch.round(w / s[:, None]).clamp(-127, 127).to(torch.int8), s


def _m_absq_global(w):
    m = w.abs().max()
    s = (m / 127).expand(w.shape[0])
    return (w / s[:, None]).round().to(torch.int8), s


def _m_nf4_mod(packed, absmax, code):
    hi = packed // 16; lo = packed % 16
    idx = torch.stack([hi, lo], 1).reshape(-1).long()
    vals = code[idx]
    return vals * absmax.repeat(64)


def _m_rows_world(batch, rank, world):
    n = batch.shape[0] // world
    return batch[rank * n:rank * n + world]


def _m_rowpar_wrong_dim(x, w, world):
    out = 0
    for xi, wi in zip(x.split(x.shape[-1] // world, -1), w.split(w.shape[1] // world, 1)):
        out = out + xi @ wi.T
    return out / world if world > 1 else out


def _m_bpe_left_first(piece, ranks):
    parts = [piece[i:i+1] for i in range(len(piece))]
    i = 0
    while i < len(parts) - 1:
        if parts[i] + parts[i + 1] in ranks:
            parts[i:i+2] = [parts[i] + parts[i + 1]]
            i = 0
        else:
            i += 1
    return [ranks[p] for p in parts]


LATER += [
    ("softmax", _m_sm_inplace, r"changed its input|in place"),
    ("softmax", _m_sm_float_keep, r"dtype|float16|float32"),
    ("rms_norm", _m_rms_loop, r"d - 1|variance|mean|sum"),
    ("rotate_half", _m_rot_loop, r"sign|wrong half"),
    ("rope_inv_freq", _m_rope_freq_exp, r"off by one|start|i starts|2/d"),
    ("rope_cos_sin", _m_cos_sin_long, r"dtype|float64|float32"),
    ("dynamic_ntk_base", _m_ntk_int, r"integer|//|floor"),
    ("causal_mask", _m_mask_neg_inf_where, r"offset|cache|kv_len - q_len"),
    ("repeat_kv", _m_repk_loop, r"dim|axis|shape|order"),
    ("attention", _m_attn_noT_float, r"dtype|float32|float16"),
    ("attention", _m_attn_scale_k, r"sqrt|scale|d instead"),
    ("kv_cache_bytes", _m_kv_mb, r"MiB|MB|GiB|bytes"),
    ("swiglu", _m_swiglu_gate_up_swapped, r"up branch|gate"),
    ("decoder_layer", _m_dec_norm_after, r"norm|post"),
    ("count_parameters", _m_count_heads_kv, r"num_key_value_heads|k_proj|v_proj"),
    ("permute_qk", _m_perm_interleave_wrong_axis, r"head|whole|transpose|axis"),
    ("greedy_decode", _m_greedy_sample, r"past_key_values|cache|recomput"),
    ("top_k_filter", _m_topk_sorted_idx, r"ties"),
    ("repetition_penalty", _m_rep_div_all_seen_sign, r"negative|times"),
    ("llama2_chat_prompt", _m_chat_sys_outside, r"system|\[INST\]"),
    ("causal_lm_loss", _m_loss_no_ignore_mean_mask, r"-100|ignored|count"),
    ("lora_forward", _m_lora_merge_wrong, r"transpos|B A|order"),
    ("assistant_labels", _m_labels_shift_left, r"shift"),
    ("dpo_loss", _m_dpo_no_mean_beta, r"sum|mean|beta"),
    ("absmax_quantize", _m_absq_rowmax_signed, r"max\|row\||abs|magnitude"),
    ("absmax_quantize", _m_absq_global, r"whole tensor|per row|one scale"),
    ("nf4_lookup", _m_nf4_mod, r"tiled|repeat|block"),
    ("local_rows", _m_rows_world, r"world|B / world|rows"),
    ("row_parallel_linear", _m_rowpar_wrong_dim, r"averag|sum"),
    ("llama3_bpe_merge", _m_bpe_left_first, r"lowest rank|first pair"),
]


def test_later_set_is_rejected_and_mostly_named():
    rows = [(n, p, *diagnose(n, fn)) for n, fn, p in LATER]
    assert not [(n, p) for n, p, ok, out in rows if ok]
    unnamed = [(n, p, out) for n, p, ok, out in rows if not re.search(p, out)]
    assert len(unnamed) <= 0.1 * len(rows), unnamed  # 36 of 38 when written, 65 of 67 with the second part
    for n, p, out in unnamed:
        assert _first_difference_said(out), (n, out)


# --- the generic diagnoses, which name a kind of mistake in any exercise --------------------------


def test_generic_differences_name_the_kind_of_mistake():
    from llama_edu.exercises import difference

    x = torch.arange(24.0).view(2, 3, 4) + 1
    assert "reversed along dimension 2" in difference(x.flip(2), x)
    y = torch.randn(3, 2, 3, generator=torch.Generator().manual_seed(0))
    assert "dimensions 0 and 2 swapped" in difference(y.transpose(0, 2), y)
    e = torch.rand(3, 5, generator=torch.Generator().manual_seed(1)) + 0.5
    assert "scaled by its own factor" in difference(e * torch.tensor([[1.0], [2.0], [3.0]]), e)
    assert "off by one" in difference(5, 4) and "off by one" in difference(torch.zeros(5, 3), torch.zeros(4, 3))
    assert "a sum where a mean belongs" in difference(torch.tensor(12.0), torch.tensor(1.5))
    assert "sign is flipped" in difference(torch.tensor(-2.0), torch.tensor(2.0))
    assert "reverse order" in difference([3, 2, 1], [1, 2, 3]) and "swapped" in difference((y, x), (x, y))


@pytest.mark.parametrize("name, wrong, phrase", [
    ("temperature", lambda x, t: x.clone(), r"`temperature` is not used"),
    ("repetition_penalty", lambda ids, x, p: x.clone(), r"`penalty` is not used"),
    ("softmax", lambda x, dim: torch.softmax(x, 1), r"dim 1 whatever `dim` says"),
    ("dynamic_ntk_base", lambda b, d, L, Lt, f: b if Lt <= L else b * (f * Lt / L - (f - 1)) ** (d / (d - 2)),
     r"`seq_len` and `max_position_embeddings` are swapped"),
    ("kv_cache_bytes", lambda c, b, s, dt: 2 * c.num_hidden_layers * b * s * c.num_attention_heads * c.head_dim * 2, r"num_attention_heads"),
    ("count_parameters", _l_count_no_norms_no_final, r"RMSNorm weight"),
    ("lora_forward", lambda x, w, a, b, alpha, r: x @ w.T + alpha / r * (x @ a.T @ b.T) if alpha > r else x @ w.T + (x @ a.T @ b.T),
     r"`alpha` and `r` are swapped|alpha"),
])
def test_a_misused_argument_is_named(name, wrong, phrase):
    ok, out = diagnose(name, wrong)
    assert not ok and re.search(phrase, out), out


# --- correct answers written in other ways than the reference: every one must pass ---------------


def _c_merge_zip(symbols, pair):
    out, skip = [], False
    for a, b in zip(symbols, symbols[1:] + [None]):
        if skip:
            skip = False
        elif (a, b) == tuple(pair):
            out.append(a + b)
            skip = True
        else:
            out.append(a)
    return out


def _c_rms_einsum(h, w, eps):
    x = h.float()
    ms = torch.einsum("...i,...i->...", x, x)[..., None] / x.shape[-1]
    return w * (x / torch.sqrt(ms + eps)).to(h.dtype)


def _c_attention_einsum(q, k, v, m):
    s = torch.einsum("bhqd,bhkd->bhqk", q.float(), k.float()) / math.sqrt(q.shape[-1]) + m.float()
    return torch.einsum("bhqk,bhkd->bhqd", s.softmax(-1).to(q.dtype), v)


def _c_greedy_loop(model, ids, n):
    past, step, out_ids = None, ids, ids
    for _ in range(n):
        out = model(step, past_key_values=past, use_cache=True)
        past, step = out.past_key_values, out.logits[:, -1:].argmax(-1)
        out_ids = torch.cat([out_ids, step], 1)
    return out_ids


def _c_top_p_float64(logits, top_p):
    probs, order = logits.double().softmax(-1).sort(-1, descending=True)
    drop = (probs.cumsum(-1) - probs) >= top_p
    drop[..., 0] = False
    return logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))


def _c_repetition(ids, x, p):
    seen = x.gather(1, ids)
    return x.scatter(1, ids, torch.where(seen > 0, seen / p, seen * p))


def _c_chat_join(messages):
    system = messages[0]["content"].strip() if messages[0]["role"] == "system" else None
    turns = messages[1:] if system is not None else messages
    parts = []
    for i, m in enumerate(turns):
        c = m["content"].strip()
        if i == 0 and system is not None:
            c = "<<SYS>>\n" + system + "\n<</SYS>>\n\n" + c
        parts.append("<s>[INST] " + c + " [/INST]" if m["role"] == "user" else " " + c + " </s>")
    return "".join(parts)


def _c_loss_gather(logits, labels):
    lg, lb = logits[:, :-1].double(), labels[:, 1:]
    keep = lb != -100
    logp = lg.log_softmax(-1).gather(-1, lb.clamp(min=0)[..., None])[..., 0]
    return (-(logp * keep).sum() / keep.sum()).to(logits.dtype)


def _c_f1_pr(t, p):
    tp = sum(a == 1 and b == 1 for a, b in zip(t, p))
    if not tp:
        return 0.0
    precision, recall = tp / sum(b == 1 for b in p), tp / sum(a == 1 for a in t)
    return 2 * precision * recall / (precision + recall)


def _c_labels_where(ids, spans):
    keep = torch.zeros_like(ids, dtype=torch.bool)
    for s, e in spans:
        keep[s:e] = True
    return torch.where(keep, ids, torch.tensor(-100))


def _c_absmax_quantize(w):
    absmax = w.abs().amax(1)
    scale = torch.where(absmax == 0, torch.ones_like(absmax), absmax / 127)
    return torch.round(w / scale.unsqueeze(1)).to(torch.int8), scale


def _c_nf4(packed, absmax, code):
    idx = torch.stack([packed >> 4, packed & 15], -1).flatten().long()
    return code[idx] * absmax.repeat_interleave(64)


def _c_bpe_min_key(piece, ranks):
    parts = [piece[i:i + 1] for i in range(len(piece))]
    while len(parts) > 1:
        pairs = [i for i in range(len(parts) - 1) if parts[i] + parts[i + 1] in ranks]
        if not pairs:
            break
        i = min(pairs, key=lambda i: (ranks[parts[i] + parts[i + 1]], i))
        parts = parts[:i] + [parts[i] + parts[i + 1]] + parts[i + 2:]
    return [ranks[p] for p in parts]


def _c_count(c):
    d, hd, L = c.hidden_size, c.head_dim, c.num_hidden_layers
    q = o = d * c.num_attention_heads * hd
    k = v = d * c.num_key_value_heads * hd
    mlp = 3 * d * c.intermediate_size
    total = c.vocab_size * d + L * (q + k + v + o + mlp + 2 * d) + d
    return total if c.tie_word_embeddings else total + c.vocab_size * d


def _c_mask_times_min(q, k, dt):
    m = torch.ones(q, k, dtype=torch.bool).triu(k - q + 1)
    return m.to(dt) * torch.finfo(dt).min


def _c_inter_float_mult(d, m=256, f=None):
    h = int(8 * d / 3)
    if f is not None:
        h = f * h
    return int(m * math.ceil(h / m))


def _c_deq_transpose(q, s):
    return (q.T.float() * s).T


def _c_apply_rope_unsq2(q, k, cos, sin):
    def rh(x):
        a, b = x.chunk(2, -1)
        return torch.cat((-b, a), -1)

    c, s = cos[:, :, None, :].transpose(1, 2), sin[:, :, None, :]
    return q * c + rh(q) * s.transpose(1, 2), k * c + rh(k) * s.transpose(1, 2)


def _c_merge_pair_no_skip(symbols, pair):
    out = list(symbols)
    i = 0
    while i < len(out) - 1:
        if out[i] == pair[0] and out[i + 1] == pair[1]:
            out[i] = pair[0] + pair[1]
            del out[i + 1]
        else:
            i += 1
    return out


CORRECT = {
    "softmax": [lambda x, dim: torch.softmax(x.double(), dim).to(x.dtype),
                lambda x, dim: (lambda e: e / e.sum(dim, keepdim=True))((x.float() - x.float().amax(dim, keepdim=True)).exp()).to(x.dtype)],
    "merge_pair": [_c_merge_pair_no_skip, _c_merge_zip],
    "rms_norm": [_c_rms_einsum,
                 lambda h, w, eps: w * (h.double() / h.double().pow(2).mean(-1, keepdim=True).add(eps).sqrt()).to(h.dtype)],
    "rotate_half": [lambda x: torch.cat((-x[..., x.shape[-1] // 2:], x[..., :x.shape[-1] // 2]), dim=-1),
                    lambda x: (lambda y: torch.cat((-y[..., y.shape[-1] // 2:], y[..., :y.shape[-1] // 2]), -1))(torch.roll(x, 0, -1))],
    "apply_rotary_pos_emb": [_c_apply_rope_unsq2, lambda q, k, c, s: tuple((x.double() * c.double()[:, None] + _rh(x).double() * s.double()[:, None]).to(x.dtype) for x in (q, k))],
    "rope_inv_freq": [lambda d, base: torch.tensor([base ** (-2 * i / d) for i in range(d // 2)], dtype=torch.float32), lambda d, base: torch.exp(-math.log(base) * torch.arange(0, d, 2).float() / d),
                      lambda d, base: (1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)).float()],
    "rope_cos_sin": [lambda p, d, b: (lambda a: (a.cos(), a.sin()))(torch.cat([torch.einsum("bs,f->bsf", p.double(), b ** (-torch.arange(0, d, 2, dtype=torch.float64) / d))] * 2, -1).float())],
    "dynamic_ntk_base": [lambda b, d, L, Lt, f: b * math.pow(max(1.0, f * L / Lt - f + 1), d / (d - 2))],
    "causal_mask": [_c_mask_times_min, lambda q, k, dt: torch.zeros(q, k, dtype=dt).masked_fill(torch.arange(k)[None] > torch.arange(k - q, k)[:, None], torch.finfo(dt).min)],
    "repeat_kv": [lambda h, n: torch.stack([h] * n, 2).flatten(1, 2), lambda h, n: h[:, :, None].expand(-1, -1, n, -1, -1).flatten(1, 2),
                  lambda h, n: h.index_select(1, torch.arange(h.shape[1] * n) // n)],
    "attention": [lambda q, k, v, m: (torch.softmax(q.double() @ k.double().mT / math.sqrt(q.shape[-1]) + m.double(), -1) @ v.double()).to(q.dtype),
                  lambda q, k, v, m: F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=m.float()).to(q.dtype), _c_attention_einsum],
    "kv_cache_bytes": [lambda c, b, s, dt: 2 * c.num_hidden_layers * b * s * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads) * dt.itemsize],
    "swiglu": [lambda x, g, u, d: ((F.silu(x.double() @ g.double().T) * (x.double() @ u.double().T)) @ d.double().T).float(), lambda x, g, u, d: torch.einsum("...i,di->...d", F.silu(torch.einsum("...d,id->...i", x, g)) * torch.einsum("...d,id->...i", x, u), d)],
    "decoder_layer": [lambda L, x, c, s, m: (lambda h: torch.add(h, L.mlp(L.post_attention_layernorm(h))))(torch.add(x, L.self_attn(L.input_layernorm(x), c, s, m)[0]))],
    "llama_intermediate_size": [_c_inter_float_mult, lambda d, m=256, f=None: -(-int((f or 1) * int(8 * d / 3)) // m) * m if f else -(-int(8 * d / 3) // m) * m],
    "count_parameters": [_c_count],
    "permute_qk": [lambda w, n: w.reshape(n, w.shape[0] // n // 2, 2, -1).permute(0, 2, 1, 3).reshape(w.shape)],
    "greedy_decode": [_c_greedy_loop],
    "top_p_filter": [_c_top_p_float64],
    "top_k_filter": [lambda x, k: torch.where(x.double() >= x.double().topk(min(k, x.shape[-1])).values[..., -1:], x.double(), -math.inf).float(), lambda x, k: x.masked_fill(x < torch.topk(x, min(k, x.shape[-1])).values[..., -1:], float("-inf"))],
    "repetition_penalty": [_c_repetition],
    "temperature": [lambda x, t: torch.div(x, t), lambda x, t: (x.double() / t).float()],
    "llama2_chat_prompt": [_c_chat_join],
    "causal_lm_loss": [lambda lg, lb: F.cross_entropy(lg[:, :-1].transpose(1, 2).double(), lb[:, 1:]).float(), _c_loss_gather],
    "spam_f1": [_c_f1_pr],
    "lora_forward": [lambda x, w, a, b, alpha, r: (x.double() @ w.double().T + alpha / r * (x.double() @ a.double().T @ b.double().T)).float(), lambda x, w, a, b, alpha, r: x @ (w + alpha / r * b @ a).T,
                     lambda x, w, a, b, alpha, r: F.linear(x, w) + F.linear(F.linear(x, a), b) * (alpha / r)],
    "assistant_labels": [_c_labels_where],
    "dpo_loss": [lambda pc, pr, rc, rr, beta: F.softplus(-beta * ((pc - pr) - (rc - rr))).mean(),
                 lambda pc, pr, rc, rr, beta: (-F.logsigmoid(beta * ((pc.double() - rc) - (pr.double() - rr)))).mean().float()],
    "absmax_quantize": [_c_absmax_quantize],
    "absmax_dequantize": [lambda q, s: (q.double() * s.double()[:, None]).float(), _c_deq_transpose, lambda q, s: torch.einsum("ij,i->ij", q.float(), s), lambda q, s: q.to(torch.float32) * s.unsqueeze(1)],
    "nf4_lookup": [lambda p, a, c: (c.double()[torch.stack([p >> 4, p & 15], 1).reshape(-1).long()].view(-1, 64) * a.double()[:, None]).reshape(-1).float(), _c_nf4],
    "local_rows": [lambda batch, rank, world: batch.chunk(world)[rank], lambda batch, rank, world: batch.tensor_split(world)[rank]],
    "row_parallel_linear": [lambda x, w, world: sum(xi.double() @ wi.double().T for xi, wi in zip(x.chunk(world, -1), w.chunk(world, 1))).float(), lambda x, w, world: torch.stack([xi @ wi.T for xi, wi in zip(x.tensor_split(world, -1), w.tensor_split(world, 1))]).sum(0)],
    "llama3_bpe_merge": [_c_bpe_min_key],
}


@pytest.mark.parametrize("name", sorted(CORRECT))
def test_correct_answers_written_otherwise_pass(name):
    for fn in CORRECT[name]:
        ok, out = diagnose(name, fn)
        assert ok, out


def test_a_mistake_that_is_right_where_the_answer_is_wrong_is_not_named():
    # Only the dtype is wrong (float32 for a float16 input): a known mistake or a changed argument that
    # gives the right values there (the mask's sign, for a reference that reads mask == 0) explains nothing.
    def float32_out(q, k, v, m):
        return torch.softmax((q @ k.mT / math.sqrt(q.shape[-1])).float() + m, -1) @ v.float()

    ok, out = diagnose("attention", float32_out)
    assert not ok and "dtype torch.float32, expected torch.float16" in out and "sign" not in out, out
