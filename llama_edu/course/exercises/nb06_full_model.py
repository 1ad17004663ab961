"""Exercises of notebook 06_full_model."""

from __future__ import annotations

import functools
import json
import torch
from ...config import LlamaConfig
from ...modeling import LlamaForCausalLM

from .checking import _gen, register


def _count_reference(config: LlamaConfig) -> int:
    return _count_on_meta(config.to_json_string())


@functools.lru_cache(maxsize=16)
def _count_on_meta(config_json: str) -> int:  # building a 70B model, even on meta, takes a second
    with torch.device("meta"):
        return LlamaForCausalLM(LlamaConfig.from_dict(json.loads(config_json))).num_parameters()


def _count(c, kv=None, norms=True, final=True, tied_twice=False, o_proj=True, mlp=3, layers=None, head=True, bias=False,
           intermediate=None):
    d, hd, L = c.hidden_size, c.head_dim, c.num_hidden_layers if layers is None else layers
    kv = c.num_key_value_heads if kv is None else kv
    attention = (2 if o_proj else 1) * d * c.num_attention_heads * hd + 2 * d * kv * hd
    attention += (c.num_attention_heads * hd + 2 * kv * hd + d) if bias else 0
    i = c.intermediate_size if intermediate is None else intermediate
    per_layer = attention + mlp * d * i + (2 * d if norms else 0) + ((2 * i + d) if bias else 0)
    n_head = 0 if (c.tie_word_embeddings and not tied_twice) or not head else c.vocab_size * d
    return c.vocab_size * d + L * per_layer + (d if final else 0) + n_head


register(
    "count_parameters", "06_full_model", "(config)", "the number of parameters of LlamaForCausalLM(config), a tied head counted once",
    reference=_count_reference,
    cases=lambda: [(n, (LlamaConfig.from_preset(n),)) for n in ["tiny", "stories260k", "llama2-7b", "llama2-70b"]]
    + [("tiny with tied embeddings", (LlamaConfig.from_preset("tiny", tie_word_embeddings=True),))],
    mistakes=[
        (lambda c: _count(c, kv=c.num_attention_heads),
         "k_proj and v_proj are counted with num_attention_heads; with grouped-query attention (70B) they have num_key_value_heads * head_dim rows",
         "k and v: hidden_size * num_key_value_heads * head_dim each"),
        (lambda c: _count(c, norms=False), "the two RMSNorm weights of each layer are missing", "add 2 * hidden_size per layer"),
        (lambda c: _count(c, final=False), "the final norm is missing", "add hidden_size for model.norm"),
        (lambda c: _count(c, tied_twice=True), "a tied LM head is counted twice; it is the embedding matrix", "no head when tie_word_embeddings"),
        (lambda c: _count(c) - c.vocab_size * c.hidden_size,
         "the embedding matrix (vocab_size x hidden_size) is missing", "add vocab_size * hidden_size for model.embed_tokens"),
        (lambda c: _count(c, o_proj=False), "the attention's output projection o_proj is missing", "add hidden_size * num_attention_heads * head_dim per layer"),
        (lambda c: _count(c, mlp=2), "the MLP is counted with two matrices; SwiGLU has three (gate_proj, up_proj, down_proj)",
         "3 * hidden_size * intermediate_size per layer"),
        (lambda c: _count(c, layers=1), "one layer only: multiply the per-layer count by num_hidden_layers", "num_hidden_layers * per_layer"),
        (lambda c: _count(c, head=False), "the untied lm_head is missing (vocab_size x hidden_size), counted only when tie_word_embeddings is False",
         "add vocab_size * hidden_size unless config.tie_word_embeddings"),
        (lambda c: _count(c, bias=True), "biases are counted: Llama's linear layers have no bias (bias=False)", "count only the weight matrices and the norms"),
        (lambda c: _count(c, intermediate=4 * c.hidden_size), "the MLP width is taken as 4 * hidden_size; read config.intermediate_size",
         "3 * hidden_size * config.intermediate_size per layer"),
    ],
)


# --- The capstone: your own Llama, from the state dict to generated tokens ----------------------


@functools.lru_cache(maxsize=1)
def _shipped_weights() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from ...io.files import DEFAULT_MODEL_DIR

    return load_file(str(DEFAULT_MODEL_DIR / "model.safetensors"))


@functools.lru_cache(maxsize=1)
def _shipped_config() -> LlamaConfig:
    from ...io.files import DEFAULT_MODEL_DIR

    return LlamaConfig.from_pretrained(DEFAULT_MODEL_DIR)


@functools.lru_cache(maxsize=1)
def _odd_model() -> tuple[dict[str, torch.Tensor], LlamaConfig]:
    """A small random model with decisive logits and settings that differ from the shipped one:
    an untied head, another RoPE base and epsilon, 3 query heads per kv head."""
    config = LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
                         num_key_value_heads=2, rope_theta=500.0, rms_norm_eps=1e-3, initializer_range=0.35,
                         tie_word_embeddings=False, max_position_embeddings=64)
    torch.manual_seed(6)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # norms that are not all ones, so a missing or swapped norm shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.rand(p.shape) + 0.5)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, config


def _generate_reference(weights: dict[str, torch.Tensor], config: LlamaConfig, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    model = LlamaForCausalLM(config).eval()
    model.load_state_dict(weights, strict=False)  # a tied head is not in the file: it is the embedding
    if config.tie_word_embeddings:
        model.tie_weights()
    ids = input_ids
    for _ in range(max_new_tokens):
        ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=-1)
    return ids


def _llama_generate_cases():
    from ...text.tokenizer import LlamaTokenizer
    from ...io.files import DEFAULT_MODEL_DIR

    tok = LlamaTokenizer.from_pretrained(DEFAULT_MODEL_DIR)
    weights, config = _shipped_weights(), _shipped_config()
    odd_weights, odd_config = _odd_model()
    g = _gen(60)
    return [
        ("the Shakespeare model, 'ROMEO:', 8 new tokens", (weights, config, tok("ROMEO:\nO", return_tensors="pt").input_ids, 8)),
        ("the Shakespeare model, a batch of 2 prompts, 5 new tokens",
         (weights, config, torch.tensor([tok("KING HENRY:\n").input_ids[:3], tok("JULIET:\nO").input_ids[:3]]), 5)),
        ("a random model: untied head, 6 heads sharing 2 kv heads, rope_theta 500, eps 1e-3",
         (odd_weights, odd_config, torch.randint(3, 96, (2, 5), generator=g), 6)),
    ]


def _flat_generate(weights, config, input_ids, max_new_tokens, final_norm=True, rope=True, causal=True, scale=True,
                   prenorm=True, halves=True, own_eps=True, own_theta=True, tiled_kv=False, tied_head=False):
    """A flat Llama with one switch per classic mistake (all True = correct)."""
    import math as _m
    import torch.nn.functional as F

    d, n_h, n_kv = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
    hd = d // n_h
    eps = config.rms_norm_eps if own_eps else 1e-6
    theta = config.rope_theta if own_theta else 10000.0
    head = weights["model.embed_tokens.weight"] if tied_head else weights.get("lm_head.weight", weights["model.embed_tokens.weight"])

    def norm(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    def rot(x, cos, sin):
        if halves:
            x1, x2 = x.chunk(2, -1)
            r = torch.cat((-x2, x1), -1)
        else:
            r = torch.stack((-x[..., 1::2], x[..., ::2]), -1).flatten(-2)
        return x * cos + r * sin

    ids = input_ids
    for _ in range(max_new_tokens):
        b, s = ids.shape
        inv = 1.0 / theta ** (torch.arange(0, hd, 2).float() / hd)
        ang = torch.arange(s).float()[:, None] * inv
        ang = torch.cat((ang, ang), -1) if halves else ang.repeat_interleave(2, -1)
        cos, sin = ang.cos(), ang.sin()
        h = weights["model.embed_tokens.weight"][ids]
        for i in range(config.num_hidden_layers):
            p = f"model.layers.{i}."
            x = norm(h, weights[p + "input_layernorm.weight"]) if prenorm else h
            q = (x @ weights[p + "self_attn.q_proj.weight"].T).view(b, s, n_h, hd).transpose(1, 2)
            k = (x @ weights[p + "self_attn.k_proj.weight"].T).view(b, s, n_kv, hd).transpose(1, 2)
            v = (x @ weights[p + "self_attn.v_proj.weight"].T).view(b, s, n_kv, hd).transpose(1, 2)
            if rope:
                q, k = rot(q, cos, sin), rot(k, cos, sin)
            if tiled_kv:
                k, v = k.repeat(1, n_h // n_kv, 1, 1), v.repeat(1, n_h // n_kv, 1, 1)
            else:
                k, v = k.repeat_interleave(n_h // n_kv, 1), v.repeat_interleave(n_h // n_kv, 1)
            scores = q @ k.transpose(-1, -2) / (_m.sqrt(hd) if scale else 1.0)
            if causal:
                scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
            att = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, d)
            h = h + att @ weights[p + "self_attn.o_proj.weight"].T
            if not prenorm:
                h = norm(h, weights[p + "input_layernorm.weight"])
            x = norm(h, weights[p + "post_attention_layernorm.weight"]) if prenorm else h
            mlp = (F.silu(x @ weights[p + "mlp.gate_proj.weight"].T) * (x @ weights[p + "mlp.up_proj.weight"].T)) @ weights[p + "mlp.down_proj.weight"].T
            h = h + mlp
            if not prenorm:
                h = norm(h, weights[p + "post_attention_layernorm.weight"])
        if final_norm:
            h = norm(h, weights["model.norm.weight"])
        ids = torch.cat([ids, (h[:, -1] @ head.T).argmax(-1, keepdim=True)], -1)
    return ids


register(
    "llama_generate", "06_full_model", "(weights, config, input_ids, max_new_tokens)",
    "your own Llama: from a Hugging Face state dict and its config, greedy-generate max_new_tokens tokens "
    "(prompt + new tokens, as generate(do_sample=False) without an end token), with your own RMSNorm, RoPE, "
    "attention, SwiGLU and decoder layers",
    reference=_generate_reference,
    cases=_llama_generate_cases,
    mistakes=[
        (lambda w, c, ids, n: _flat_generate(w, c, ids, n, final_norm=False),
         "the final norm (model.norm) is missing before the LM head", "h = rms_norm(h, weights['model.norm.weight']) after the last layer"),
        (lambda w, c, ids, n: _flat_generate(w, c, ids, n, rope=False),
         "q and k are not rotated (no RoPE): the model cannot tell positions apart", "apply_rotary_pos_emb to q and k in every layer"),
        (lambda w, c, ids, n: _flat_generate(w, c, ids, n, causal=False),
         "no causal mask: each position also sees the tokens after it", "mask scores where key > query before the softmax"),
        (lambda w, c, ids, n: _flat_generate(w, c, ids, n, scale=False),
         "the scores are not divided by sqrt(head_dim)", "scores = q @ k^T / math.sqrt(head_dim)"),
        (lambda w, c, ids, n: _flat_generate(w, c, ids, n, prenorm=False),
         "post-norm: Llama normalises the input of each sub-block, not the residual sum",
         "h = h + attn(rms_norm(h)); h = h + mlp(rms_norm(h))"),
        (lambda w, c, ids, n: _flat_generate(w, c, ids, n, halves=False),
         "RoPE pairs neighbouring dimensions (2i, 2i+1), Meta's layout; Hugging Face's q_proj/k_proj rows pair i with i + head_dim/2",
         "use rotate_half and cos/sin built as cat((freqs, freqs), -1)"),
        (lambda w, c, ids, n: _flat_generate(w, c, ids, n, own_theta=False),
         "rope_theta is hard-coded to 10000; read it from config.rope_theta", "theta = config.rope_theta"),
        (lambda w, c, ids, n: _flat_generate(w, c, ids, n, tied_head=True),
         "the LM head is always the embedding matrix; with tie_word_embeddings False the model has its own lm_head.weight",
         "head = weights['lm_head.weight'] when it exists (config.tie_word_embeddings is False), else the embedding"),
        (lambda w, c, ids, n: _flat_generate(w, c, ids, n, tiled_kv=True),
         "the kv heads are tiled (repeat): query head 1 gets kv head 1 instead of kv head 0", "repeat_interleave(n_rep, dim=1): consecutive query heads share a kv head"),
    ],
)
