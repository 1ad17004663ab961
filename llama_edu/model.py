"""The Llama decoder and its heads: LlamaModel, LlamaForCausalLM, LlamaForSequenceClassification.

One decoder layer (pre-norm residual blocks, Touvron et al. 2023, section 2.2):

    h = x + Attention(RMSNorm(x))
    y = h + SwiGLU(RMSNorm(h))

The model embeds tokens, runs ``num_hidden_layers`` such layers and a final RMSNorm; the causal
LM head maps the result to vocabulary logits. Names, arguments, outputs and state-dict keys are
those of transformers' ``modeling_llama.py``, so weights move between the two libraries with
``load_state_dict(strict=True)``.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import LlamaAttention, check_flash_attention_available, is_compiling, prepare_attention_mask
from .cache import Cache, DynamicCache
from .config import LlamaConfig
from .mlp import LlamaMLP, sliced_linear
from .outputs import BaseModelOutputWithPast, CausalLMOutputWithPast, SequenceClassifierOutputWithPast
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
        attention_mask: torch.Tensor | None = None,
        past_key_value: Cache | None = None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(batch, seq, hidden) -> (batch, seq, hidden), plus attention weights if asked."""
        attn_out, weights = self.self_attn(
            self.input_layernorm(hidden_states), cos, sin, attention_mask, past_key_value, output_attentions
        )
        hidden_states = hidden_states + attn_out
        hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states, weights


class LlamaPreTrainedModel(nn.Module):
    """What every Llama model shares: the config, weight initialisation, embeddings helpers,
    loading/saving (see :mod:`llama_edu.checkpoint`) and ``generate`` (see
    :mod:`llama_edu.generation`)."""

    config_class = LlamaConfig
    base_model_prefix = "model"
    _tied_weights_keys: list[str] = []

    def __init__(self, config: LlamaConfig):
        super().__init__()
        if not isinstance(config, LlamaConfig):
            raise TypeError(f"expected a LlamaConfig, got {type(config).__name__}")
        if config.attn_implementation == "flash_attention_2":
            check_flash_attention_available()
        self.config = config

    def _init_weights(self, module: nn.Module) -> None:
        """Normal(0, initializer_range) for linear and embedding weights, zero biases and the
        padding row, ones for norms (as transformers initialises Llama)."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            module.weight.data.normal_(mean=0.0, std=std)
            if module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.data.normal_(mean=0.0, std=std)
            if module.padding_idx is not None:
                module.weight.data[module.padding_idx].zero_()

    def post_init(self) -> None:
        self.apply(self._init_weights)
        self.tie_weights()

    # -- embeddings -----------------------------------------------------------------
    def get_input_embeddings(self) -> nn.Embedding:
        return self.get_base_model().embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.get_base_model().embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear | None:
        return None

    def get_base_model(self) -> "LlamaModel":
        return getattr(self, self.base_model_prefix, self)

    def tie_weights(self) -> None:
        """Share the input embedding matrix with the LM head when ``tie_word_embeddings``."""
        out = self.get_output_embeddings()
        if out is not None and self.config.tie_word_embeddings:
            out.weight = self.get_input_embeddings().weight

    def resize_token_embeddings(self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None) -> nn.Embedding:
        """Grow (or shrink) the vocabulary to ``new_num_tokens`` rows, e.g. after
        ``tokenizer.add_special_tokens({"pad_token": "<pad>"})``: old rows are kept, new rows are
        initialised like fresh weights, and the LM head follows (or stays tied)."""
        old = self.get_input_embeddings()
        if new_num_tokens is None:
            new_num_tokens = old.num_embeddings
        if pad_to_multiple_of:
            new_num_tokens = -(-new_num_tokens // pad_to_multiple_of) * pad_to_multiple_of
        if new_num_tokens < 1:
            raise ValueError(f"new_num_tokens must be positive, got {new_num_tokens}")
        n = min(old.num_embeddings, new_num_tokens)
        padding_idx = old.padding_idx if old.padding_idx is not None and old.padding_idx < new_num_tokens else None
        emb = nn.Embedding(new_num_tokens, old.embedding_dim, padding_idx, device=old.weight.device, dtype=old.weight.dtype)
        self._init_weights(emb)
        emb.weight.data[:n] = old.weight.data[:n]
        self.set_input_embeddings(emb)
        head = self.get_output_embeddings()
        if head is not None and not self.config.tie_word_embeddings:
            new_head = nn.Linear(head.in_features, new_num_tokens, bias=False, device=head.weight.device, dtype=head.weight.dtype)
            self._init_weights(new_head)
            new_head.weight.data[:n] = head.weight.data[:n]
            self.set_output_embeddings(new_head)
        self.config.vocab_size = new_num_tokens
        if hasattr(self, "vocab_size"):
            self.vocab_size = new_num_tokens
        self.get_base_model().vocab_size = new_num_tokens
        self.tie_weights()
        return emb

    # -- conveniences -----------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(p for p in self.parameters() if p.is_floating_point()).dtype

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Number of distinct parameters (a tied LM head is counted once)."""
        params = {id(p): p for p in self.parameters()}
        if exclude_embeddings:
            params.pop(id(self.get_input_embeddings().weight), None)
            head = self.get_output_embeddings()
            if head is not None:
                params.pop(id(head.weight), None)
        return sum(p.numel() for p in params.values())

    def gradient_checkpointing_enable(self) -> None:
        """Recompute each layer's activations in the backward pass instead of storing them."""
        self.get_base_model().gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.get_base_model().gradient_checkpointing = False

    # -- loading, saving, generating (their own modules) ------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs: Any):
        """Load a Hugging Face-layout checkpoint; see :func:`llama_edu.checkpoint.load_pretrained`."""
        from .checkpoint import load_pretrained

        return load_pretrained(cls, pretrained_model_name_or_path, **kwargs)

    def save_pretrained(self, save_directory, **kwargs: Any) -> None:
        """Write ``config.json`` and safetensors weights; see :func:`llama_edu.checkpoint.save_pretrained`."""
        from .checkpoint import save_pretrained

        save_pretrained(self, save_directory, **kwargs)

    @torch.no_grad()
    def generate(self, *args: Any, **kwargs: Any) -> torch.LongTensor:
        """Autoregressive decoding; see :func:`llama_edu.generation.generate`."""
        from .generation import generate

        return generate(self, *args, **kwargs)


class LlamaModel(LlamaPreTrainedModel):
    """The decoder stack: token ids (batch, seq) -> hidden states (batch, seq, hidden_size)."""

    def __init__(self, config: LlamaConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        # One rotary table for all layers (transformers 4.37 keeps a copy per layer; same numbers).
        self.rotary_emb = LlamaRotaryEmbedding(
            config.head_dim, config.max_position_embeddings, config.rope_theta, config.rope_scaling
        )
        self.gradient_checkpointing = False
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | tuple | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> BaseModelOutputWithPast | tuple:
        cfg = self.config
        output_attentions = cfg.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = cfg.output_hidden_states if output_hidden_states is None else output_hidden_states
        use_cache = cfg.use_cache if use_cache is None else use_cache
        return_dict = cfg.use_return_dict if return_dict is None else return_dict
        if self.gradient_checkpointing and self.training:
            use_cache = False  # the recomputed forward would write the cache twice

        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids (token ids) or inputs_embeds (their vectors)")
        if input_ids is not None:
            if not is_compiling():  # the check reads values: a host sync a compiled graph cannot hold
                self._check_input_ids(input_ids)
            inputs_embeds = self.embed_tokens(input_ids)
        elif inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != cfg.hidden_size:
            raise ValueError(f"inputs_embeds must be (batch, seq, {cfg.hidden_size}), got {tuple(inputs_embeds.shape)}")
        batch_size, seq_length = inputs_embeds.shape[:2]

        # A legacy tuple cache (or none, when caching) becomes a DynamicCache; we return the
        # format we were given, as transformers does.
        return_legacy_cache = use_cache and not isinstance(past_key_values, Cache)
        if past_key_values is not None or use_cache:
            if not isinstance(past_key_values, Cache):
                past_key_values = DynamicCache.from_legacy_cache(past_key_values)
        past_length = past_key_values.get_seq_length() if past_key_values is not None else 0

        if past_length + seq_length > cfg.max_position_embeddings and cfg.rope_scaling is None:
            self._warn_beyond_context(past_length + seq_length)
        if position_ids is None:
            position_ids = torch.arange(past_length, past_length + seq_length, device=inputs_embeds.device)[None]
        impl = "eager" if output_attentions else cfg.attn_implementation
        mask = prepare_attention_mask(
            attention_mask, batch_size, seq_length, past_length, inputs_embeds.dtype, inputs_embeds.device, impl
        )
        cos, sin = self.rotary_emb(position_ids, past_length + seq_length, inputs_embeds.dtype)  # (b, seq, head_dim)

        hidden_states = inputs_embeds
        all_hidden_states = () if output_hidden_states else None
        all_attentions = () if output_attentions else None
        for layer in self.layers:
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            if self.gradient_checkpointing and self.training:
                hidden_states, weights = checkpoint(
                    layer, hidden_states, cos, sin, mask, None, output_attentions, use_reentrant=False
                )
            else:
                hidden_states, weights = layer(hidden_states, cos, sin, mask, past_key_values, output_attentions)
            if output_attentions:
                all_attentions += (weights,)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            # As in transformers: the last entry is after the final norm (L + 1 entries in all).
            all_hidden_states += (hidden_states,)

        next_cache = None
        if use_cache:
            next_cache = past_key_values.to_legacy_cache() if return_legacy_cache else past_key_values
        out = BaseModelOutputWithPast(hidden_states, next_cache, all_hidden_states, all_attentions)
        return out if return_dict else out.to_tuple()

    def _warn_beyond_context(self, length: int) -> None:
        # RoPE has no hard limit (dynamic NTK scaling exists to go past it), so this is a
        # warning, once per model; generate() refuses such lengths outright.
        if not getattr(self, "_warned_context", False):
            self._warned_context = True
            warnings.warn(
                f"the sequence ({length} tokens) is longer than max_position_embeddings "
                f"({self.config.max_position_embeddings}), the context the model was trained on: expect "
                "degraded outputs, or set config.rope_scaling (e.g. {'type': 'dynamic', 'factor': 2.0})",
                stacklevel=3,
            )

    def _check_input_ids(self, input_ids: torch.Tensor) -> None:
        if input_ids.dim() != 2:
            raise ValueError(
                f"input_ids must be 2-D (batch, seq), got shape {tuple(input_ids.shape)}; "
                "for a single sequence use input_ids[None] or tokenizer(..., return_tensors='pt')"
            )
        if input_ids.dtype.is_floating_point:
            raise TypeError(f"input_ids must be integer token ids, got {input_ids.dtype}")
        if input_ids.numel():
            lo, hi = int(input_ids.min()), int(input_ids.max())
            if lo < 0 or hi >= self.vocab_size:
                raise ValueError(
                    f"input_ids contain {hi if hi >= self.vocab_size else lo}, outside the vocabulary [0, {self.vocab_size}); "
                    "if you added tokens to the tokenizer, call model.resize_token_embeddings(len(tokenizer))"
                )


class LlamaForCausalLM(LlamaPreTrainedModel):
    """LlamaModel plus the LM head: next-token logits (batch, seq, vocab_size)."""

    _tied_weights_keys = ["lm_head.weight"]

    def __init__(self, config: LlamaConfig):
        super().__init__(config)
        self.model = LlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    # -- a CPU decoding speed-up ------------------------------------------------------
    # Decoding one sequence multiplies one hidden vector by the (vocab, hidden) LM head, the biggest
    # matrix of a small model. CPU BLAS runs that matrix-vector product about twice as fast
    # when the weight is stored column-major, so without gradients we keep such a copy (rebuilt
    # whenever the weight changes: its version counter tracks in-place updates).
    def _use_decode_head(self, hidden_states: torch.Tensor) -> bool:
        return (
            hidden_states.device.type == "cpu"
            and hidden_states.shape[0] * hidden_states.shape[1] <= 2  # measured: no gain from 4 rows on
            and self.config.pretraining_tp == 1
            and not torch.is_grad_enabled()
            and isinstance(self.lm_head, nn.Linear)  # not a quantized head (llama_edu.quantize)
        )

    def _decode_head_weight(self) -> torch.Tensor:
        w = self.lm_head.weight
        key = (w.data_ptr(), w._version, w.dtype, w.shape)
        if getattr(self, "_decode_head_key", None) != key:
            self._decode_head = w.detach().t().contiguous()  # (hidden, vocab), contiguous
            self._decode_head_key = key
        return self._decode_head.t()  # (vocab, hidden) again, as a column-major view

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.lm_head = new_embeddings

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | tuple | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int = 0,
    ) -> CausalLMOutputWithPast | tuple:
        """``labels`` (batch, seq) give the mean next-token cross-entropy (shifted inside;
        -100 is ignored). ``logits_to_keep=n`` computes logits for the last n positions only
        (generation needs just the last one), 0 for all."""
        return_dict = self.config.use_return_dict if return_dict is None else return_dict
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        hidden_states = outputs.last_hidden_state
        if logits_to_keep:
            hidden_states = hidden_states[:, -logits_to_keep:]
        if self._use_decode_head(hidden_states):
            logits = F.linear(hidden_states, self._decode_head_weight())
        else:
            logits = sliced_linear(hidden_states, self.lm_head, self.config.pretraining_tp)
        logits = logits.float()  # float32 whatever the model dtype, as transformers 4.37 returns them

        loss = None
        if labels is not None:
            if labels.shape != logits.shape[:2]:
                raise ValueError(f"labels must have the shape of the logits' (batch, seq) = {tuple(logits.shape[:2])}, got {tuple(labels.shape)}")
            # Position t predicts token t + 1.
            shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1])
            shift_labels = labels[:, 1:].reshape(-1).to(logits.device)
            loss = F.cross_entropy(shift_logits, shift_labels, ignore_index=-100)

        out = CausalLMOutputWithPast(loss, logits, outputs.past_key_values, outputs.hidden_states, outputs.attentions)
        return out if return_dict else out.to_tuple()


class LlamaForSequenceClassification(LlamaPreTrainedModel):
    """LlamaModel plus a linear ``score`` head read at the last token of each sequence:
    logits (batch, num_labels). Regression (num_labels == 1), single-label and multi-label
    losses, chosen as transformers chooses them (``config.problem_type``)."""

    def __init__(self, config: LlamaConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = LlamaModel(config)
        self.score = nn.Linear(config.hidden_size, self.num_labels, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | tuple | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> SequenceClassifierOutputWithPast | tuple:
        return_dict = self.config.use_return_dict if return_dict is None else return_dict
        outputs = self.model(
            input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        logits = self.score(outputs.last_hidden_state)  # (batch, seq, num_labels)
        batch_size = logits.shape[0]
        last = self._last_token_index(input_ids, attention_mask, batch_size, logits.shape[1])
        pooled_logits = logits[torch.arange(batch_size, device=logits.device), last.to(logits.device)]

        loss = self._loss(pooled_logits, labels) if labels is not None else None
        out = SequenceClassifierOutputWithPast(
            loss, pooled_logits, outputs.past_key_values, outputs.hidden_states, outputs.attentions
        )
        return out if return_dict else out.to_tuple()

    def _last_token_index(self, input_ids, attention_mask, batch_size: int, seq_len: int) -> torch.Tensor:
        """Index of the token each row is classified at.

        With an attention_mask: the last attended token (left or right padding alike), so a pad
        id that also occurs inside the text (pad = eos, transformers #35352) does no harm.
        Otherwise as transformers: the token before the first pad id, or the last token.
        """
        pad = self.config.pad_token_id
        if pad is None and batch_size != 1:
            raise ValueError(
                "Cannot handle batch sizes > 1 if no padding token is defined: set model.config.pad_token_id "
                "(e.g. to tokenizer.pad_token_id after tokenizer.pad_token = tokenizer.eos_token)"
            )
        if attention_mask is not None and attention_mask.dim() == 2 and pad is not None:
            positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
            last = (attention_mask.bool() * positions).argmax(-1)  # the largest attended position
            return (last - (attention_mask.shape[1] - seq_len)).clamp_min(0)  # minus cached positions
        if pad is None or input_ids is None:
            return torch.full((batch_size,), seq_len - 1, dtype=torch.long)
        return (torch.eq(input_ids, pad).int().argmax(-1) - 1) % input_ids.shape[-1]

    def _loss(self, pooled_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        labels = labels.to(pooled_logits.device)
        if self.config.problem_type is None:
            if self.num_labels == 1:
                self.config.problem_type = "regression"
            elif labels.dtype in (torch.long, torch.int):
                self.config.problem_type = "single_label_classification"
            else:
                self.config.problem_type = "multi_label_classification"
        kind = self.config.problem_type
        if kind == "regression":
            if self.num_labels == 1:
                return F.mse_loss(pooled_logits.squeeze(), labels.squeeze().to(pooled_logits.dtype))
            return F.mse_loss(pooled_logits, labels.to(pooled_logits.dtype))
        if kind == "single_label_classification":
            return F.cross_entropy(pooled_logits.view(-1, self.num_labels), labels.view(-1))
        if kind == "multi_label_classification":
            return F.binary_cross_entropy_with_logits(pooled_logits, labels.to(pooled_logits.dtype))
        raise ValueError(
            f"config.problem_type {kind!r} is unknown; use 'regression', 'single_label_classification' "
            "or 'multi_label_classification'"
        )
