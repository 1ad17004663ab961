"""The Llama decoder: one decoder layer, and the one forward of the stack.

One decoder layer (pre-norm residual blocks, Touvron et al. 2023, section 2.2):

    h = x + Attention(RMSNorm(x))
    y = h + SwiGLU(RMSNorm(h))

The stack embeds tokens, runs ``num_hidden_layers`` such layers and a final RMSNorm. Its
``forward`` is driven by positions, as gpt-fast's ``Transformer.forward(idx, input_pos)``:
``position_ids`` place each token for RoPE, ``cache_position`` says which cache slots the new
keys/values go to. The prompt (prefill) and each new token (decode) go through this same code.

This is the core. It checks nothing and normalises nothing: :mod:`llama_edu.modeling` wraps it
in transformers' API (``LlamaModel``, ``LlamaForCausalLM``, ...), checks inputs where they
enter, and adds the heads; :mod:`llama_edu.generation` calls it once per decoded token.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import LlamaAttention, causal_mask
from .cache import Cache, StaticCache
from .config import LlamaConfig
from .mlp import LlamaMLP
from .rmsnorm import LlamaRMSNorm
from .rope import LlamaRotaryEmbedding


class LlamaDecoderLayer(nn.Module):
    """Attention then feed-forward, each as a pre-normalised residual block."""

    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.self_attn = LlamaAttention(config, layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

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
        """(batch, seq, hidden) -> (batch, seq, hidden), plus attention weights if asked."""
        attn_out, weights = self.self_attn(
            self.input_layernorm(hidden_states), cos, sin, mask, cache, cache_position, output_attentions
        )
        hidden_states = hidden_states + attn_out
        hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states, weights


class DecoderOutput(NamedTuple):
    last_hidden_state: torch.Tensor  # (batch, seq, hidden), after the final norm
    hidden_states: tuple[torch.Tensor, ...] | None  # the input of every layer, then the output
    attentions: tuple[torch.Tensor, ...] | None  # (batch, heads, seq, keys) per layer


class LlamaDecoder(nn.Module):
    """The decoder stack: token ids (batch, seq) -> hidden states (batch, seq, hidden_size)."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        # One rotary table for all layers, computed per forward (no buffers: the model can be
        # built on the meta device, and dynamic scaling depends only on the current length).
        self.rotary_emb = LlamaRotaryEmbedding(
            config.head_dim, config.max_position_embeddings, config.rope_theta, config.rope_scaling
        )
        self.gradient_checkpointing = False

    def forward(
        self,
        input_ids: torch.LongTensor | None,
        position_ids: torch.LongTensor,
        cache_position: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> DecoderOutput:
        """Run the stack on ``input_ids`` (batch, seq) (or their ``inputs_embeds``).

        - ``position_ids`` (batch, seq): each token's position, for RoPE;
        - ``cache_position`` (seq,): the cache slots of the new tokens (= positions without padding);
        - ``attention_mask`` (batch, keys), 1 = token, 0 = padding, or None when nothing is padded;
        - ``cache``: where keys/values are kept between calls (None: no caching).
        """
        hidden_states = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        q_len = hidden_states.shape[1]
        if isinstance(cache, StaticCache):  # the keys are its slots: all, or (trim) those written so far
            kv_length = cache.keys_length(cache_position)
            growing = cache.trim  # then the keys end at the newest token, as with a growing cache
        else:
            kv_length = q_len + (0 if cache is None else cache.get_seq_length())  # past tokens + new ones
            growing = True
        if attention_mask is not None:
            attention_mask = attention_mask[:, :kv_length]  # a static cache's mask covers every slot

        impl = "eager" if output_attentions else self.config.attn_implementation
        if attention_mask is None and growing and (q_len == 1 or kv_length == q_len):
            mask = None  # plain causal attention (one query, or no past): the kernel's causal flag does it
        else:
            mask = causal_mask(cache_position, kv_length, attention_mask, unmask_empty_rows=impl != "eager")
        seq_len = kv_length
        if not growing and self.rotary_emb.scaling_type == "dynamic":
            seq_len = int(cache_position[-1]) + 1  # dynamic NTK needs the length as a number: a host sync
        cos, sin = self.rotary_emb(position_ids, seq_len, hidden_states.dtype)  # (batch, seq, head_dim)
        cos, sin = cos[:, None], sin[:, None]  # (batch, 1, seq, head_dim): the same for every head

        all_hidden = () if output_hidden_states else None
        all_attentions = () if output_attentions else None
        for layer in self.layers:
            if output_hidden_states:
                all_hidden += (hidden_states,)
            if self.gradient_checkpointing and self.training:  # recompute activations in backward
                hidden_states, weights = checkpoint(
                    layer, hidden_states, cos, sin, mask, None, None, output_attentions, use_reentrant=False
                )
            else:
                hidden_states, weights = layer(hidden_states, cos, sin, mask, cache, cache_position, output_attentions)
            if output_attentions:
                all_attentions += (weights,)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden += (hidden_states,)  # as transformers: the last entry is after the norm
        return DecoderOutput(hidden_states, all_hidden, all_attentions)
