"""The exercise checkers, both ways: they accept the reference and correct alternatives written
differently, and they reject each typical mistake with its own diagnosis."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from llama_edu.exercises import EXERCISES, check, check_function

# Exercises that other branches register after the merge are tested in their own test files;
# every exercise registered here gets the generic tests below.
NAMES = sorted(EXERCISES)


def run(name, fn, capsys):
    ok = check(name, fn)
    return ok, capsys.readouterr().out


def test_registry_is_complete_and_described():
    assert len(EXERCISES) >= 22
    table = ["softmax", "rms_norm", "rotate_half", "apply_rotary_pos_emb", "causal_mask", "repeat_kv", "attention",
             "swiglu", "decoder_layer", "greedy_decode", "top_p_filter"]
    kept = ["merge_pair", "count_parameters", "permute_qk", "llama2_chat_prompt"]
    for name in table + kept:
        assert name in EXERCISES, name
    for name, ex in EXERCISES.items():
        assert ex.name == name and ex.task and ex.signature.startswith("(") and callable(ex.reference)
        assert ex.notebook[:2].isdigit(), ex.notebook
        assert ex.mistakes, f"{name} has no known mistakes to diagnose"


@pytest.mark.parametrize("name", NAMES)
def test_reference_passes(name, capsys):
    ok, out = run(name, EXERCISES[name].reference, capsys)
    assert ok, out
    assert out.startswith(f"{name}: correct on all")


@pytest.mark.parametrize("name", NAMES)
def test_every_mistake_is_rejected_and_named(name, capsys):
    for wrong, says, hint in EXERCISES[name].mistakes:
        ok, out = run(name, wrong, capsys)
        assert not ok, f"{name} accepted the mistake: {says}"
        assert f"Likely mistake: {says}." in out and f"Hint: {hint}." in out, out
        assert out.startswith(f"{name}: not right yet")
        assert "_reference" not in out and "<lambda>" not in out  # names the exercise, never a helper


@pytest.mark.parametrize("name", NAMES)
def test_not_attempted(name, capsys):
    def stub(*args):
        raise NotImplementedError

    for fn in (None, stub):
        ok, out = run(name, fn, capsys)
        assert not ok and out.startswith(f"{name}: not attempted yet")


def test_check_never_raises(capsys):
    ok, out = run("rotate_half", lambda x: 1 / 0, capsys)
    assert not ok and "raised ZeroDivisionError" in out
    ok, out = run("softmax", lambda x: x.softmax(-1), capsys)  # wrong signature
    assert not ok and "It must take the arguments softmax(x, dim)" in out
    ok, out = run("softmax", lambda x, dim: None, capsys)
    assert not ok and "forget the `return`" in out
    ok, out = run("softmax", lambda x, dim: "text", capsys)
    assert not ok and "should be a tensor" in out
    ok, out = run("no_such_exercise", lambda x: x, capsys)
    assert not ok and "no exercise called 'no_such_exercise'" in out and "rotate_half" in out


def test_inputs_are_not_shared_with_the_reference(capsys):
    # An answer that writes into its input must not change what the reference sees, and is told
    # that it changed its input (tests/test_check_robustness.py has the rest).
    def in_place(x, dim):
        out = torch.softmax(x, dim)
        x.zero_()
        return out

    ok, out = run("softmax", in_place, capsys)
    assert not ok and "changed its input: `x` was written to in place" in out, out


# --- the diagnoses a learner is most likely to need, spelled out -------------------------------


@pytest.mark.parametrize(
    "name, wrong, phrase",
    [
        ("rotate_half", lambda x: torch.cat((x.chunk(2, -1)[1], -x.chunk(2, -1)[0]), -1), "the sign is on the wrong half"),
        ("causal_mask", lambda q, k, dt: torch.zeros(q, k, dtype=dt).masked_fill(
            torch.arange(k)[None] > torch.arange(q)[:, None], torch.finfo(dt).min), "the cache offset is ignored"),
        ("causal_mask", lambda q, k, dt: torch.zeros(q, k, dtype=dt).masked_fill(
            torch.arange(k)[None] >= torch.arange(q)[:, None] + (k - q), torch.finfo(dt).min), "off by one"),
        ("repeat_kv", lambda h, n: h.repeat(1, n, 1, 1), "`repeat` tiles the heads"),
        ("attention", lambda q, k, v, m: torch.softmax((q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1]) + m, dim=2) @ v,
         "the softmax runs over the queries"),
        ("attention", lambda q, k, v, m: torch.softmax((q @ k.transpose(-1, -2)).float() + m, -1).to(q.dtype) @ v,
         "not divided by sqrt(d)"),
        ("rms_norm", lambda h, w, eps: w * (h.float() / (h.float().pow(2).mean(-1, keepdim=True).sqrt() + eps)).to(h.dtype),
         "eps is added outside the square root"),
        ("rms_norm", lambda h, w, eps: w * h / torch.sqrt((h * h).mean(-1, keepdim=True) + eps), "no float32 upcast"),
        ("swiglu", lambda x, g, u, d: F.linear(F.linear(x, g) * F.silu(F.linear(x, u)), d), "SiLU is on the up branch"),
    ],
)
def test_typical_mistakes_written_differently_are_diagnosed(name, wrong, phrase, capsys):
    ok, out = run(name, wrong, capsys)
    assert not ok and phrase in out, out


def test_top_p_dropping_the_crossing_token(capsys):
    def keep_below(logits, top_p):  # keeps tokens while the running total stays <= top_p
        probs, order = logits.softmax(-1).sort(-1, descending=True)
        drop = probs.cumsum(-1) > top_p
        return logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))

    ok, out = run("top_p_filter", keep_below, capsys)
    assert not ok and "the token whose probability crosses top_p is dropped" in out


def test_greedy_decode_without_cache_is_rejected(capsys):
    def no_cache(model, ids, n):
        for _ in range(n):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], -1)
        return ids

    ok, out = run("greedy_decode", no_cache, capsys)
    assert not ok and "the values are right, but" in out and "past_key_values" in out


# --- correct alternatives (written another way than the reference) are accepted ---------------


def _softmax(x, dim):
    e = torch.exp(x - x.max(dim, keepdim=True).values)
    return e / e.sum(dim, keepdim=True)


def _merge_pair_loop(symbols, pair):
    merged, i = [], 0
    while i < len(symbols):
        if symbols[i:i + 2] == list(pair):
            merged.append("".join(pair))
            i += 2
        else:
            merged.append(symbols[i])
            i += 1
    return merged


def _rms_norm(h, w, eps):
    x = h.float()
    return w * (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)


def _rotate_half(x):
    d = x.shape[-1] // 2
    return torch.cat((-x[..., d:], x[..., :d]), -1)


def _apply_rope(q, k, cos, sin):
    def rot(x):
        return x * cos[:, None] + _rotate_half(x) * sin[:, None]

    return rot(q), rot(k)


def _rope_cos_sin(p, d, base):
    inv = 1.0 / base ** (torch.arange(0, d, 2).float() / d)
    ang = p[..., None].float() * inv
    ang = torch.cat([ang, ang], -1)
    return ang.cos(), ang.sin()


def _causal_mask(q, k, dtype):
    return torch.full((q, k), torch.finfo(dtype).min, dtype=dtype).triu(k - q + 1)


def _repeat_kv(h, n):
    return h.repeat_interleave(n, dim=1)


def _attention(q, k, v, mask):
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1]) + mask
    scores = scores.clamp_min(torch.finfo(scores.dtype).min)
    return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v


def _kv_cache_bytes(c, b, s, dt):
    return 2 * c.num_hidden_layers * b * c.num_key_value_heads * s * c.head_dim * torch.finfo(dt).bits // 8


def _swiglu(x, g, u, d):
    return F.linear(F.silu(F.linear(x, g)) * F.linear(x, u), d)


def _decoder_layer(layer, x, cos, sin, mask):
    h = x + layer.self_attn(layer.input_layernorm(x), cos, sin, mask)[0]
    return h + layer.mlp(layer.post_attention_layernorm(h))


def _intermediate(d, m=256, f=None):
    h = int(2 * 4 * d / 3)
    if f is not None:
        h = int(f * h)
    return math.ceil(h / m) * m


def _count(c):
    d = c.hidden_size
    per_layer = d * c.head_dim * (2 * c.num_attention_heads + 2 * c.num_key_value_heads) + 3 * d * c.intermediate_size + 2 * d
    return c.vocab_size * d * (1 if c.tie_word_embeddings else 2) + c.num_hidden_layers * per_layer + d


def _permute(w, n):
    rows, cols = w.shape
    hd = rows // n
    idx = torch.cat([torch.cat([torch.arange(h * hd, (h + 1) * hd, 2), torch.arange(h * hd + 1, (h + 1) * hd, 2)]) for h in range(n)])
    return w[idx]


def _greedy(model, ids, n):
    out = model(ids, use_cache=True)
    past, new = out.past_key_values, [out.logits[:, -1].argmax(-1, keepdim=True)]
    for _ in range(n - 1):
        out = model(new[-1], past_key_values=past, use_cache=True)
        past = out.past_key_values
        new.append(out.logits[:, -1].argmax(-1, keepdim=True))
    return torch.cat([ids, *new], -1)


def _top_p(logits, top_p):
    probs, order = logits.softmax(-1).sort(-1, descending=True)
    before = probs.cumsum(-1) - probs  # mass of the more likely tokens
    drop = before >= top_p
    drop[..., 0] = False
    return logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


def _top_k(logits, k):
    kth = logits.sort(-1, descending=True).values[..., min(k, logits.shape[-1]) - 1 : min(k, logits.shape[-1])]
    return torch.where(logits < kth, torch.tensor(float("-inf")), logits)


def _repetition(ids, x, p):
    x = x.clone()
    for b in range(ids.shape[0]):
        for t in set(ids[b].tolist()):
            x[b, t] = x[b, t] * p if x[b, t] < 0 else x[b, t] / p
    return x


def _chat(messages):
    system = messages[0]["content"] if messages[0]["role"] == "system" else None
    turns = messages[1:] if system is not None else messages
    out = []
    for i, m in enumerate(turns):
        text = m["content"]
        if i == 0 and system is not None:
            text = f"<<SYS>>\n{system}\n<</SYS>>\n\n{text}"
        out.append(f"<s>[INST] {text.strip()} [/INST]" if m["role"] == "user" else f" {text.strip()} </s>")
    return "".join(out)


def _llama_generate_meta_style(weights, config, ids, n):
    # Meta's layout and complex-number RoPE (reference.py), after converting the Hugging Face weights
    from llama_edu.io.convert import hf_to_meta_state_dicts, meta_params
    from llama_edu.reference import reference_forward

    if "lm_head.weight" not in weights:
        weights = {**weights, "lm_head.weight": weights["model.embed_tokens.weight"]}
    meta = hf_to_meta_state_dicts(weights, config)[0]
    params = {**meta_params(config), "rope_theta": config.rope_theta}  # meta_params leaves Llama 2's default out
    for _ in range(n):
        ids = torch.cat([ids, reference_forward(meta, params, ids)[:, -1].argmax(-1, keepdim=True)], -1)
    return ids


ALTERNATIVES = {
    "llama_generate": [_llama_generate_meta_style],
    "softmax": [_softmax, lambda x, dim: torch.exp(x - torch.logsumexp(x.float(), dim, keepdim=True)).to(x.dtype)],
    "merge_pair": [_merge_pair_loop],
    "rms_norm": [_rms_norm],
    "rotate_half": [_rotate_half],
    "apply_rotary_pos_emb": [_apply_rope],
    "rope_inv_freq": [lambda d, base: base ** (-torch.arange(0, d, 2).float() / d)],
    "rope_cos_sin": [_rope_cos_sin],
    "dynamic_ntk_base": [lambda b, d, L, Lt, f: b * max(1.0, f * L / Lt - (f - 1)) ** (d / (d - 2))],
    "causal_mask": [_causal_mask],
    "repeat_kv": [_repeat_kv],
    "attention": [_attention],
    "kv_cache_bytes": [_kv_cache_bytes],
    "swiglu": [_swiglu],
    "decoder_layer": [_decoder_layer],
    "llama_intermediate_size": [_intermediate],
    "count_parameters": [_count],
    "permute_qk": [_permute],
    "greedy_decode": [_greedy],
    "top_p_filter": [_top_p],
    "top_k_filter": [_top_k],
    "repetition_penalty": [_repetition],
    "temperature": [lambda x, t: x * (1.0 / t)],
    "llama2_chat_prompt": [_chat],
}


@pytest.mark.parametrize("name", sorted(ALTERNATIVES))
def test_correct_alternatives_pass(name, capsys):
    for fn in ALTERNATIVES[name]:
        ok, out = run(name, fn, capsys)
        assert ok, out


def test_every_exercise_of_this_branch_has_an_alternative():
    ours = {n for n, ex in EXERCISES.items() if ex.notebook[:2] <= "09"}
    assert ours <= set(ALTERNATIVES), ours - set(ALTERNATIVES)


def test_check_function_for_ad_hoc_inputs(capsys):
    assert check_function(lambda x: x + 1, lambda x: x + 1, [(torch.ones(2),)], name="plus one")
    assert not check_function(lambda x: x + 2, lambda x: x + 1, [(torch.ones(2),)], name="plus one")
    assert not check_function(None, lambda x: x, [(1,)], name="plus one")
    assert "plus one: not attempted yet" in capsys.readouterr().out
