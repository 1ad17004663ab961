"""Exercises of notebook 06_full_model."""

from __future__ import annotations

import functools
import json
import torch
from ...config import LlamaConfig
from ...modeling import LlamaForCausalLM

from .checking import register


def _count_reference(config: LlamaConfig) -> int:
    return _count_on_meta(config.to_json_string())


@functools.lru_cache(maxsize=16)
def _count_on_meta(config_json: str) -> int:  # building a 70B model, even on meta, takes a second
    with torch.device("meta"):
        return LlamaForCausalLM(LlamaConfig.from_dict(json.loads(config_json))).num_parameters()


def _count(c, kv=None, norms=True, final=True, tied_twice=False):
    d, hd, L = c.hidden_size, c.head_dim, c.num_hidden_layers
    kv = c.num_key_value_heads if kv is None else kv
    attention = 2 * d * c.num_attention_heads * hd + 2 * d * kv * hd
    per_layer = attention + 3 * d * c.intermediate_size + (2 * d if norms else 0)
    head = 0 if c.tie_word_embeddings and not tied_twice else c.vocab_size * d
    return c.vocab_size * d + L * per_layer + (d if final else 0) + head


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
    ],
)
