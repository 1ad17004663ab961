"""Turning next-token logits into text: logits processors, ``generate``, streaming, chat.

A causal LM gives, for a prefix x_1..x_t, the logits of p(x_{t+1} | x_1..x_t). Generation
repeats: run the model, reshape the distribution (penalties, temperature, top-k, top-p),
pick a token (argmax = greedy, or a draw = sampling), append it, and go again.

    prefill:  the whole prompt in one forward pass; the KV cache keeps its keys/values
    decode:   one token per forward pass, attending to the cache

The logits processors are small callables ``(input_ids, scores) -> scores`` with the names,
order and exact semantics of transformers 4.37 (``generation/logits_process.py``), so that
``generate`` here and ``transformers``' ``generate`` pick the same tokens on the same weights:
greedy token for token, and sampling draw for draw under the same seed.

Batches use *left* padding: every row's last prompt token sits in the last column, so the
new token of every row is appended in the same column and one forward pass serves all rows.
Position ids come from the attention mask (``cumsum - 1``), so padding does not shift RoPE.

Also here: :class:`TextStreamer` / :class:`TextIteratorStreamer` (print words as they come),
:func:`chat` (one answer with the Llama-2 chat template) and the ``generate`` / ``chat``
commands of ``python -m llama_edu``.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
import weakref
from queue import Queue
from typing import Any, Callable, TextIO

import torch
import torch.nn.functional as F

from .cache import Cache, DynamicCache, StaticCache
from .mlp import sliced_linear

# --------------------------------------------------------------------------------------------
# Logits processors: (input_ids (batch, cur_len), scores (batch, vocab)) -> scores (batch, vocab)
# --------------------------------------------------------------------------------------------


class LogitsProcessor:
    """Base class: reshape the next-token scores given the tokens so far."""

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        raise NotImplementedError


class LogitsProcessorList(list):
    """Apply processors in order (a list, so it prints and indexes like one)."""

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for processor in self:
            scores = processor(input_ids, scores)
        return scores


class RepetitionPenaltyLogitsProcessor(LogitsProcessor):
    """Make every token already in ``input_ids`` less likely (Keskar et al. 2019, CTRL eq. 1):
    a positive score is divided by ``penalty``, a negative one multiplied by it. The prompt
    counts (padding included, as in transformers). ``penalty > 1`` discourages repeats."""

    def __init__(self, penalty: float):
        if not isinstance(penalty, (int, float)) or not penalty > 0:
            raise ValueError(f"repetition_penalty must be a positive float (1.0 = off), got {penalty!r}")
        self.penalty = float(penalty)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        score = torch.gather(scores, 1, input_ids)  # (batch, cur_len): the score of each seen token
        score = torch.where(score < 0, score * self.penalty, score / self.penalty)
        return scores.scatter_(1, input_ids, score)


class MinNewTokensLengthLogitsProcessor(LogitsProcessor):
    """Forbid end-of-sequence until ``min_new_tokens`` tokens have been generated."""

    def __init__(self, prompt_length_to_skip: int, min_new_tokens: int, eos_token_id: int | list[int]):
        if not isinstance(min_new_tokens, int) or min_new_tokens < 0:
            raise ValueError(f"min_new_tokens must be a non-negative integer, got {min_new_tokens!r}")
        self.prompt_length_to_skip = prompt_length_to_skip
        self.min_new_tokens = min_new_tokens
        self.eos_token_id = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if input_ids.shape[-1] - self.prompt_length_to_skip < self.min_new_tokens:
            scores[:, self.eos_token_id] = -float("inf")
        return scores


class TemperatureLogitsWarper(LogitsProcessor):
    """softmax(z / T): T < 1 sharpens the distribution, T > 1 flattens it."""

    def __init__(self, temperature: float):
        if not isinstance(temperature, float) or not temperature > 0:
            hint = " For greedy decoding use do_sample=False." if temperature == 0 else ""
            raise ValueError(f"temperature must be a strictly positive float, got {temperature!r}.{hint}")
        self.temperature = temperature

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        return scores / self.temperature


class TopKLogitsWarper(LogitsProcessor):
    """Keep the ``top_k`` highest scores (ties with the k-th included), set the rest to
    ``filter_value`` (Fan et al. 2018)."""

    def __init__(self, top_k: int, filter_value: float = -float("inf"), min_tokens_to_keep: int = 1):
        if not isinstance(top_k, int) or top_k <= 0:
            raise ValueError(f"top_k must be a strictly positive integer (0 = off in generate), got {top_k!r}")
        self.top_k = max(top_k, min_tokens_to_keep)
        self.filter_value = filter_value

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        top_k = min(self.top_k, scores.size(-1))
        kth_best = torch.topk(scores, top_k)[0][..., -1, None]  # (batch, 1)
        return scores.masked_fill(scores < kth_best, self.filter_value)


class TopPLogitsWarper(LogitsProcessor):
    """Nucleus sampling (Holtzman et al. 2020): keep the smallest set of most likely tokens
    whose probabilities add up to at least ``top_p``; at least ``min_tokens_to_keep`` stay."""

    def __init__(self, top_p: float, filter_value: float = -float("inf"), min_tokens_to_keep: int = 1):
        top_p = float(top_p)
        if not 0.0 <= top_p <= 1.0:
            raise ValueError(f"top_p must be a float in [0, 1] (1.0 = off), got {top_p!r}")
        if not isinstance(min_tokens_to_keep, int) or min_tokens_to_keep < 1:
            raise ValueError(f"min_tokens_to_keep must be a positive integer, got {min_tokens_to_keep!r}")
        self.top_p = top_p
        self.filter_value = filter_value
        self.min_tokens_to_keep = min_tokens_to_keep

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        # Ascending sort: the tokens whose cumulative mass stays <= 1 - top_p are the unlikely tail.
        sorted_logits, sorted_indices = torch.sort(scores, descending=False)
        cumulative_probs = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        sorted_to_remove = cumulative_probs <= (1 - self.top_p)
        sorted_to_remove[..., -self.min_tokens_to_keep :] = False  # the most likely always stay
        to_remove = sorted_to_remove.scatter(1, sorted_indices, sorted_to_remove)
        return scores.masked_fill(to_remove, self.filter_value)


def build_logits_processors(
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = 50,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    min_new_tokens: int = 0,
    prompt_length: int = 0,
    eos_token_id: list[int] | None = None,
) -> LogitsProcessorList:
    """The processors ``generate`` applies, in transformers' order: the penalties first
    (repetition, then min-new-tokens), then, only when sampling, the warpers temperature,
    top-k, top-p. A setting at its neutral value adds nothing."""
    processors = LogitsProcessorList()
    if repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(repetition_penalty))
    if min_new_tokens and eos_token_id:
        processors.append(MinNewTokensLengthLogitsProcessor(prompt_length, min_new_tokens, eos_token_id))
    if do_sample:
        if temperature != 1.0:
            processors.append(TemperatureLogitsWarper(float(temperature)))
        if top_k:
            processors.append(TopKLogitsWarper(int(top_k)))
        if top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p))
    return processors


# --------------------------------------------------------------------------------------------
# generate
# --------------------------------------------------------------------------------------------


def context_limit(config) -> int:
    """The longest sequence the model is meant for: ``max_position_embeddings``, stretched by the
    RoPE scaling factor when the config has one."""
    limit = config.max_position_embeddings
    if getattr(config, "rope_scaling", None):
        limit = int(limit * float(config.rope_scaling["factor"]))
    return limit


def _as_input_ids(input_ids: Any, device: torch.device) -> torch.LongTensor:
    if not isinstance(input_ids, torch.Tensor):
        input_ids = torch.tensor(input_ids, dtype=torch.long)
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
    if input_ids.dim() != 2:
        raise ValueError(
            f"input_ids must be 2-D (batch, seq), got shape {tuple(input_ids.shape)}; "
            "for one prompt use ids[None] or tokenizer(text, return_tensors='pt').input_ids"
        )
    if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids must be integer token ids, got {input_ids.dtype}")
    if input_ids.shape[1] == 0:
        raise ValueError("input_ids is empty: give at least one prompt token (e.g. the BOS id)")
    return input_ids.to(device=device, dtype=torch.long)


def generate(
    model,
    input_ids: torch.LongTensor | None = None,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int | None = None,
    max_length: int | None = None,
    min_new_tokens: int = 0,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = 50,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    num_return_sequences: int = 1,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    streamer: Any = None,
    cache_implementation: str = "static",
    use_cache: bool = True,
    compile: bool = False,
) -> torch.LongTensor:
    """Continue ``input_ids`` (batch, prompt_len) and return prompt + new tokens
    (batch * num_return_sequences, total_len), as ``transformers``' ``generate`` does.

    - Length: ``max_new_tokens`` new tokens, or a total of ``max_length`` (prompt included);
      neither given means ``max_length=20`` (transformers' default, with a warning).
    - Greedy (``do_sample=False``) takes the argmax; sampling draws from the processed
      distribution (``temperature``, ``top_k`` (50 by default, 0 = off), ``top_p``). Draws use
      ``generator``, or a fresh one seeded with ``seed``, or else torch's global RNG.
    - Batches: left-padded prompts with their ``attention_mask`` (1 = token, 0 = padding). A
      row that emits an ``eos_token_id`` (default ``model.config.eos_token_id``) is finished and
      then padded with ``pad_token_id`` (default: the first eos id) while the others go on.
    - Cache: ``"static"`` preallocates keys/values for the whole length, ``"dynamic"`` grows
      them; ``use_cache=False`` recomputes the whole sequence every step (slow; for teaching).
    - ``streamer``: an object with ``put(token_ids)`` and ``end()`` (e.g. :class:`TextStreamer`)
      that receives the prompt, then each new token (batch size 1 only).
    - ``compile=True`` runs the decode step through ``torch.compile`` on fixed shapes (see
      :class:`FixedShapeCache`): faster once compiled (seconds, once per model/batch/length),
      but fused kernels round differently, so tokens may differ from eager in near-ties.
    """
    config = model.config
    device = model.device
    if input_ids is None:
        if config.bos_token_id is None:
            raise ValueError("no input_ids given and config.bos_token_id is None: pass a prompt")
        input_ids = torch.full((1, 1), config.bos_token_id, dtype=torch.long)
    input_ids = _as_input_ids(input_ids, device)
    batch_size, prompt_len = input_ids.shape

    # -- token ids ------------------------------------------------------------------------
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or hi >= config.vocab_size:
        bad = lo if lo < 0 else hi
        raise ValueError(
            f"input_ids contain {bad}, outside the model's vocabulary [0, {config.vocab_size}); "
            "was the prompt encoded with this model's tokenizer?"
        )
    if eos_token_id is None:
        eos_token_id = config.eos_token_id
    eos_ids = [] if eos_token_id is None else ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
    if pad_token_id is None:
        pad_token_id = config.pad_token_id
    if pad_token_id is None and eos_ids:
        warnings.warn(f"Setting `pad_token_id` to `eos_token_id`:{eos_ids[0]} for open-end generation.", stacklevel=2)
        pad_token_id = eos_ids[0]
    if pad_token_id is None:
        pad_token_id = 0  # only fills unused buffer cells: without eos no row finishes early

    # -- lengths ----------------------------------------------------------------------------
    if max_new_tokens is not None:
        if not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        max_length = prompt_len + max_new_tokens
    elif max_length is None:
        warnings.warn(
            "Neither max_new_tokens nor max_length was set: using max_length=20 (transformers' default). "
            "Pass max_new_tokens to control how much is generated.",
            stacklevel=2,
        )
        max_length = 20
    if max_length <= prompt_len:
        raise ValueError(
            f"the prompt has {prompt_len} tokens but max_length is {max_length} (it counts the prompt too), "
            "so nothing would be generated; use max_new_tokens=N or a larger max_length"
        )
    limit = context_limit(config)
    if max_length > limit:
        raise ValueError(
            f"prompt ({prompt_len} tokens) + new tokens ({max_length - prompt_len}) = {max_length} exceeds the "
            f"model's context of {limit} positions (config.max_position_embeddings); shorten the prompt or "
            "lower max_new_tokens"
        )

    # -- decoding strategy ------------------------------------------------------------------
    if not isinstance(num_return_sequences, int) or num_return_sequences < 1:
        raise ValueError(f"num_return_sequences must be a positive integer, got {num_return_sequences!r}")
    if num_return_sequences > 1 and not do_sample:
        raise ValueError("greedy decoding gives one answer per prompt: use do_sample=True with num_return_sequences > 1")
    if not isinstance(top_p, (int, float)) or not 0.0 <= top_p <= 1.0:
        raise ValueError(f"top_p must be a float in [0, 1] (1.0 = off), got {top_p!r}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 0):
        raise ValueError(f"top_k must be a non-negative integer (0 = off), got {top_k!r}")
    if not do_sample and (temperature != 1.0 or top_p != 1.0 or top_k not in (50, None)):
        warnings.warn(
            "do_sample=False (greedy) ignores temperature, top_k and top_p; pass do_sample=True to sample",
            stacklevel=2,
        )
    if seed is not None and generator is not None:
        raise ValueError("pass either seed or generator, not both")
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(int(seed))
    processors = build_logits_processors(
        do_sample, temperature, top_k, top_p, repetition_penalty, min_new_tokens, prompt_len, eos_ids
    )
    if cache_implementation not in ("static", "dynamic"):
        raise ValueError(f"cache_implementation must be 'static' or 'dynamic', got {cache_implementation!r}")
    if compile and not use_cache:
        raise ValueError("compile=True compiles the cached decode step: it needs use_cache=True")
    if compile and (getattr(config, "rope_scaling", None) or {}).get("type") == "dynamic":
        raise ValueError("compile=True does not support dynamic NTK RoPE scaling (its angles depend on the length); use compile=False")
    if streamer is not None and batch_size * num_return_sequences != 1:
        raise ValueError("streaming works for one sequence at a time; use batch size 1 and num_return_sequences=1")

    # -- attention mask: as transformers, guess one from pad ids when none is given -----------
    if attention_mask is None:
        if pad_token_id in input_ids and pad_token_id not in eos_ids:
            attention_mask = input_ids.ne(pad_token_id).long()
        else:
            attention_mask = torch.ones_like(input_ids)
    elif tuple(attention_mask.shape) != (batch_size, prompt_len):
        raise ValueError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(attention_mask.shape)}")
    attention_mask = attention_mask.to(device=device, dtype=torch.long)
    if batch_size > 1 and bool((attention_mask[:, -1] == 0).any()):
        warnings.warn(
            "right padding detected: a decoder-only model must be left-padded for generation "
            "(tokenizer.padding_side = 'left'), else new tokens follow padding",
            stacklevel=2,
        )
    if num_return_sequences > 1:
        input_ids = input_ids.repeat_interleave(num_return_sequences, dim=0)
        attention_mask = attention_mask.repeat_interleave(num_return_sequences, dim=0)
        batch_size *= num_return_sequences

    with torch.inference_mode():
        sequences = _decode_loop(
            model, input_ids, attention_mask, max_length, do_sample, processors, eos_ids, pad_token_id,
            generator, streamer, cache_implementation, use_cache, compile,
        )
    return sequences.clone()  # a normal tensor (not an inference tensor) the caller may edit


def _decode_loop(
    model,
    input_ids: torch.LongTensor,
    attention_mask: torch.LongTensor,
    max_length: int,
    do_sample: bool,
    processors: LogitsProcessorList,
    eos_ids: list[int],
    pad_token_id: int,
    generator: torch.Generator | None,
    streamer: Any,
    cache_implementation: str,
    use_cache: bool,
    compile: bool = False,
) -> torch.LongTensor:
    """Prefill, then one token per step until every row has finished or max_length is reached.

    Everything the loop indexes is built once up front: the output buffer, the full-length
    attention mask and the position ids of every future step, so a step does no allocation
    beyond the model's own work and one host sync (the "all rows finished?" check).
    """
    device = input_ids.device
    batch_size, prompt_len = input_ids.shape

    # (batch, max_length) buffers; positions past the prompt are real tokens (mask 1).
    sequences = torch.full((batch_size, max_length), pad_token_id, dtype=torch.long, device=device)
    sequences[:, :prompt_len] = input_ids
    full_mask = torch.ones((batch_size, max_length), dtype=torch.long, device=device)
    full_mask[:, :prompt_len] = attention_mask
    has_padding = not bool(attention_mask.all())
    # Position of each token = number of real tokens before it; padding gets a dummy 1 (as HF).
    position_ids = (full_mask.cumsum(-1) - 1).masked_fill_(full_mask == 0, 1)

    eos_tensor = torch.tensor(eos_ids, dtype=torch.long, device=device) if eos_ids else None
    unfinished = torch.ones(batch_size, dtype=torch.bool, device=device)
    if streamer is not None:
        streamer.put(input_ids.cpu())

    if compile:
        cache, step = _compiled_decoder(model, batch_size, max_length, device)
        slots = torch.arange(max_length, device=device)

        def forward(start: int, end: int) -> torch.Tensor:
            fn = step if end - start == 1 else _fixed_shape_step  # prefill eagerly: one compile per length otherwise
            return fn(model, cache, sequences[:, start:end], position_ids[:, start:end], slots[start:end], full_mask)

    else:
        if not use_cache:
            cache = None
        elif cache_implementation == "static":
            cache = StaticCache(model.config, batch_size, max_length, device=device, dtype=model.dtype)
        else:
            cache = DynamicCache()

        def forward(start: int, end: int) -> torch.Tensor:
            """Logits (batch, vocab) for the token after ``sequences[:, :end]``, feeding tokens
            start..end (the cache holds the rest)."""
            out = model(
                input_ids=sequences[:, start:end],
                attention_mask=full_mask[:, :end] if has_padding else None,
                position_ids=position_ids[:, start:end] if has_padding else None,
                past_key_values=cache,
                use_cache=use_cache,
                logits_to_keep=1,
            )
            return out.logits[:, -1, :]

    logits = forward(0, prompt_len)  # prefill
    cur_len = prompt_len
    while True:
        scores = processors(sequences[:, :cur_len], logits)
        if do_sample:
            probs = F.softmax(scores, dim=-1)
            next_tokens = torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)
        else:
            next_tokens = torch.argmax(scores, dim=-1)
        if eos_tensor is not None:
            next_tokens = torch.where(unfinished, next_tokens, pad_token_id)  # finished rows get padding
        sequences[:, cur_len] = next_tokens
        cur_len += 1
        if streamer is not None:
            streamer.put(next_tokens.cpu())
        if eos_tensor is not None:
            unfinished &= ~torch.isin(next_tokens, eos_tensor)
            if not bool(unfinished.any()):  # the one host sync per step
                break
        if cur_len >= max_length:
            break
        logits = forward(cur_len - 1 if use_cache else 0, cur_len)
    if streamer is not None:
        streamer.end()
    return sequences[:, :cur_len]


# --------------------------------------------------------------------------------------------
# Optional: a compiled decode step (generate(..., compile=True))
# --------------------------------------------------------------------------------------------


class FixedShapeCache(Cache):
    """A KV cache whose tensors never change shape, for ``torch.compile``.

    Every layer owns (batch, kv_heads, max_length, head_dim) buffers. ``update`` writes the new
    keys/values at the slots ``cache_position`` (a tensor, set before each forward) and returns
    the *whole* buffers; the attention mask hides the slots not written yet. Shapes, and so the
    compiled code, are the same at every decode step, and no Python number changes between steps.
    """

    def __init__(self, config, batch_size: int, max_length: int, device: torch.device, dtype: torch.dtype):
        shape = (batch_size, config.num_key_value_heads, max_length, config.head_dim)
        self.key_cache = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.value_cache = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.max_length = max_length
        self.cache_position = torch.zeros(1, dtype=torch.long, device=device)

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.key_cache[layer_idx].index_copy_(2, self.cache_position, key)
        self.value_cache[layer_idx].index_copy_(2, self.cache_position, value)
        return self.key_cache[layer_idx], self.value_cache[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.max_length

    def get_max_length(self) -> int | None:
        return self.max_length


def _fixed_shape_step(
    model,
    cache: FixedShapeCache,
    input_ids: torch.LongTensor,
    position_ids: torch.LongTensor,
    cache_position: torch.LongTensor,
    full_mask: torch.LongTensor,
) -> torch.Tensor:
    """Next-token logits (batch, vocab) for ``input_ids`` (batch, q) written at the cache slots
    ``cache_position`` (q,), attending over all ``max_length`` slots; ``full_mask`` (batch,
    max_length) is 1 for real tokens. The model's own layers, called directly: LlamaModel.forward's
    input checks would be host syncs, which a compiled graph cannot contain."""
    base = model.get_base_model()
    cache.cache_position = cache_position
    hidden = base.embed_tokens(input_ids)  # (batch, q, hidden)
    # Query at slot s may see slots <= s that hold real tokens.
    slots = torch.arange(cache.max_length, device=input_ids.device)
    allowed = (slots[None, :] <= cache_position[:, None])[None, None] & full_mask[:, None, None, :].bool()
    mask = torch.zeros(allowed.shape, dtype=hidden.dtype, device=hidden.device)
    mask = mask.masked_fill(~allowed, torch.finfo(hidden.dtype).min)  # (batch, 1, q, max_length)
    mask = mask.masked_fill(~allowed.any(-1, keepdim=True), 0.0)  # padding queries: no all-masked rows (NaN)
    cos, sin = base.rotary_emb(position_ids, cache.max_length, hidden.dtype)
    for layer in base.layers:
        hidden, _ = layer(hidden, cos, sin, mask, cache)
    hidden = base.norm(hidden[:, -1:])
    return sliced_linear(hidden, model.lm_head, model.config.pretraining_tp)[:, -1].float()


_COMPILED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_COMPILE_OPTIONS: dict = {}  # extra torch.compile options (inductor config), for experiments


def _compiled_decoder(model, batch_size: int, max_length: int, device: torch.device):
    """The (cache, compiled step) for this model and shape, built once and reused: compiling
    takes seconds, and stale cache slots are harmless (the mask hides unwritten slots)."""
    per_model = _COMPILED.setdefault(model, {})
    key = (batch_size, max_length, model.dtype, str(device))
    if key not in per_model:
        cache = FixedShapeCache(model.config, batch_size, max_length, device, model.dtype)
        # On CPU the generated C++ wrapper saves the Python glue around each kernel (~30% of a
        # tiny model's step); fullgraph=True: a graph break would bring the overhead back.
        options = {"cpp_wrapper": True} if device.type == "cpu" else {}
        step = torch.compile(_fixed_shape_step, dynamic=False, fullgraph=True, options={**options, **_COMPILE_OPTIONS})
        per_model[key] = (cache, step)
    return per_model[key]


# --------------------------------------------------------------------------------------------
# Streaming
# --------------------------------------------------------------------------------------------


class TextStreamer:
    """Print generated text word by word as ``generate`` produces tokens.

    Tokens are decoded together (a token alone may not decode to its text: SentencePiece
    drops a word's leading space at the start of a string, and an emoji can be spread over
    several byte tokens), and only the new *stable* part is printed: up to the last space, or
    everything at a newline. Text ending in U+FFFD (an incomplete multi-byte character) waits
    for the bytes that complete it. ``skip_prompt=True`` does not echo the prompt;
    ``decode_kwargs`` go to ``tokenizer.decode`` (e.g. ``skip_special_tokens=True``).
    """

    def __init__(self, tokenizer, skip_prompt: bool = False, **decode_kwargs: Any):
        self.tokenizer = tokenizer
        self.skip_prompt = skip_prompt
        self.decode_kwargs = decode_kwargs
        self.token_cache: list[int] = []
        self.print_len = 0
        self.next_tokens_are_prompt = True

    def put(self, value: torch.Tensor | list[int]) -> None:
        """Receive token ids: the prompt (1, prompt_len) first, then one token per step."""
        if isinstance(value, torch.Tensor):
            if value.dim() > 1 and value.shape[0] > 1:
                raise ValueError("TextStreamer only supports batch size 1")
            value = value.reshape(-1).tolist()
        if self.skip_prompt and self.next_tokens_are_prompt:
            self.next_tokens_are_prompt = False
            return
        self.next_tokens_are_prompt = False
        self.token_cache.extend(int(v) for v in value)
        text = self.tokenizer.decode(self.token_cache, **self.decode_kwargs)
        if text.endswith("\n"):
            printable = text[self.print_len :]  # a line is complete: flush and start afresh
            self.token_cache, self.print_len = [], 0
        elif text.endswith("\ufffd"):
            printable = ""  # the bytes of a multi-byte character are still arriving
        else:
            printable = text[self.print_len : text.rfind(" ") + 1]  # whole words only
            self.print_len += len(printable)
        if printable:
            self.on_finalized_text(printable)

    def end(self) -> None:
        """Flush what is left and finish the line."""
        printable = ""
        if self.token_cache:
            text = self.tokenizer.decode(self.token_cache, **self.decode_kwargs)
            printable = text[self.print_len :]
        self.token_cache, self.print_len = [], 0
        self.next_tokens_are_prompt = True
        self.on_finalized_text(printable, stream_end=True)

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        """Where finished text goes: stdout here; subclasses send it elsewhere."""
        print(text, flush=True, end="" if not stream_end else "\n")


class TextIteratorStreamer(TextStreamer):
    """A streamer you iterate over: run ``generate`` in a thread and read text pieces as they
    come (for notebooks and user interfaces). ``timeout`` (seconds) bounds each wait."""

    def __init__(self, tokenizer, skip_prompt: bool = False, timeout: float | None = None, **decode_kwargs: Any):
        super().__init__(tokenizer, skip_prompt, **decode_kwargs)
        self.text_queue: Queue = Queue()
        self.stop_signal = None
        self.timeout = timeout

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self.text_queue.put(text, timeout=self.timeout)
        if stream_end:
            self.text_queue.put(self.stop_signal, timeout=self.timeout)

    def __iter__(self) -> "TextIteratorStreamer":
        return self

    def __next__(self) -> str:
        value = self.text_queue.get(timeout=self.timeout)
        if value is self.stop_signal:
            raise StopIteration
        return value


class _CallbackStreamer(TextStreamer):
    """A TextStreamer that hands each text piece to ``callback`` (used by the chat loop)."""

    def __init__(self, tokenizer, callback: Callable[[str], None], **kw: Any):
        super().__init__(tokenizer, **kw)
        self.callback = callback

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self.callback(text)


# --------------------------------------------------------------------------------------------
# Chat
# --------------------------------------------------------------------------------------------


def chat(model, tokenizer, messages: list[dict[str, str]], streamer: Any = None, **gen_kwargs: Any) -> str:
    """The assistant's answer to ``messages`` ([{"role": "system"|"user"|"assistant",
    "content": ...}, ...], ending with a user turn).

    The conversation is rendered with the tokenizer's chat template (Llama 2:
    ``<s>[INST] <<SYS>>...<</SYS>> user [/INST] answer </s><s>[INST] ...``), generation
    stops at ``</s>``, and the new tokens are decoded without special tokens.
    ``gen_kwargs`` go to :func:`generate` (default ``max_new_tokens=256``, greedy).
    """
    if not messages or messages[-1].get("role") != "user":
        raise ValueError("messages must end with a user turn: [..., {'role': 'user', 'content': '...'}]")
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    if isinstance(ids, torch.Tensor):
        ids = ids.reshape(-1).tolist()
    prompt = torch.tensor([ids], dtype=torch.long, device=model.device)
    gen_kwargs.setdefault("max_new_tokens", 256)
    gen_kwargs.setdefault("eos_token_id", tokenizer.eos_token_id)
    gen_kwargs.setdefault("pad_token_id", tokenizer.eos_token_id)
    if streamer is not None and hasattr(streamer, "skip_prompt"):
        streamer.skip_prompt = True
    room = context_limit(model.config) - prompt.shape[1]
    if room <= 0:
        raise ValueError(
            f"the conversation is {prompt.shape[1]} tokens, the model's context is {context_limit(model.config)}: "
            "start a new conversation (/reset) or shorten it"
        )
    gen_kwargs["max_new_tokens"] = min(gen_kwargs["max_new_tokens"], room)
    out = generate(model, prompt, streamer=streamer, **gen_kwargs)
    new_tokens = out[0, prompt.shape[1] :].tolist()
    eos = gen_kwargs["eos_token_id"]
    eos = set([eos] if isinstance(eos, int) else eos or [])
    for i, token in enumerate(new_tokens):  # the answer ends before the first end-of-sequence token
        if token in eos:
            new_tokens = new_tokens[:i]
            break
    return tokenizer.decode(new_tokens, skip_special_tokens=True).strip()


def chat_loop(
    model,
    tokenizer,
    system: str | None = None,
    input_stream: TextIO | None = None,
    output_stream: TextIO | None = None,
    **gen_kwargs: Any,
) -> list[dict[str, str]]:
    """A multi-turn conversation on a terminal: read a user line, stream the answer, keep the
    history. ``/reset`` forgets the history, ``/exit`` or end of input (Ctrl-D) ends.
    Returns the final history."""
    input_stream = input_stream or sys.stdin
    output_stream = output_stream or sys.stdout
    interactive = hasattr(input_stream, "isatty") and input_stream.isatty()
    start = [{"role": "system", "content": system}] if system else []
    history = list(start)

    def write(text: str) -> None:
        output_stream.write(text)
        output_stream.flush()

    while True:
        if interactive:
            write("you> ")
        line = input_stream.readline()
        if not line:  # EOF
            if interactive:
                write("\n")
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            history = list(start)
            write("(history cleared)\n")
            continue
        history.append({"role": "user", "content": text})
        write("assistant> ")
        streamer = _CallbackStreamer(tokenizer, write, skip_prompt=True, skip_special_tokens=True)
        answer = chat(model, tokenizer, history, streamer=streamer, **gen_kwargs)
        write("\n")
        history.append({"role": "assistant", "content": answer})
    return history


# --------------------------------------------------------------------------------------------
# Command line: python -m llama_edu generate | chat
# --------------------------------------------------------------------------------------------

def _resolve_device(name: str | None) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use cpu, cuda, cuda:0 or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name} asked for CUDA but no CUDA GPU is available; use --device cpu")
    return device


def load_model_and_tokenizer(path: str | os.PathLike | None = None, device: str | None = None, dtype: str | None = None):
    """Load ``LlamaForCausalLM`` and its tokenizer from a Hugging Face-layout folder (or hub
    repo id) on ``device`` (default: cuda when available) in ``dtype`` (default: as stored).
    ``path=None`` is the project's default model, ``data/shakespeare-llama``."""
    from .checkpoint import looks_like_repo_id
    from .data import DEFAULT_MODEL_DIR
    from .model import LlamaForCausalLM
    from .tokenizer import LlamaTokenizer

    if path is None:
        path = DEFAULT_MODEL_DIR
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"the default model data/{path.name} does not exist yet: train it with `python -m llama_edu train` "
                "or pass --model PATH (a folder with config.json, model.safetensors and tokenizer.model)"
            )
    name = os.fspath(path)
    if not os.path.isdir(name) and (os.path.exists(name) or not looks_like_repo_id(name)):
        raise FileNotFoundError(
            f"model folder {name} does not exist: pass --model with a Hugging Face-layout folder "
            "(config.json, model.safetensors, tokenizer.model) or a hub repo id"
        )
    model = LlamaForCausalLM.from_pretrained(
        name, torch_dtype=dtype or "auto", device=_resolve_device(device), progress=False
    )
    tokenizer = LlamaTokenizer.from_pretrained(name)
    return model.eval(), tokenizer


def _sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """--greedy / --temperature 0 mean greedy; otherwise seeded sampling."""
    if args.greedy or args.temperature == 0:
        return dict(do_sample=False)
    if args.temperature < 0:
        raise ValueError(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.top_k < 0:
        raise ValueError(f"--top-k must be >= 0 (0 = off), got {args.top_k}")
    return dict(do_sample=True, temperature=float(args.temperature), top_k=args.top_k, top_p=args.top_p, seed=args.seed)


def _cmd_generate(args: argparse.Namespace) -> int:
    if args.max_new_tokens <= 0:
        raise ValueError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    model, tokenizer = load_model_and_tokenizer(args.model, args.device, args.dtype)
    ids = tokenizer.encode(args.prompt)
    room = context_limit(model.config) - len(ids)
    if room <= 0:
        raise ValueError(f"the prompt is {len(ids)} tokens, the model's context is {context_limit(model.config)}: shorten it")
    streamer = TextStreamer(tokenizer, skip_special_tokens=True)
    generate(
        model, torch.tensor([ids]), max_new_tokens=min(args.max_new_tokens, room),
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id, streamer=streamer,
        **_sampling_kwargs(args),
    )
    return 0


def _cmd_chat(args: argparse.Namespace) -> int:
    if args.max_new_tokens <= 0:
        raise ValueError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    model, tokenizer = load_model_and_tokenizer(args.model, args.device, args.dtype)
    chat_loop(model, tokenizer, system=args.system, max_new_tokens=args.max_new_tokens, **_sampling_kwargs(args))
    return 0


def _add_common(p: argparse.ArgumentParser, temperature: float) -> None:
    p.add_argument("--model", default=None, help="model folder (HF layout) or hub repo id; default: data/shakespeare-llama")
    p.add_argument("--max-new-tokens", type=int, default=200, help="how many tokens to generate at most (default 200)")
    p.add_argument("--temperature", type=float, default=temperature, help=f"sampling temperature, 0 = greedy (default {temperature})")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens, 0 = off (default 0)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (default 0.95)")
    p.add_argument("--seed", type=int, default=0, help="random seed, so runs repeat (default 0)")
    p.add_argument("--greedy", action="store_true", help="greedy decoding (same as --temperature 0)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: as stored)")


def add_cli_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``generate`` and ``chat`` with ``python -m llama_edu``."""
    p = subparsers.add_parser("generate", help="stream a continuation of a prompt",
                              description="Continue a prompt with a Llama model, streaming the text.")
    p.add_argument("--prompt", required=True, help="the text to continue")
    _add_common(p, temperature=0.8)
    p.set_defaults(func=_cmd_generate)

    p = subparsers.add_parser("chat", help="multi-turn chat with a chat model",
                              description="Chat on the terminal (Llama 2 chat template). /reset clears the history; Ctrl-D ends.")
    p.add_argument("--system", default=None, help="a system prompt")
    _add_common(p, temperature=0.8)
    p.set_defaults(func=_cmd_chat)


__all__ = [
    "LogitsProcessor", "LogitsProcessorList", "RepetitionPenaltyLogitsProcessor", "MinNewTokensLengthLogitsProcessor",
    "TemperatureLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper", "build_logits_processors", "context_limit",
    "generate", "FixedShapeCache", "TextStreamer", "TextIteratorStreamer", "chat", "chat_loop", "load_model_and_tokenizer",
    "add_cli_commands",
]
