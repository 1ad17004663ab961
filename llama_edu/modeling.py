"""transformers' API around the core: ``LlamaModel``, ``LlamaForCausalLM``,
``LlamaForSequenceClassification``.

The core (:mod:`llama_edu.model`) is the decoder stack and its one forward, driven by positions.
What exists only to be a drop-in for transformers (v4.37 documentation) lives here: the
``forward`` signatures with their defaults taken from the config, legacy tuple caches,
``return_dict`` and the output dataclasses, input checks (done once, where inputs enter),
``resize_token_embeddings``, loading/saving and ``generate`` as methods, and the heads with
their losses. Names, arguments, outputs and state-dict keys are transformers', so weights move
between the two libraries with ``load_state_dict(strict=True)``.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .attention import check_flash_attention_available
from .cache import Cache, DynamicCache, StaticCache
from .io.checkpoint import load_pretrained, save_pretrained
from .config import LlamaConfig
from .generation.decode import check_input_ids, generate, tensor_key
from .model import LlamaDecoder
from .outputs import BaseModelOutputWithPast, CausalLMOutputWithPast, SequenceClassifierOutputWithPast
from .pretraining_tp import apply_pretraining_tp


def check_config(config: Any) -> LlamaConfig:
    """The config every model class is built from, checked once."""
    if not isinstance(config, LlamaConfig):
        raise TypeError(f"expected a LlamaConfig, got {type(config).__name__}")
    if config.attn_implementation == "flash_attention_2":
        check_flash_attention_available()
    return config


class LlamaPreTrainedModel(nn.Module):
    """What every Llama model shares: weight initialisation, embeddings helpers, loading/saving
    (see :mod:`llama_edu.checkpoint`) and ``generate`` (see :mod:`llama_edu.generation`).
    Subclasses set ``self.config`` (see :func:`check_config`)."""

    config_class = LlamaConfig
    base_model_prefix = "model"
    _tied_weights_keys: list[str] = []

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
        """Initialise the weights, emulate ``pretraining_tp`` if asked, tie the LM head."""
        self.apply(self._init_weights)
        if self.config.pretraining_tp > 1:
            apply_pretraining_tp(self, self.config.pretraining_tp)
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
        return load_pretrained(cls, pretrained_model_name_or_path, **kwargs)

    def save_pretrained(self, save_directory, **kwargs: Any) -> None:
        """Write ``config.json`` and safetensors weights; see :func:`llama_edu.checkpoint.save_pretrained`."""
        save_pretrained(self, save_directory, **kwargs)

    @torch.no_grad()
    def generate(self, *args: Any, **kwargs: Any) -> torch.LongTensor:
        """Autoregressive decoding; see :func:`llama_edu.generation.generate`."""
        return generate(self, *args, **kwargs)


class LlamaModel(LlamaPreTrainedModel, LlamaDecoder):
    """The decoder stack with transformers' ``forward``: token ids (batch, seq) -> hidden states
    (batch, seq, hidden_size). The layers and the computation are the core's :class:`LlamaDecoder`."""

    def __init__(self, config: LlamaConfig):
        super().__init__(check_config(config))
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
        cache_position: torch.LongTensor | None = None,
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
            check_input_ids(input_ids, cfg.vocab_size)
            batch_size, seq_length = input_ids.shape
        else:
            if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != cfg.hidden_size:
                raise ValueError(f"inputs_embeds must be (batch, seq, {cfg.hidden_size}), got {tuple(inputs_embeds.shape)}")
            batch_size, seq_length = inputs_embeds.shape[:2]

        # A legacy tuple cache (or none, when caching) becomes a DynamicCache; we return the
        # format we were given, as transformers does.
        return_legacy_cache = use_cache and not isinstance(past_key_values, Cache)
        cache = past_key_values
        if cache is not None or use_cache:
            if not isinstance(cache, Cache):
                cache = DynamicCache.from_legacy_cache(_check_legacy_cache(cache, cfg.num_hidden_layers))
            _check_cache(cache, cfg.num_hidden_layers, batch_size, seq_length)
        past_length = cache.get_seq_length() if cache is not None else 0
        if cfg.rope_scaling is None:
            last = past_length + seq_length if position_ids is None else int(position_ids.max()) + 1
            if last > cfg.max_position_embeddings:
                self._warn_beyond_context(last)

        device = (input_ids if input_ids is not None else inputs_embeds).device
        if cache_position is None:
            cache_position = torch.arange(past_length, past_length + seq_length, device=device)
        if position_ids is None:
            position_ids = cache_position[None]
        attention_mask = _padding_mask(attention_mask, batch_size, past_length + seq_length, cache, device)

        out = super().forward(
            input_ids, position_ids, cache_position, attention_mask, cache, inputs_embeds,
            output_hidden_states, output_attentions,
        )
        next_cache = None
        if use_cache:
            next_cache = cache.to_legacy_cache() if return_legacy_cache else cache
        result = BaseModelOutputWithPast(out.last_hidden_state, next_cache, out.hidden_states, out.attentions)
        return result if return_dict else result.to_tuple()

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


def _check_legacy_cache(past_key_values: Any, num_layers: int) -> Any:
    """A tuple of (key, value) pairs, one per layer, or None."""
    if past_key_values is None:
        return None
    if not isinstance(past_key_values, (tuple, list)) or not all(
        isinstance(p, (tuple, list)) and len(p) == 2 for p in past_key_values
    ):
        raise TypeError(
            "past_key_values must be a Cache (e.g. DynamicCache()) or a tuple of (key, value) pairs, "
            f"one per layer; got {type(past_key_values).__name__}"
        )
    return past_key_values


def _check_cache(cache: Cache, num_layers: int, batch_size: int, new_tokens: int) -> None:
    """A cache must cover every layer (or none yet), and a StaticCache must have room."""
    if 0 < len(cache) != num_layers:
        raise ValueError(
            f"past_key_values holds {len(cache)} layers but the model has {num_layers}: it comes from another "
            "model (or was cut); pass the cache this model returned, or none"
        )
    if isinstance(cache, StaticCache):
        if cache.max_batch_size != batch_size:
            raise ValueError(f"the StaticCache was made for batch size {cache.max_batch_size}, the input has {batch_size}")
        needed = cache.get_seq_length() + new_tokens
        if needed > cache.max_cache_len:
            raise ValueError(
                f"the StaticCache holds {cache.max_cache_len} positions but {needed} are needed; "
                "create it with a larger max_cache_len (prompt length + max_new_tokens)"
            )


def _padding_mask(
    attention_mask: torch.Tensor | None, batch_size: int, length: int, cache: Cache | None, device: torch.device
) -> torch.Tensor | None:
    """The user's ``attention_mask`` as the core takes it: a 2-D (batch, keys) mask of 1 = token /
    0 = padding, or None when nothing is padded. A 4-D (batch, 1, query, keys) mask of
    1 = may attend is passed on as booleans."""
    if attention_mask is None:
        return None
    attention_mask = attention_mask.to(device)
    if attention_mask.dim() == 4:
        return attention_mask.bool()
    if attention_mask.dim() != 2 or tuple(attention_mask.shape) != (batch_size, length):
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)} but must be (batch, past + new tokens) = "
            f"{(batch_size, length)}: one 1/0 entry per token, the cached ones included"
        )
    if bool(attention_mask.all()):
        return None  # nothing padded: plain causal attention (a host sync, once per call)
    if isinstance(cache, StaticCache):  # the core's mask spans every slot; later slots are causal-masked
        extra = cache.max_cache_len - length
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch_size, extra)], dim=-1)
    return attention_mask


#: Up to this size, single-sequence CPU decoding keeps a column-major copy of the LM head (see
#: :meth:`LlamaForCausalLM.logits`). 64 MiB is a 32k x 512 float32 head (the stories15M shape);
#: a 7B model's 0.5 GB head is never copied.
COLUMN_MAJOR_HEAD_MAX_BYTES = 64 * 2**20
_HEAD_COPIES: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


class LlamaForCausalLM(LlamaPreTrainedModel):
    """LlamaModel plus the LM head: next-token logits (batch, seq, vocab_size)."""

    _tied_weights_keys = ["lm_head.weight"]

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = check_config(config)
        self.model = LlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

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
        cache_position: torch.LongTensor | None = None,
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
            cache_position=cache_position,
        )
        logits = self.logits(outputs.last_hidden_state, logits_to_keep)

        loss = None
        if labels is not None:
            if labels.shape != logits.shape[:2]:
                raise ValueError(f"labels must have the shape of the logits' (batch, seq) = {tuple(logits.shape[:2])}, got {tuple(labels.shape)}")
            loss = causal_lm_loss(logits, labels)

        out = CausalLMOutputWithPast(loss, logits, outputs.past_key_values, outputs.hidden_states, outputs.attentions)
        return out if return_dict else out.to_tuple()

    def next_token_logits(
        self,
        input_ids: torch.LongTensor,
        position_ids: torch.LongTensor,
        cache_position: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        head_t: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One step of generation: float32 logits (batch, vocab) for the token after
        ``input_ids`` (batch, q), written to ``cache``. The core's forward (arguments as
        :meth:`llama_edu.model.LlamaDecoder.forward` takes them) and :meth:`logits` on the last
        position. It checks nothing: it runs once per decoded token, and ``generate`` checked
        its inputs once at the entry. ``head_t``: see :meth:`logits`."""
        hidden = LlamaDecoder.forward(self.model, input_ids, position_ids, cache_position, attention_mask, cache)[0]
        return self.logits(hidden[:, -1], head_t=head_t)

    def logits(self, hidden_states: torch.Tensor, logits_to_keep: int = 0, head_t: torch.Tensor | None = None) -> torch.Tensor:
        """The LM head on final hidden states (..., hidden) -> float32 logits (..., vocab): the
        one place the head is applied, by :meth:`forward` and :meth:`next_token_logits`.
        ``logits_to_keep=n`` keeps the last n positions of (batch, seq, hidden) states only.

        A single row on the CPU without gradients (one sequence decoding) goes through a
        column-major copy of the head (:meth:`column_major_head`): CPU BLAS runs that
        matrix-vector product about 2x faster on that layout. Compiled code cannot look the
        copy up inside its graph, so the compiled decode step receives it as ``head_t``.
        """
        if logits_to_keep:
            hidden_states = hidden_states[:, -logits_to_keep:]
        if head_t is None and not torch.compiler.is_compiling():
            head_t = self.column_major_head(hidden_states.shape[:-1].numel(), hidden_states.device)
        if head_t is not None:
            return F.linear(hidden_states, head_t.t()).float()
        return self.lm_head(hidden_states).float()  # float32 whatever the model dtype, as transformers 4.37

    def column_major_head(self, rows: int, device: torch.device) -> torch.Tensor | None:
        """The LM head's weight as a (hidden, vocab) contiguous copy, made once and kept while the
        weight is unchanged; None where it does not pay: more than one row, not a CPU, gradients
        on, a head over :data:`COLUMN_MAJOR_HEAD_MAX_BYTES`, or not a plain ``nn.Linear`` (a
        quantized head has no float weight to copy)."""
        head = self.lm_head
        if type(head) is not nn.Linear or rows != 1 or device.type != "cpu" or torch.is_grad_enabled():
            return None
        w = head.weight
        if w.numel() * w.element_size() > COLUMN_MAJOR_HEAD_MAX_BYTES:
            return None
        key = (*tensor_key(w), w.dtype, w.shape)  # rebuilt when the weight changes
        cached = _HEAD_COPIES.get(head)
        if cached is None or cached[0] != key:
            with torch.inference_mode(False):
                cached = (key, w.detach().t().contiguous())  # (hidden, vocab)
            _HEAD_COPIES[head] = cached
        return cached[1]


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The pretraining objective: mean next-token cross-entropy.

    ``logits`` (batch, seq, vocab) at position t score the token at t + 1, so the last position
    has no target and the first label has no prediction: compare ``logits[:, :-1]`` with
    ``labels[:, 1:]``. Labels equal to -100 (padding, prompt tokens) count neither in the sum nor
    in the number of tokens the mean divides by. Returns a float32 scalar.
    """
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()  # (batch * (seq - 1), vocab)
    shift_labels = labels[:, 1:].reshape(-1).to(shift_logits.device)  # (batch * (seq - 1),)
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=-100)


class LlamaForSequenceClassification(LlamaPreTrainedModel):
    """LlamaModel plus a linear ``score`` head read at the last token of each sequence:
    logits (batch, num_labels). Regression (num_labels == 1), single-label and multi-label
    losses, chosen as transformers chooses them (``config.problem_type``)."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = check_config(config)
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
