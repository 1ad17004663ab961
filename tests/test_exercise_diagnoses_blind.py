"""A blind held-out set of learner mistakes: how often does ``check`` NAME the mistake?

How this file was written (so the measurement stays honest): every mistake below, its one-line
description and its ``pattern`` were written from the notebooks' prompts and prose, the package's
reference functions and ``EXERCISES[name].task`` / ``.signature`` only, BEFORE any diagnosis was
seen. The exercise modules (``llama_edu/course/exercises/nb*.py``), the other diagnosis tests and
the checker's messages were not read, and ``check`` was never called on a mistake while writing.

``pattern`` is a case-insensitive regex of the words any useful diagnosis of that mistake would
have to contain (several alternatives naming the concept, not one exact phrase). Each mistake is
shown to be really wrong without ``check``: :func:`_is_wrong` compares it with the exercise's
reference on inputs chosen here (a different output, an exception, or a mutated input).

``run_blind()`` runs the checker on each mistake; the tests assert that none is accepted and that
at least half are named (the course aims at 0.8; the lead compares). ``python
tests/test_exercise_diagnoses_blind.py`` prints one line per mistake and the rate.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
import re

import torch
import torch.nn.functional as F

from llama_edu import LlamaConfig, LlamaForCausalLM
from llama_edu.exercises import EXERCISES, check
from llama_edu.model import LlamaDecoderLayer

# ---------------------------------------------------------------------------------------------
# The mistakes, one or two per exercise, in notebook order.
# ---------------------------------------------------------------------------------------------


# 00 softmax
def _softmax_naive(x, dim):
    return x.exp() / x.exp().sum(dim, keepdim=True)


def _softmax_last_dim(x, dim):
    e = torch.exp(x - x.max(-1, keepdim=True).values)
    return e / e.sum(-1, keepdim=True)


# 01 merge_pair
def _merge_no_jump(symbols, pair):
    merged, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            merged.append(pair[0] + pair[1])
        else:
            merged.append(symbols[i])
        i += 1  # forgot to jump over the second symbol of the pair
    return merged


def _merge_first_only(symbols, pair):
    for i in range(len(symbols) - 1):
        if (symbols[i], symbols[i + 1]) == pair:
            return symbols[:i] + [pair[0] + pair[1]] + symbols[i + 2 :]
    return list(symbols)


# 02 rms_norm
def _rms_eps_outside(hidden_states, weight, eps):
    x = hidden_states.float()
    x = x / (x.pow(2).mean(-1, keepdim=True).sqrt() + eps)
    return weight * x.to(hidden_states.dtype)


def _rms_no_upcast(hidden_states, weight, eps):
    x = hidden_states
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


# 03 rotate_half
def _rotate_half_sign(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x2, -x1), dim=-1)


def _rotate_half_pairs(x):
    return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)


# 03 apply_rotary_pos_emb
def _rope_no_unsqueeze(q, k, cos, sin):
    return q * cos + _ROTATE(q) * sin, k * cos + _ROTATE(k) * sin


def _rope_minus_sin(q, k, cos, sin):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos - _ROTATE(q) * sin, k * cos - _ROTATE(k) * sin


def _ROTATE(x):  # a correct rotate_half, as the learner wrote it just before
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


# 03 rope_inv_freq
def _inv_freq_no_two(head_dim, base):
    return 1.0 / base ** (torch.arange(head_dim // 2).float() / head_dim)


def _inv_freq_positive_exponent(head_dim, base):
    return base ** (torch.arange(0, head_dim, 2).float() / head_dim)


# 03 rope_cos_sin
def _inv_freq(head_dim, base):
    return 1.0 / base ** (torch.arange(0, head_dim, 2).float() / head_dim)


def _cos_sin_interleaved(position_ids, head_dim, base):
    freqs = position_ids[..., None].float() * _inv_freq(head_dim, base)
    emb = freqs.repeat_interleave(2, dim=-1)  # theta_0, theta_0, theta_1, theta_1, ...
    return emb.cos(), emb.sin()


def _cos_sin_arange(position_ids, head_dim, base):
    positions = torch.arange(position_ids.shape[-1]).expand(position_ids.shape)  # ignores position_ids
    freqs = positions[..., None].float() * _inv_freq(head_dim, base)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


# 03 dynamic_ntk_base
def _ntk_always(base, head_dim, seq_len, max_position_embeddings, factor):
    return base * (factor * seq_len / max_position_embeddings - (factor - 1)) ** (head_dim / (head_dim - 2))


def _ntk_exponent_flipped(base, head_dim, seq_len, max_position_embeddings, factor):
    if seq_len <= max_position_embeddings:
        return base
    return base * (factor * seq_len / max_position_embeddings - (factor - 1)) ** ((head_dim - 2) / head_dim)


# 04 causal_mask
def _mask_no_offset(q_len, kv_len, dtype):
    return torch.full((q_len, kv_len), torch.finfo(dtype).min, dtype=dtype).triu(1)


def _mask_minus_inf(q_len, kv_len, dtype):
    ok = torch.arange(kv_len)[None, :] <= torch.arange(q_len)[:, None] + (kv_len - q_len)
    return torch.zeros(q_len, kv_len, dtype=dtype).masked_fill(~ok, float("-inf"))


# 04 repeat_kv
def _repeat_kv_tiled(hidden_states, n_rep):
    return hidden_states.repeat(1, n_rep, 1, 1)  # heads 0, 1, 0, 1 instead of 0, 0, 1, 1


# 04 attention
def _attention_divide_by_d(q, k, v, mask):
    scores = q @ k.transpose(-2, -1) / q.shape[-1] + mask
    return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v


def _attention_softmax_queries(q, k, v, mask):
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + mask
    return torch.softmax(scores.float(), dim=-2).to(q.dtype) @ v


# 04 kv_cache_bytes
def _kv_bytes_keys_only(config, batch_size, seq_len, dtype):
    per = torch.empty(0, dtype=dtype).element_size()
    return config.num_hidden_layers * batch_size * config.num_key_value_heads * seq_len * config.head_dim * per


def _kv_bytes_query_heads(config, batch_size, seq_len, dtype):
    per = torch.empty(0, dtype=dtype).element_size()
    return 2 * config.num_hidden_layers * batch_size * config.num_attention_heads * seq_len * config.head_dim * per


# 05 swiglu
def _swiglu_silu_on_up(x, w_gate, w_up, w_down):
    return ((x @ w_gate.T) * F.silu(x @ w_up.T)) @ w_down.T


def _swiglu_sigmoid(x, w_gate, w_up, w_down):
    return (torch.sigmoid(x @ w_gate.T) * (x @ w_up.T)) @ w_down.T


# 05 llama_intermediate_size
def _ffn_round_down(hidden_size, multiple_of=256, ffn_dim_multiplier=None):
    h = int(2 * (4 * hidden_size) / 3)
    if ffn_dim_multiplier is not None:
        h = int(ffn_dim_multiplier * h)
    return multiple_of * (h // multiple_of)


def _ffn_ignores_multiplier(hidden_size, multiple_of=256, ffn_dim_multiplier=None):
    h = int(2 * (4 * hidden_size) / 3)
    return multiple_of * ((h + multiple_of - 1) // multiple_of)


# 05 decoder_layer
def _layer_post_norm(layer, hidden_states, cos, sin, mask):
    attn_out, _ = layer.self_attn(hidden_states, cos, sin, mask)
    h = layer.input_layernorm(hidden_states + attn_out)
    return layer.post_attention_layernorm(h + layer.mlp(h))


def _layer_no_second_residual(layer, hidden_states, cos, sin, mask):
    attn_out, _ = layer.self_attn(layer.input_layernorm(hidden_states), cos, sin, mask)
    h = hidden_states + attn_out
    return layer.mlp(layer.post_attention_layernorm(h))


# 06 count_parameters
def _count(config, tied_counted_twice=False, mha_kv=False):
    d, hd, L = config.hidden_size, config.head_dim, config.num_hidden_layers
    kv = config.num_attention_heads if mha_kv else config.num_key_value_heads
    per_layer = 2 * d * config.num_attention_heads * hd + 2 * d * kv * hd + 3 * d * config.intermediate_size + 2 * d
    head = 0 if config.tie_word_embeddings and not tied_counted_twice else config.vocab_size * d
    return config.vocab_size * d + L * per_layer + d + head


def _count_tied_twice(config):
    return _count(config, tied_counted_twice=True)


def _count_mha_kv(config):
    return _count(config, mha_kv=True)


# 06 llama_generate (the whole model; two slips in an otherwise right assembly)
def _generate(weights, config, input_ids, max_new_tokens, theta=None, tile_kv=False):
    d, n_heads, n_kv = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
    head_dim = d // n_heads
    head = weights.get("lm_head.weight", weights["model.embed_tokens.weight"])
    base = config.rope_theta if theta is None else theta

    def rms_norm(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + config.rms_norm_eps))

    ids = input_ids
    for _ in range(max_new_tokens):
        batch, seq = ids.shape
        angles = torch.arange(seq).float()[:, None] * _inv_freq(head_dim, base)
        angles = torch.cat((angles, angles), dim=-1)
        cos, sin = angles.cos(), angles.sin()
        mask = torch.full((seq, seq), float("-inf")).triu(1)
        h = weights["model.embed_tokens.weight"][ids]
        for i in range(config.num_hidden_layers):
            W = lambda name: weights[f"model.layers.{i}.{name}.weight"]  # noqa: E731
            x = rms_norm(h, W("input_layernorm"))
            q = (x @ W("self_attn.q_proj").T).view(batch, seq, n_heads, head_dim).transpose(1, 2)
            k = (x @ W("self_attn.k_proj").T).view(batch, seq, n_kv, head_dim).transpose(1, 2)
            v = (x @ W("self_attn.v_proj").T).view(batch, seq, n_kv, head_dim).transpose(1, 2)
            q, k = q * cos + _ROTATE(q) * sin, k * cos + _ROTATE(k) * sin
            if tile_kv:
                k, v = k.repeat(1, n_heads // n_kv, 1, 1), v.repeat(1, n_heads // n_kv, 1, 1)
            else:
                k, v = k.repeat_interleave(n_heads // n_kv, dim=1), v.repeat_interleave(n_heads // n_kv, dim=1)
            att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(head_dim) + mask, dim=-1)
            h = h + (att @ v).transpose(1, 2).reshape(batch, seq, d) @ W("self_attn.o_proj").T
            x = rms_norm(h, W("post_attention_layernorm"))
            h = h + (F.silu(x @ W("mlp.gate_proj").T) * (x @ W("mlp.up_proj").T)) @ W("mlp.down_proj").T
        logits = rms_norm(h, weights["model.norm.weight"])[:, -1] @ head.T
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=-1)
    return ids


def _generate_fixed_theta(weights, config, input_ids, max_new_tokens):
    return _generate(weights, config, input_ids, max_new_tokens, theta=10000.0)


def _generate_tiled_kv(weights, config, input_ids, max_new_tokens):
    return _generate(weights, config, input_ids, max_new_tokens, tile_kv=True)


# 07 permute_qk
def _permute_inverse(w, n_heads):
    rows, cols = w.shape
    head_dim = rows // n_heads
    return w.view(n_heads, 2, head_dim // 2, cols).transpose(1, 2).reshape(rows, cols)


def _permute_ignores_heads(w, n_heads):
    rows, cols = w.shape
    return w.view(rows // 2, 2, cols).transpose(0, 1).reshape(rows, cols)


# 08 greedy_decode
@torch.no_grad()
def _greedy_new_only(model, input_ids, max_new_tokens):
    out = model(input_ids, use_cache=True)
    new = [out.logits[:, -1].argmax(-1, keepdim=True)]
    for _ in range(max_new_tokens - 1):
        out = model(new[-1], past_key_values=out.past_key_values, use_cache=True)
        new.append(out.logits[:, -1].argmax(-1, keepdim=True))
    return torch.cat(new, dim=-1)  # forgot to put the prompt in front


@torch.no_grad()
def _greedy_one_too_many(model, input_ids, max_new_tokens):
    out = model(input_ids, use_cache=True)
    new = [out.logits[:, -1].argmax(-1, keepdim=True)]
    for _ in range(max_new_tokens):  # the prefill already made one token
        out = model(new[-1], past_key_values=out.past_key_values, use_cache=True)
        new.append(out.logits[:, -1].argmax(-1, keepdim=True))
    return torch.cat([input_ids, *new], dim=-1)


# 08 top_p_filter
def _top_p_drops_crossing_token(logits, top_p):
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    remove = sorted_logits.softmax(-1).cumsum(-1) > top_p  # also drops the token that reaches top_p
    remove[..., 0] = False
    return logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))


def _top_p_sorted_order(logits, top_p):
    sorted_logits, order = logits.sort(dim=-1)
    tail = sorted_logits.softmax(-1).cumsum(-1) <= 1 - top_p
    tail[..., -1] = False
    return logits.masked_fill(tail, float("-inf"))  # the sorted mask applied to unsorted logits


# 08 top_k_filter
def _top_k_drops_kth(logits, top_k):
    kth = logits.topk(min(top_k, logits.shape[-1])).values[..., -1:]
    return logits.masked_fill(logits <= kth, float("-inf"))  # <= also removes the k-th and its ties


def _top_k_no_clamp(logits, top_k):
    kth = logits.topk(top_k).values[..., -1:]  # fails when top_k > vocabulary size
    return logits.masked_fill(logits < kth, float("-inf"))


# 08 repetition_penalty
def _penalty_divides_all(input_ids, logits, penalty):
    seen = logits.gather(1, input_ids)
    return logits.scatter(1, input_ids, seen / penalty)


def _penalty_per_occurrence(input_ids, logits, penalty):
    out = logits.clone()
    for b in range(input_ids.shape[0]):
        for t in input_ids[b].tolist():
            out[b, t] = out[b, t] * penalty if out[b, t] < 0 else out[b, t] / penalty
    return out


# 08 temperature
def _temperature_multiply(logits, temperature):
    return logits * temperature


def _temperature_in_place(logits, temperature):
    return logits.div_(temperature)


# 09 llama2_chat_prompt
def _chat(messages, bos_every_turn=True, sys_gap="\n\n"):
    system = None
    if messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    out = ""
    for i, m in enumerate(messages):
        content = m["content"]
        if i == 0 and system is not None:
            content = "<<SYS>>\n" + system + "\n<</SYS>>" + sys_gap + content
        if m["role"] == "user":
            out += ("<s>" if bos_every_turn or i == 0 else "") + "[INST] " + content.strip() + " [/INST]"
        else:
            out += " " + content.strip() + " </s>"
    return out


def _chat_bos_once(messages):
    return _chat(messages, bos_every_turn=False)


def _chat_one_newline_after_sys(messages):
    return _chat(messages, sys_gap="\n")


# 10 causal_lm_loss
def _loss_no_shift(logits, labels):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100)


def _loss_mean_over_all(logits, labels):
    vocab = logits.shape[-1]
    shift_labels = labels[:, 1:].reshape(-1)
    total = F.cross_entropy(logits[:, :-1].reshape(-1, vocab).float(), shift_labels, ignore_index=-100, reduction="sum")
    return total / shift_labels.numel()  # -100 positions counted in the denominator


# 11 spam_f1
def _f1_unguarded(y_true, y_pred):
    tp = sum(t == 1 and p == 1 for t, p in zip(y_true, y_pred))
    precision = tp / sum(p == 1 for p in y_pred)
    recall = tp / sum(t == 1 for t in y_true)
    return 2 * precision * recall / (precision + recall)


def _f1_of_ham(y_true, y_pred):
    tp = sum(1 for t, p in zip(y_true, y_pred) if t == 0 and p == 0)
    fp = sum(1 for t, p in zip(y_true, y_pred) if t == 1 and p == 0)
    fn = sum(1 for t, p in zip(y_true, y_pred) if t == 0 and p == 1)
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


# 12 lora_forward
def _lora_no_scale(x, weight, lora_A, lora_B, alpha, r):
    return x @ weight.T + (x @ lora_A.T) @ lora_B.T


def _lora_scale_inverted(x, weight, lora_A, lora_B, alpha, r):
    return x @ weight.T + (r / alpha) * ((x @ lora_A.T) @ lora_B.T)


# 13 assistant_labels
def _labels_end_inclusive(input_ids, assistant_spans):
    labels = torch.full_like(input_ids, -100)
    for start, end in assistant_spans:
        labels[start : end + 1] = input_ids[start : end + 1]
    return labels


def _labels_in_place(input_ids, assistant_spans):
    keep = torch.zeros_like(input_ids, dtype=torch.bool)
    for start, end in assistant_spans:
        keep[start:end] = True
    labels = input_ids  # no copy: the prompt's ids get overwritten
    labels[~keep] = -100
    return labels


# 13 dpo_loss
def _dpo_swapped(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta):
    chosen = policy_chosen_logps - reference_chosen_logps
    rejected = policy_rejected_logps - reference_rejected_logps
    return -F.logsigmoid(beta * (rejected - chosen)).mean()


def _dpo_beta_outside(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta):
    chosen = policy_chosen_logps - reference_chosen_logps
    rejected = policy_rejected_logps - reference_rejected_logps
    return -beta * F.logsigmoid(chosen - rejected).mean()


# 14 absmax_quantize / absmax_dequantize / nf4_lookup
def _absmax_truncates(w):
    absmax = w.float().abs().amax(dim=1)
    scale = torch.where(absmax > 0, absmax / 127, torch.ones_like(absmax))
    return (w / scale[:, None]).to(torch.int8), scale  # .to(int8) truncates toward zero


def _absmax_zero_row(w):
    scale = w.float().abs().amax(dim=1) / 127  # 0 for an all-zero row
    return torch.round(w / scale[:, None]).to(torch.int8), scale


def _dequant_broadcast_columns(q, scale):
    return q.float() * scale  # scale lines up with the columns, not the rows


def _dequant_divides(q, scale):
    return q.float() / scale[:, None]


def _nf4_low_nibble_first(packed, absmax, code):
    idx = torch.stack([packed & 0xF, packed >> 4], dim=1).reshape(-1)
    return (code[idx.long()].reshape(-1, 64) * absmax[:, None]).reshape(-1)


def _nf4_absmax_tiled(packed, absmax, code):
    idx = torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)
    return code[idx.long()] * absmax.repeat(64)  # repeat tiles 0, 1, 0, 1 instead of 0 x64, 1 x64


# 16 local_rows / row_parallel_linear
def _rows_strided(batch, rank, world):
    return batch[rank::world]


def _rows_from_seq_len(batch, rank, world):
    per_rank = batch.shape[-1] // world  # T instead of B
    return batch[rank * per_rank : (rank + 1) * per_rank]


def _row_parallel_split_rows(x, weight, world):
    return sum(F.linear(xi, wi) for xi, wi in zip(x.chunk(world, dim=-1), weight.chunk(world, dim=0)))


def _row_parallel_mean(x, weight, world):
    parts = [F.linear(xi, wi) for xi, wi in zip(x.chunk(world, dim=-1), weight.chunk(world, dim=1))]
    return sum(parts) / world  # averaged, as for data-parallel gradients


# 17 q8_0_quantize
def _q8(w, half_to_even=False, scale_last=False):
    x = w.float().reshape(-1, 32)
    d = x.abs().amax(dim=1, keepdim=True) / 127
    v = x * torch.where(d == 0, torch.zeros_like(d), 1 / d)
    q = torch.round(v) if half_to_even else torch.sign(v) * torch.floor(v.abs() + 0.5)
    parts = [d.half().view(torch.uint8), q.to(torch.int8).view(torch.uint8)]
    return torch.cat(parts[::-1] if scale_last else parts, dim=1).reshape(w.shape[0], -1)


def _q8_round_half_even(w):
    return _q8(w, half_to_even=True)


def _q8_scale_after_quants(w):
    return _q8(w, scale_last=True)


# 18 llama3_bpe_merge
def _bpe_first_pair(piece, ranks):
    parts = [piece[i : i + 1] for i in range(len(piece))]
    merged = True
    while merged:
        merged = False
        for i in range(len(parts) - 1):  # the first mergeable pair from the left, whatever its rank
            if parts[i] + parts[i + 1] in ranks:
                parts[i : i + 2] = [parts[i] + parts[i + 1]]
                merged = True
                break
    return [ranks[p] for p in parts]


def _bpe_int_parts(piece, ranks):
    parts = list(piece)  # ints, not one-byte bytes
    while len(parts) > 1:
        best, best_rank = None, None
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and (best_rank is None or rank < best_rank):
                best, best_rank = i, rank
        if best is None:
            break
        parts[best : best + 2] = [parts[best] + parts[best + 1]]
    return [ranks[p] for p in parts]


# (exercise name, wrong function, pattern any useful diagnosis contains, what the mistake is)
BLIND: list[tuple[str, object, str, str]] = [
    ("softmax", _softmax_naive, r"overflow|max(imum)?|inf|nan|stab|large",
     "exp without subtracting the maximum first"),
    ("softmax", _softmax_last_dim, r"\bdim\b|axis|dimension|sums? to 1|normali",
     "always normalises over the last dimension, ignoring dim"),
    ("merge_pair", _merge_no_jump, r"overlap|skip|jump|both|twice|i \+= ?2|advance|consum|duplicat",
     "after merging, does not jump over the pair's second symbol"),
    ("merge_pair", _merge_first_only, r"every|all occurrences|each occurrence|first|only one|more than one|occurrence",
     "merges only the first occurrence of the pair"),
    ("rms_norm", _rms_eps_outside, r"eps|epsilon",
     "adds eps outside the square root"),
    ("rms_norm", _rms_no_upcast, r"float32|upcast|dtype|precision|half|float16|bfloat16|cast|overflow",
     "computes the mean of squares in the input dtype, without the float32 upcast"),
    ("rotate_half", _rotate_half_sign, r"sign|minus|negat|-x2|-x1",
     "returns (x2, -x1): the minus sign on the wrong half"),
    ("rotate_half", _rotate_half_pairs, r"half|halves|interleav|pair|chunk|adjacent|even|odd",
     "rotates interleaved pairs (x0, x1), (x2, x3)... instead of the two halves"),
    ("apply_rotary_pos_emb", _rope_no_unsqueeze, r"unsqueeze|dim(ension)? ?1|head|broadcast|shape",
     "forgets to unsqueeze cos/sin at dim 1 for the heads"),
    ("apply_rotary_pos_emb", _rope_minus_sin, r"sign|minus|negat|direction|clockwise|inverse|opposite|backwards",
     "subtracts rotate_half(x) * sin instead of adding it"),
    ("rope_inv_freq", _inv_freq_no_two, r"2i|2 ?\* ?i|step|stride|even|every other|exponent|arange|factor of 2|twice",
     "uses i / d instead of 2i / d in the exponent"),
    ("rope_inv_freq", _inv_freq_positive_exponent, r"sign|negative|1 ?/|inverse|reciproc|exponent|minus",
     "returns base^(2i/d), forgetting the minus sign (1 / ...)"),
    ("rope_cos_sin", _cos_sin_interleaved, r"interleav|\bcat\b|concat|halves|half|layout|rotate_half|repeat_interleave|i \+ d/2",
     "repeats each frequency twice in a row instead of concatenating the two halves"),
    ("rope_cos_sin", _cos_sin_arange, r"position_ids|positions?\b|offset|arange|start",
     "uses 0..seq-1 instead of the given position_ids"),
    ("dynamic_ntk_base", _ntk_always, r"unchanged|max_position|training context|short|within|<=|below|exceed|longer|only",
     "scales the base even for sequences within the training context"),
    ("dynamic_ntk_base", _ntk_exponent_flipped, r"exponent|power|\(head_dim ?- ?2\)|d ?- ?2|head_dim ?/",
     "uses the exponent (d - 2) / d instead of d / (d - 2)"),
    ("causal_mask", _mask_no_offset, r"offset|past|kv_len ?- ?q_len|cache|cached|shift|diagonal|earlier|prefix",
     "ignores the kv_len - q_len offset of cached keys"),
    ("causal_mask", _mask_minus_inf, r"finfo|min(imum)?\b|-inf|\binf|nan|infinit",
     "fills with float('-inf') instead of torch.finfo(dtype).min"),
    ("repeat_kv", _repeat_kv_tiled, r"order|interleav|repeat_interleave|tile|tiling|consecutive|adjacent|group|0, ?0, ?1",
     "tiles the kv heads (0, 1, 0, 1) instead of repeating each (0, 0, 1, 1)"),
    ("attention", _attention_divide_by_d, r"sqrt|square root|scale|scaling|√|temperature",
     "divides the scores by d instead of sqrt(d)"),
    ("attention", _attention_softmax_queries, r"\bdim\b|axis|keys|last|over the|normali|sums? to 1|queries",
     "takes the softmax over the queries (dim -2) instead of the keys"),
    ("kv_cache_bytes", _kv_bytes_keys_only, r"\b2\b|two|both|keys and values|\bvalues?\b|twice|factor",
     "counts only the keys, forgetting the factor 2 for the values"),
    ("kv_cache_bytes", _kv_bytes_query_heads, r"num_key_value_heads|kv.heads|key.value heads|GQA|grouped|MQA",
     "uses num_attention_heads instead of num_key_value_heads"),
    ("swiglu", _swiglu_silu_on_up, r"gate|silu|swap|\bup\b|w_up|w_gate",
     "applies silu to the up projection instead of the gate"),
    ("swiglu", _swiglu_sigmoid, r"silu|swish|sigmoid|activation|glu",
     "uses sigmoid instead of silu on the gate"),
    ("llama_intermediate_size", _ffn_round_down, r"round(ed|ing|s)? up|ceil|round|multiple_of|down|floor",
     "rounds down to the multiple instead of up"),
    ("llama_intermediate_size", _ffn_ignores_multiplier, r"ffn_dim_multiplier|multiplier",
     "ignores ffn_dim_multiplier"),
    ("decoder_layer", _layer_post_norm, r"pre.?norm|post.?norm|before|input_layernorm|normali[sz]e",
     "post-norm: normalises after the residual sum instead of before each block"),
    ("decoder_layer", _layer_no_second_residual, r"residual|skip|\bh ?\+|\+ ?h\b|add(ed|ing)? back|second",
     "returns mlp(norm2(h)) without adding h back"),
    ("count_parameters", _count_tied_twice, r"tie|tied|lm_head|\bhead\b|shared|twice",
     "counts the output head even when it is tied to the embedding"),
    ("count_parameters", _count_mha_kv, r"num_key_value_heads|kv.heads|key.value|GQA|grouped",
     "sizes k_proj and v_proj with num_attention_heads (ignores GQA)"),
    ("llama_generate", _generate_fixed_theta, r"rope_theta|theta|\bbase\b|config|constant|hard.?cod",
     "hard-codes the RoPE base 10000 instead of config.rope_theta"),
    ("llama_generate", _generate_tiled_kv, r"repeat|kv|key.value|num_key_value_heads|group|GQA|order|interleav",
     "shares kv heads by tiling (repeat) instead of repeat_interleave"),
    ("permute_qk", _permute_inverse, r"inverse|direction|interleav|pair|half|halves|order|transpose|backwards|other way|reverse",
     "applies the inverse permutation (halves to pairs)"),
    ("permute_qk", _permute_ignores_heads, r"head|n_heads",
     "permutes the whole matrix at once instead of head by head"),
    ("greedy_decode", _greedy_new_only, r"prompt|input_ids|prefix|shape|length|prepend|includ",
     "returns only the new tokens, without the prompt"),
    ("greedy_decode", _greedy_one_too_many, r"max_new_tokens|one too many|off.by.one|length|\bcount\b|extra|\+ ?1|too many|shape",
     "generates max_new_tokens + 1 tokens (forgets the prefill's token)"),
    ("top_p_filter", _top_p_drops_crossing_token, r"reach|cross|exceed|includ|boundary|threshold|smallest set|one more|too few|shift|cumulative|cumsum",
     "keeps only tokens whose cumulative probability stays <= top_p, dropping the one that reaches it"),
    ("top_p_filter", _top_p_sorted_order, r"scatter|order|sorted|unsort|vocabulary order|original|index|indices|position",
     "applies the mask computed in sorted order without mapping it back to the vocabulary order"),
    ("top_k_filter", _top_k_drops_kth, r"k.th|off.by.one|k ?- ?1|too few|fewer|<=|strict|\bbelow\b|equal|ties?\b",
     "masks logits <= the k-th largest, so the k-th itself (and its ties) go too"),
    ("top_k_filter", _top_k_no_clamp, r"vocab|larger|exceed|min\(|greater|bigger|more than",
     "fails when top_k is larger than the vocabulary (no min)"),
    ("repetition_penalty", _penalty_divides_all, r"negative|sign|multipl|< ?0|below zero",
     "divides every seen logit by the penalty, negative ones too"),
    ("repetition_penalty", _penalty_per_occurrence, r"once|duplicate|repeat(ed)?|twice|more than once|per token|unique|times",
     "applies the penalty once per occurrence, so repeated tokens are penalised several times"),
    ("temperature", _temperature_multiply, r"divid|multipl|invers|reciproc|flatten|sharpen|higher temperature|lower temperature",
     "multiplies the logits by the temperature instead of dividing"),
    ("temperature", _temperature_in_place, r"in.place|mutat|modif|input|copy|clone|div_|changed",
     "divides in place (div_), changing the caller's logits"),
    ("llama2_chat_prompt", _chat_bos_once, r"<s>|\bbos\b|each turn|every turn|begin|start of|each user|every user",
     "puts <s> only at the start, not before every user turn"),
    ("llama2_chat_prompt", _chat_one_newline_after_sys, r"<<SYS>>|<</SYS>>|system|newline|\\n|blank line|line break",
     "one newline instead of two after <</SYS>>"),
    ("causal_lm_loss", _loss_no_shift, r"shift|t ?\+ ?1|next|offset|align|predict",
     "does not shift: position t scored against labels[:, t]"),
    ("causal_lm_loss", _loss_mean_over_all, r"mean|-100|ignor|count|average|denominator|divid|normali",
     "divides the summed loss by all positions, the -100 ones included"),
    ("spam_f1", _f1_unguarded, r"zero|no spam|0\.0|divi|no (positive|predicted)|none predicted",
     "precision/recall without the guard: crashes when no spam is predicted"),
    ("spam_f1", _f1_of_ham, r"class 1|label 1|positive class|\bham\b|label 0|class 0|wrong class|swap",
     "computes the F1 of the ham class (label 0) instead of spam"),
    ("lora_forward", _lora_no_scale, r"alpha|scal|/ ?r\b",
     "forgets the alpha / r scale"),
    ("lora_forward", _lora_scale_inverted, r"alpha|scal|/ ?r\b|r ?/ ?alpha|invert",
     "scales by r / alpha instead of alpha / r"),
    ("assistant_labels", _labels_end_inclusive, r"\bend\b|exclusive|inclusive|off.by.one|one too many|\[start, ?end\)|half.open|extra|boundary",
     "treats the span end as inclusive (one extra token labelled)"),
    ("assistant_labels", _labels_in_place, r"in.place|mutat|modif|overwr|copy|clone|changed|alias",
     "writes -100 into input_ids itself (no copy)"),
    ("dpo_loss", _dpo_swapped, r"sign|swap|revers|backwards|order|chosen.*rejected|rejected.*chosen",
     "chosen and rejected swapped in the margin"),
    ("dpo_loss", _dpo_beta_outside, r"beta|inside|outside",
     "multiplies the log-sigmoid by beta instead of the margin inside it"),
    ("absmax_quantize", _absmax_truncates, r"round|trunc|floor|toward zero",
     "casts to int8 without rounding (truncation)"),
    ("absmax_quantize", _absmax_zero_row, r"zero|nan|all.zero|divi|empty",
     "no special case for an all-zero row: scale 0 and 0/0"),
    ("absmax_dequantize", _dequant_broadcast_columns, r"\brows?\b|broadcast|column|\[:, ?None\]|unsqueeze|\bdim\b|axis|shape",
     "multiplies by scale without [:, None]: scales line up with columns"),
    ("absmax_dequantize", _dequant_divides, r"multipl|divid|invers|reciproc|times",
     "divides by the scale instead of multiplying"),
    ("nf4_lookup", _nf4_low_nibble_first, r"nibble|high|low|order|first|swap",
     "takes the low nibble first"),
    ("nf4_lookup", _nf4_absmax_tiled, r"block|repeat|interleav|64|which scale",
     "tiles absmax (repeat) instead of giving each block of 64 its own"),
    ("local_rows", _rows_strided, r"consecutive|block|contiguous|strid|interleav|every|round.robin",
     "takes every world-th row (rank::world) instead of a consecutive block"),
    ("local_rows", _rows_from_seq_len, r"shape\[0\]|\bdim|axis|batch size|first dim|columns|sequence length|\bB\b",
     "computes the block size from T (shape[-1]) instead of B"),
    ("row_parallel_linear", _row_parallel_split_rows, r"column|dim(ension)? ?1|dim=1|split|chunk|axis|\brows?\b",
     "splits the weight's rows (dim 0) instead of its columns"),
    ("row_parallel_linear", _row_parallel_mean, r"\bsum|mean|average|all.reduce|divid",
     "averages the partial products instead of summing them"),
    ("q8_0_quantize", _q8_round_half_even, r"half|away from zero|round|tie|even|banker",
     "torch.round (halves to even) instead of halves away from zero"),
    ("q8_0_quantize", _q8_scale_after_quants, r"order|first|layout|byte|before|header|offset",
     "writes the 32 quants before the float16 scale in each block"),
    ("llama3_bpe_merge", _bpe_first_pair, r"lowest|rank|priority|smallest|minimum|order",
     "merges the leftmost mergeable pair instead of the lowest-ranked one"),
    ("llama3_bpe_merge", _bpe_int_parts, r"\bbytes?\b|\bints?\b|integer|piece\[i ?: ?i ?\+ ?1\]|single.byte|one.byte",
     "starts from list(piece), which gives ints, not one-byte bytes"),
]


# ---------------------------------------------------------------------------------------------
# Showing each mistake is wrong WITHOUT the checker: compare with the reference on inputs of ours.
# ---------------------------------------------------------------------------------------------


def _tiny_config(**overrides) -> LlamaConfig:
    kw = dict(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, rope_theta=500.0, rms_norm_eps=1e-5, max_position_embeddings=64)
    kw.update(overrides)
    return LlamaConfig(**kw)


def _tiny_model(**overrides) -> LlamaForCausalLM:
    torch.manual_seed(0)
    model = LlamaForCausalLM(_tiny_config(**overrides)).eval()
    with torch.no_grad():
        for p in model.parameters():  # weights large enough that greedy tokens vary
            p.copy_(torch.randn_like(p) * (0.3 if p.dim() > 1 else 1.0) + (1.0 if p.dim() == 1 else 0.0))
    return model


def _cases(name: str) -> list[tuple]:
    """Inputs for ``name``'s function, chosen here (not the checker's)."""
    g = torch.Generator().manual_seed(0)

    def randn(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(dtype)

    if name == "softmax":
        x = randn(3, 5)
        return [(x, -1), (x, 0), (x * 1000 + 500, -1)]
    if name == "merge_pair":
        return [(list("abab"), ("a", "b")), (list("aaaa"), ("a", "a")), (list("xaby"), ("a", "b"))]
    if name == "rms_norm":
        return [(randn(2, 3, 8), randn(8), 1e-6), (randn(2, 8, dtype=torch.float16) * 400, randn(8), 1e-5),
                (randn(2, 8) * 1e-4, torch.ones(8), 1e-2)]
    if name == "rotate_half":
        return [(randn(2, 3, 8),)]
    if name == "apply_rotary_pos_emb":
        cos, sin = randn(2, 5, 8), randn(2, 5, 8)
        return [(randn(2, 4, 5, 8), randn(2, 2, 5, 8), cos, sin)]
    if name == "rope_inv_freq":
        return [(8, 10000.0), (16, 500.0)]
    if name == "rope_cos_sin":
        return [(torch.tensor([[3, 4, 5, 6], [0, 1, 2, 3]]), 8, 10000.0)]
    if name == "dynamic_ntk_base":
        return [(10000.0, 64, 1024, 2048, 2.0), (10000.0, 64, 4096, 2048, 2.0)]
    if name == "causal_mask":
        return [(3, 5, torch.float32), (4, 4, torch.float16)]
    if name == "repeat_kv":
        return [(randn(2, 2, 3, 4), 3)]
    if name == "attention":
        q, k, v = randn(2, 2, 4, 8), randn(2, 2, 4, 8), randn(2, 2, 4, 8)
        mask = EXERCISES["causal_mask"].reference(4, 4, torch.float32)
        return [(q, k, v, mask)]
    if name == "kv_cache_bytes":
        return [(_tiny_config(), 2, 7, torch.float16)]
    if name == "swiglu":
        return [(randn(2, 3, 8), randn(16, 8), randn(16, 8), randn(8, 16))]
    if name == "llama_intermediate_size":
        return [(4096,), (5120, 256, None), (8192, 4096, 1.3)]
    if name == "decoder_layer":
        torch.manual_seed(0)
        config = _tiny_config()
        layer = LlamaDecoderLayer(config, 0).eval()
        with torch.no_grad():
            for p in layer.parameters():
                p.copy_(torch.randn_like(p) * 0.3 + (1.0 if p.dim() == 1 else 0.0))
        cos, sin = EXERCISES["rope_cos_sin"].reference(torch.arange(5)[None].expand(2, 5), config.head_dim, 500.0)
        mask = EXERCISES["causal_mask"].reference(5, 5, torch.float32)[None, None]
        return [(layer, randn(2, 5, 32), cos, sin, mask)]
    if name == "count_parameters":
        return [(_tiny_config(),), (_tiny_config(tie_word_embeddings=True),)]
    if name == "llama_generate":
        model = _tiny_model()
        weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return [(weights, model.config, torch.tensor([[1, 5, 9, 2, 7, 3]]), 6)]
    if name == "permute_qk":
        return [(randn(16, 4), 2)]
    if name == "greedy_decode":
        return [(_tiny_model(), torch.tensor([[1, 5, 9], [4, 2, 8]]), 4)]
    if name == "top_p_filter":
        return [(torch.tensor([[2.0, 1.0, 0.5, 3.0, -1.0], [0.0, 0.1, 0.2, 0.3, 0.4]]), 0.7)]
    if name == "top_k_filter":
        return [(torch.tensor([[2.0, 1.0, 0.5, 3.0, -1.0]]), 2), (torch.tensor([[2.0, 1.0, 0.5]]), 5)]
    if name == "repetition_penalty":
        return [(torch.tensor([[0, 2, 2, 3]]), torch.tensor([[1.0, -2.0, 3.0, -4.0, 0.5]]), 1.5)]
    if name == "temperature":
        return [(torch.tensor([[1.0, -2.0, 3.0]]), 0.5)]
    if name == "llama2_chat_prompt":
        return [([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}],)]
    if name == "causal_lm_loss":
        labels = torch.randint(0, 7, (2, 6), generator=g)
        labels[0, 1:3] = -100
        return [(randn(2, 6, 7), labels)]
    if name == "spam_f1":
        return [([1, 0, 1, 1, 0], [1, 1, 0, 1, 0]), ([1, 0], [0, 0])]
    if name == "lora_forward":
        return [(randn(3, 8), randn(6, 8), randn(2, 8), randn(6, 2), 16.0, 2)]
    if name == "assistant_labels":
        return [(torch.arange(10, 22), [(2, 5), (8, 11)])]
    if name == "dpo_loss":
        return [(randn(4), randn(4), randn(4), randn(4), 0.1)]
    if name == "absmax_quantize":
        w = randn(3, 6)
        w[1] = 0.0
        return [(w,)]
    if name == "absmax_dequantize":
        return [(torch.randint(-127, 128, (3, 3), generator=g).to(torch.int8), torch.tensor([0.5, 0.1, 2.0]))]
    if name == "nf4_lookup":
        return [(torch.randint(0, 256, (64,), generator=g).to(torch.uint8), torch.tensor([1.0, 3.0]),
                 torch.linspace(-1, 1, 16))]
    if name == "local_rows":
        return [(torch.arange(6 * 4).view(6, 4), 1, 3)]
    if name == "row_parallel_linear":
        return [(randn(2, 8), randn(8, 8), 2), (randn(3, 8), randn(6, 8), 4)]
    if name == "q8_0_quantize":
        w = randn(2, 64)
        w[0, :32] = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -2.5] + [3.0] * 26)
        return [(w,)]
    if name == "llama3_bpe_merge":
        ranks = {bytes([b]): b for b in range(256)}
        ranks.update({b"bc": 256, b"ab": 257})  # "ab" comes first, "bc" ranks lower
        return [(b"abc", ranks), (b"xabcab", ranks)]
    raise KeyError(name)


def _same(a, b) -> bool:
    """Equal outputs: tensors of one shape and dtype and close values; numbers, strings, sequences."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        if a.dtype.is_floating_point:
            return torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-6, equal_nan=True)
        return torch.equal(a, b)
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b) and all(
            _same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) or isinstance(b, dict):
        return isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9) or (math.isnan(a) and math.isnan(b))
    if isinstance(a, (str, bytes)) or isinstance(b, (str, bytes)):
        return a == b
    return True  # modules, configs, dtypes: inputs we do not compare


def _is_wrong(name: str, fn) -> bool:
    """True when ``fn`` differs from the exercise's reference on one of our inputs: another output,
    an exception where the reference has none, or an input changed in place. Never calls check()."""
    reference = EXERCISES[name].reference
    for args in _cases(name):
        expected = reference(*copy.deepcopy(args))  # the reference must run on every case
        mine = copy.deepcopy(args)
        try:
            got = fn(*mine)
        except Exception:
            return True
        if not _same(got, expected) or not _same(list(mine), list(args)):
            return True
    return False


# ---------------------------------------------------------------------------------------------
# The harness: what the checker says about each mistake.
# ---------------------------------------------------------------------------------------------


def run_blind() -> list[tuple[str, str, bool, bool, str]]:
    """(name, what, accepted, named, output) for every entry of BLIND."""
    rows = []
    for name, fn, pattern, what in BLIND:
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            accepted = bool(check(name, fn))
        output = buffer.getvalue()
        rows.append((name, what, accepted, re.search(pattern, _diagnosis(output), re.I) is not None, output))
    return rows


def _diagnosis(output: str) -> str:
    """The words that diagnose: the message without the parts every message has whatever the
    mistake (the case's label, the generic "the first at index (...): got x, expected y"), so
    that a pattern cannot be met by the input's description or a coordinate. (Added by the lead
    before the after-rate was measured; the before-rate was recomputed with it.)"""
    output = re.sub(r"Case \d+ of \d+ \([^\n]*?\):", "", output)
    output = re.sub(r"at line \d+: [^\n]*", "", output)  # the learner's own line, quoted back
    output = re.sub(r"dimension \d+ has size \d+ instead of \d+", "", output)
    return re.sub(r"the first at index \([^)]*\): got [^\n]*?expected [^)\n]*", "", output)


def test_blind_set_shape():
    names = [name for name, *_ in BLIND]
    assert len(BLIND) >= 40
    assert len(set(names)) >= 25
    assert max(names.count(n) for n in set(names)) <= 2
    assert set(names) <= set(EXERCISES)
    for _, _, pattern, what in BLIND:
        re.compile(pattern)
        assert what


def test_blind_mistakes_are_really_wrong():
    not_wrong = [(name, what) for name, fn, _, what in BLIND if not _is_wrong(name, fn)]
    assert not not_wrong, f"these 'mistakes' give the reference's outputs: {not_wrong}"


_ROWS: list | None = None


def _rows():
    global _ROWS
    if _ROWS is None:
        _ROWS = run_blind()
    return _ROWS


def test_blind_set_is_rejected():
    accepted = [(name, what) for name, what, ok, _, _ in _rows() if ok]
    assert not accepted, f"the checker accepted these mistakes: {accepted}"


def test_blind_named_rate():
    rows = _rows()
    rate = sum(named for _, _, _, named, _ in rows) / len(rows)
    print(f"blind named rate: {rate:.2f} ({sum(n for *_, n, _ in rows)}/{len(rows)})")
    # Measured once, blind: 61/71 named before the checker work of issue 18's last round, 66/71
    # after (the aim was 4 in 5). Now a guard: the checker must keep naming at least 4 in 5.
    assert rate >= 0.8


if __name__ == "__main__":
    rows = run_blind()
    for name, what, accepted, named, _ in rows:
        print(f"{'ACCEPTED' if accepted else 'named' if named else 'unnamed':8s}  {name:24s}  {what}")
    named = sum(r[3] for r in rows)
    print(f"named {named}/{len(rows)} = {named / len(rows):.2f}")
