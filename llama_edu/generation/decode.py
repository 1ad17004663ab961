"""Generation: the decode loop, in gpt-fast's shape.

    prefill:           the whole prompt in one forward pass; the KV cache keeps its keys/values
    decode_one_token:  one forward pass for the newest token, attending to the cache
    decode_n_tokens:   pick a token from the logits, append it, decode it, until done

Every forward pass is the model's own decode step,
:meth:`llama_edu.LlamaForCausalLM.next_token_logits` (the core's one forward plus the LM head),
called with positions: ``position_ids`` for RoPE, ``cache_position`` for the cache slots. ``generate`` checks its inputs once at the entry; the loop itself checks nothing.

Batches use *left* padding: every row's last prompt token sits in the same column, so one forward
pass serves all rows. Position ids come from the attention mask (``cumsum - 1``), so padding does
not shift RoPE. With ``compile=True``, :func:`decode_one_token` is compiled once: the
preallocated :class:`~llama_edu.cache.StaticCache` keeps every shape fixed from step to step
(on a CPU but one, the number of slots attention reads, which the compiled step takes as a symbol).
"""

from __future__ import annotations

import functools
import os
import platform
import subprocess
import sys
import sysconfig
import tempfile
import types
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from ..cache import Cache, DynamicCache, StaticCache
from .sampling import LogitsProcessorList, build_logits_processors, next_tokens

def context_limit(config) -> int:
    """The longest sequence the model is meant for: ``max_position_embeddings``, stretched by the
    RoPE scaling factor when the config has one."""
    limit = config.max_position_embeddings
    if getattr(config, "rope_scaling", None):
        limit = int(limit * float(config.rope_scaling["factor"]))
    return limit


def check_input_ids(input_ids: torch.Tensor, vocab_size: int, allow_empty: bool = True) -> None:
    """The one check of token ids, where they enter (``generate``, the models' ``forward``):
    2-D (batch, seq), integers, inside the vocabulary. Reading the values is a host sync, so it
    happens once per call, never per decoded token."""
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a tensor of token ids, got {type(input_ids).__name__}")
    if input_ids.dim() != 2:
        raise ValueError(
            f"input_ids must be 2-D (batch, seq), got shape {tuple(input_ids.shape)}; "
            "for one prompt use ids[None] or tokenizer(text, return_tensors='pt').input_ids"
        )
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids must be integer token ids, got {input_ids.dtype}")
    if input_ids.shape[1] == 0 and not allow_empty:
        raise ValueError("input_ids is empty: give at least one prompt token (e.g. the BOS id)")
    if input_ids.numel():
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= vocab_size:
            raise ValueError(
                f"input_ids contain {lo if lo < 0 else hi}, outside the vocabulary [0, {vocab_size}); "
                "was the text encoded with this model's tokenizer? (after adding tokens to a tokenizer, "
                "call model.resize_token_embeddings(len(tokenizer)))"
            )


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
    - ``compile=True`` compiles :func:`decode_one_token` (the model's one forward on the
      preallocated cache) with ``torch.compile``; on CUDA it runs as a
      CUDA graph. Faster once compiled (seconds, once per model/batch/length), but fused kernels
      round differently, so tokens may differ from eager in near-ties.
    """
    if not callable(getattr(model, "next_token_logits", None)):  # no LM head: nothing to pick tokens from
        raise TypeError(
            f"The current model class ({type(model).__name__}) is not compatible with `.generate()`, as it doesn't "
            "have a language model head. Please use LlamaForCausalLM instead: LlamaForCausalLM.from_pretrained(path) "
            "loads the same decoder weights plus the LM head"
        )
    config = model.config
    device = model.device
    if input_ids is None:
        if config.bos_token_id is None:
            raise ValueError("no input_ids given and config.bos_token_id is None: pass a prompt")
        input_ids = torch.full((1, 1), config.bos_token_id, dtype=torch.long)
    if not isinstance(input_ids, torch.Tensor):  # a list of ids, or a list of such lists
        input_ids = torch.tensor(input_ids, dtype=torch.long)
        input_ids = input_ids[None] if input_ids.dim() == 1 else input_ids
    check_input_ids(input_ids, config.vocab_size, allow_empty=False)
    input_ids = input_ids.to(device=device, dtype=torch.long)
    batch_size, prompt_len = input_ids.shape

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
    if not isinstance(pad_token_id, int) or not 0 <= pad_token_id < config.vocab_size:
        raise ValueError(
            f"pad_token_id={pad_token_id!r} is not a token of the model's vocabulary [0, {config.vocab_size}): finished "
            "rows are filled with it and fed back to the model; pass pad_token_id=tokenizer.eos_token_id (or another id)"
        )

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
    if use_cache and cache_implementation == "static":
        _check_cache_fits(config, batch_size * num_return_sequences, max_length, model.dtype, device)

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
        state = DecodeState.start(model, input_ids, attention_mask, max_length, cache_implementation, use_cache, compile)
        if streamer is not None:
            streamer.put(input_ids.cpu())
        logits = prefill(model, state)
        decode_n_tokens(model, state, logits, processors, do_sample, generator, eos_ids, pad_token_id, streamer)
        if streamer is not None:
            streamer.end()
    return state.sequences[:, : state.length].clone()  # a normal tensor (not an inference tensor)


def _check_cache_fits(config, batch_size: int, max_length: int, dtype: torch.dtype, device: torch.device) -> None:
    """Refuse to preallocate a KV cache larger than the memory the device has free (a config with
    an enormous context and a large max_new_tokens would otherwise ask for terabytes)."""
    need = 2 * config.num_hidden_layers * batch_size * config.num_key_value_heads * max_length * config.head_dim
    need *= torch.empty((), dtype=dtype).element_size()
    free = _free_memory(device)
    if free is not None and need > free:
        raise ValueError(
            f"the preallocated KV cache for batch {batch_size} x {max_length} positions needs {need / 2**30:.1f} GiB but "
            f"{device} has {free / 2**30:.1f} GiB free: lower max_new_tokens (or the batch), or pass "
            "cache_implementation='dynamic', which grows with the text instead"
        )


def _free_memory(device: torch.device) -> int | None:
    """Bytes free on ``device`` (MemAvailable on a Linux CPU), or None when unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return None


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


@dataclass
class DecodeState:
    """What the loop reads and writes, allocated once: the output buffer, the padding mask and
    the positions of every step to come, the cache, and the decode step to call."""

    sequences: torch.LongTensor  # (batch, max_length): prompt, then new tokens
    length: int  # tokens in ``sequences`` so far
    position_ids: torch.LongTensor  # (batch, max_length): each token's position for RoPE
    slots: torch.LongTensor  # (max_length,): cache slot of each token, 0 .. max_length - 1
    padding_mask: torch.LongTensor | None  # (batch, max_length), 1 = token; None: no padding
    cache: Cache | None
    step: Any  # decode_one_token's forward, compiled or not

    @classmethod
    def start(cls, model, input_ids, attention_mask, max_length, cache_implementation, use_cache, compile):
        batch_size, prompt_len = input_ids.shape
        device = input_ids.device
        sequences = torch.zeros((batch_size, max_length), dtype=torch.long, device=device)
        sequences[:, :prompt_len] = input_ids
        full_mask = torch.ones((batch_size, max_length), dtype=torch.long, device=device)
        full_mask[:, :prompt_len] = attention_mask
        # Position of each token = number of real tokens before it; padding gets a dummy 1 (as HF).
        position_ids = (full_mask.cumsum(-1) - 1).masked_fill_(full_mask == 0, 1)
        padding_mask = None if bool(attention_mask.all()) else full_mask
        step = forward_step
        if not use_cache:
            cache = None
        elif compile:
            cache, step = _compiled_step(model, batch_size, max_length, device)
        elif cache_implementation == "static":
            # Eager on a CPU, attention reads only the slots written so far (see StaticCache's trim)
            cache = StaticCache(model.config, batch_size, max_length, device=device, dtype=model.dtype,
                                trim=device.type == "cpu")
        else:
            cache = DynamicCache()
        if not compile:
            # The column-major LM head (see LlamaForCausalLM.logits), looked up once, not per token.
            head_t = model.column_major_head(batch_size, device)
            step = step if head_t is None else functools.partial(forward_step, head_t=head_t)
        if padding_mask is not None and isinstance(cache, StaticCache) and cache.max_cache_len > max_length:
            # compile=True's cache is rounded up (CACHE_BUCKET): the slots past the text are keys too
            padding_mask = torch.nn.functional.pad(padding_mask, (0, cache.max_cache_len - max_length), value=1)
        slots = torch.arange(max_length, device=device)
        return cls(sequences, prompt_len, position_ids, slots, padding_mask, cache, step)

    def inputs(self, start: int, end: int) -> tuple:
        """Tokens start..end with their positions, slots and the padding mask the cache needs."""
        mask = self.padding_mask
        if mask is not None and not isinstance(self.cache, StaticCache):
            mask = mask[:, :end]  # a growing cache (or none) sees the tokens up to ``end``
        return self.sequences[:, start:end], self.position_ids[:, start:end], self.slots[start:end], mask


def forward_step(model, cache, input_ids, position_ids, cache_position, padding_mask, head_t=None) -> torch.Tensor:
    """Next-token logits (batch, vocab) after ``input_ids`` (batch, q), from the model's own
    decode step (:meth:`llama_edu.LlamaForCausalLM.next_token_logits`). No input checks:
    ``generate`` did them once. ``head_t``: the column-major copy of the LM head, which the
    compiled step receives as an argument (it cannot look it up inside the graph)."""
    return model.next_token_logits(input_ids, position_ids, cache_position, padding_mask, cache, head_t=head_t)


def prefill(model, state: DecodeState) -> torch.Tensor:
    """Run the prompt through the model (filling the cache); logits (batch, vocab) for the next token.
    Always eager: compiling for every prompt length would cost more than it saves."""
    return forward_step(model, state.cache, *state.inputs(0, state.length))


def decode_one_token(model, state: DecodeState) -> torch.Tensor:
    """Logits (batch, vocab) after the newest token, which is the only one fed when there is
    a cache (without one, the whole sequence is recomputed: slow, for teaching)."""
    start = state.length - 1 if state.cache is not None else 0
    return state.step(model, state.cache, *state.inputs(start, state.length))


def decode_n_tokens(
    model,
    state: DecodeState,
    logits: torch.Tensor,
    processors: LogitsProcessorList,
    do_sample: bool,
    generator: torch.Generator | None,
    eos_ids: list[int],
    pad_token_id: int,
    streamer: Any = None,
) -> None:
    """Pick, append, decode, until every row has emitted an eos id or the buffer is full.
    A finished row gets ``pad_token_id`` while the others go on."""
    max_length = state.sequences.shape[1]
    # Several rows keep a mask of those still going; one row stops at its own eos, and its
    # token is the only thing to read (four tensor operations a token fewer).
    rows = bool(eos_ids) and logits.shape[0] > 1
    eos = torch.tensor(eos_ids, dtype=torch.long, device=logits.device) if rows else None
    unfinished = torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device) if rows else None
    while True:
        scores = processors(state.sequences[:, : state.length], logits) if processors else logits
        tokens = next_tokens(scores, do_sample, generator)
        if rows:
            tokens = torch.where(unfinished, tokens, pad_token_id)
        state.sequences[:, state.length] = tokens
        state.length += 1
        if streamer is not None:
            streamer.put(tokens.cpu())
        if rows:
            unfinished &= torch.isin(tokens, eos, invert=True)
            if not bool(unfinished.any()):  # the one host sync per token
                break
        elif eos_ids and int(tokens) in eos_ids:  # one row: the one host sync per token
            break
        if state.length >= max_length:
            break
        logits = decode_one_token(model, state)


# --------------------------------------------------------------------------------------------
# compile=True
# --------------------------------------------------------------------------------------------

#: A CPU model with at most this many bytes of weights is compiled with its weights frozen into
#: the compiled code (see :func:`_compiled_step`); a larger one would need twice its memory.
FREEZE_MAX_BYTES = 2 * 2**30
#: The static cache of compile=True grows in steps of this many slots: generating 100 tokens
#: and then 120 reuses one compiled step (the slots past the text are never read on a CPU, and
#: hidden by the causal mask on CUDA).
CACHE_BUCKET = 256


def _frozen_cpu_options(model) -> dict:
    """What inductor is told when it compiles a frozen CPU step (see :func:`_compiled_step`). Its
    C++ GEMM template is the fast kernel for plain float ``nn.Linear`` layers; for packed int8 and
    int4 layers it is not always faster (or not available), so autotuning also times ATen's
    kernel there and keeps the faster of the two (which makes compiling slower)."""
    float_only = all(type(m) is torch.nn.Linear for m in model.modules() if hasattr(m, "in_features"))
    return {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP" if float_only else "CPP,ATEN",
            "autotune_num_choices_displayed": 0, "max_autotune_report_choices_stats": False}


class _DecodeStep(torch.nn.Module):
    """:func:`forward_step` with the model as a submodule (compiled on CUDA). Compiled as a
    module, the model's weights are the graph's parameters; compiled as a function taking the
    model as an argument, they would be ordinary inputs."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, cache, input_ids, position_ids, cache_position, padding_mask, head_t=None):
        return forward_step(self.model, cache, input_ids, position_ids, cache_position, padding_mask, head_t)


class _CpuDecodeStep(torch.nn.Module):
    """:func:`forward_step` on a CPU, over the cache's buffers given as tensors (what
    ``torch.export`` traces: tensors, not a Cache object). ``written`` holds the slots 0 ..
    newest; attention reads only those, as eager decoding's trimmed cache does, and their count
    is ``written``'s length, a symbol of the compiled step: one step serves every length."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, key_cache, value_cache, length, written, input_ids, position_ids, cache_position,
                padding_mask=None, head_t=None):
        cache = _WrittenSlots(key_cache, value_cache, length, written)
        return forward_step(self.model, cache, input_ids, position_ids, cache_position, padding_mask, head_t)


class _WrittenSlots(StaticCache):
    """A trimmed :class:`~llama_edu.cache.StaticCache` over given buffers, inside the compiled
    CPU step. Attention reads ``written``'s length of slots: a shape, which compiled code can
    have, where the eager cache reads the newest position as a number (``keys_length``)."""

    def __init__(self, key_cache, value_cache, length: torch.Tensor, written: torch.Tensor) -> None:
        self.key_cache, self.value_cache, self.length = list(key_cache), list(value_cache), length
        self.max_batch_size, self.max_cache_len = key_cache[0].shape[0], key_cache[0].shape[2]
        self.trim, self.visible = True, written.shape[0]

    def keys_length(self, cache_position: torch.Tensor) -> int:
        return self.visible


class _CompiledSteps(dict):
    """A model's compiled decode steps, kept on the model so that they live and die with it. A
    copy of the model (``copy.deepcopy``, pickling) starts without them."""

    def __deepcopy__(self, memo):
        return _CompiledSteps()

    def __reduce__(self):
        return (_CompiledSteps, ())


def tensor_key(t: torch.Tensor) -> tuple[int, int]:
    """(address, count of in-place writes): changes when a tensor is replaced or written to, so a
    copy made from it (a packed kernel, a transposed head, a compiled step) knows it is stale. A
    tensor made under ``torch.inference_mode`` (a model loaded inside it) counts no writes: -1,
    and its in-place writes, which only inference mode allows, go unnoticed; so do writes through
    ``.data``, which PyTorch gives a counter of its own (optimizers and ``load_state_dict`` write
    to the tensor itself, under ``no_grad``)."""
    # Asked, not caught: reading ``_version`` of an inference tensor raises, and a raised and
    # caught C++ error costs more than the packed matmul this key guards (it runs every call).
    return t.data_ptr(), -1 if t.is_inference() else t._version


def _model_key(model) -> tuple:
    """Changes whenever something the compiled step bakes in does: a weight (replaced, or updated
    in place: ``_version`` counts writes), a module (replaced, switched between train and eval,
    given a hook) or a setting (an attribute such as ``variance_epsilon``, ``act_fn`` or a
    quantized layer's ``compute_dtype``, the config's fields). Read once per ``generate``: the
    ahead-of-time CPU step has no guards at all, and the ``torch.compile`` steps drop dynamo's
    guards on the model (:func:`_guards_on_inputs`)."""
    weights = tuple(map(tensor_key, (*model.parameters(), *model.buffers())))
    modules = tuple(
        (type(m), m.training, len(m._forward_hooks) + len(m._forward_pre_hooks), _settings(m))
        for m in model.modules()
    )
    return weights, modules, _settings(model.config, private=("_attn_implementation",))


def _settings(obj, private: tuple[str, ...] = ()) -> tuple:
    """``obj``'s public attributes (and those named in ``private``) as plain values: numbers,
    strings, dtypes, and lists and dicts of them; any other object (a function, a submodule, the
    config, a tensor that is not a weight) by identity. Underscore attributes are skipped: caches (a packed kernel, compiled steps)."""
    def plain(v):
        if isinstance(v, (bool, int, float, str, type(None), torch.dtype, torch.device)):
            return v
        if isinstance(v, (list, tuple)):
            return tuple(map(plain, v))
        if isinstance(v, dict):
            return tuple((k, plain(x)) for k, x in v.items())
        return id(v)

    return tuple((k, plain(v)) for k, v in vars(obj).items() if not k.startswith("_") or k in private)


def _guards_on_inputs(guards) -> list[bool]:
    """Which of dynamo's guards the compiled step keeps: those on its inputs (tokens, positions,
    the cache, whether there is a padding mask) and on global state. Those on the model (its
    modules, their attributes and weights: about 700 on the shipped model, evaluated before every
    token; dropping them made its compiled decoding 3-9% faster) go: :func:`_model_key` checks the
    same once per ``generate`` and compiles again when it changed."""
    return [not g.name.startswith("self") for g in guards]


def _compiled_step(model, batch_size: int, max_length: int, device: torch.device):
    """(cache, compiled decode step) for this model and shape, built once and reused: compiling
    takes seconds. The cache is reset per call; stale slots are never read (see below).

    - On CUDA: CUDA graphs (``mode="reduce-overhead"``), the cache at fixed addresses; attention
      reads every slot, and the causal mask hides those not written yet.
    - On a CPU: the step is exported (``torch.export``) and compiled ahead of time by AOTInductor
      into a library that the loop calls directly, with none of ``torch.compile``'s Python
      between the call and the kernels (its guards and wrappers were about 150 µs of the shipped
      model's 550 µs step). Inductor *freezes* the weights into it (they become constants of the
      compiled code) and runs every matrix product through its own C++ GEMM template, with the
      weights packed once into the layout its matrix-vector kernel reads fastest (``freezing`` +
      ``max_autotune`` with the ``CPP`` backend). Frozen weights are a copy: a model whose weights
      change (training, ``load_state_dict``, merging LoRA) is compiled again, and a model over
      :data:`FREEZE_MAX_BYTES` keeps its weights as inputs of a ``torch.compile`` step.
      Attention reads only the slots written so far (:class:`_CpuDecodeStep`).
    """
    steps = model.__dict__.get("_compiled_decode_steps")
    if steps is None:
        steps = model.__dict__["_compiled_decode_steps"] = _CompiledSteps()
    max_cache_len = -(-max_length // CACHE_BUCKET) * CACHE_BUCKET
    key = (batch_size, max_cache_len, model.dtype, str(device), torch.get_num_threads())
    weight_bytes = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    freeze = device.type == "cpu" and weight_bytes <= FREEZE_MAX_BYTES
    if freeze:
        _own_storages(model)
    state = _model_key(model)
    if key not in steps or steps[key][2] != state:
        # On a CPU the prefill, which runs eagerly, reads only the slots written (trim)
        cache = StaticCache(model.config, batch_size, max_cache_len, device=device, dtype=model.dtype,
                            trim=device.type == "cpu")
        steps[key] = (cache, _compile(model, cache, device, freeze=freeze), state)
    cache, step, _ = steps[key]
    cache.reset()
    return cache, step


def _own_storages(model) -> None:
    """Give every weight that is a view into a larger storage a storage of its own, in place.
    ``from_pretrained`` maps a safetensors file into memory and its weights are slices of it; with
    such weights frozen, inductor's C++ GEMM template (torch 2.13) computed garbage, all of its
    tokens 0 after the first. The frozen step copies the weights anyway, so the memory is the same."""
    for t in (*model.parameters(), *model.buffers()):
        if t.storage_offset() or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            # Outside inference mode, so the weights stay trainable; a model loaded inside it has
            # inference tensors, whose data only an inference tensor can replace.
            with torch.no_grad(), torch.inference_mode(t.is_inference()):
                t.data = t.data.clone()


def _module_of_its_own(cls: type, model) -> torch.nn.Module:
    """``cls(model)``, of a class of its own (a copy of the forward's code). Dynamo keeps its
    compiled graphs on the code object of the forward it compiles, and reuses one for any module
    whose guards pass: with the guards on the model dropped, another model of the same shape
    would run these weights. A copy per model and shape keeps each compiled step to its model,
    and keeps one process's steps (fp32, int8, thread counts...) from crowding each other out of
    torch._dynamo.config.recompile_limit."""
    forward = cls.forward
    code_copy = types.FunctionType(forward.__code__.replace(), forward.__globals__, forward.__name__, forward.__defaults__)
    return type(cls.__name__, (cls,), {"forward": code_copy})(model)


def _compile(model, cache: StaticCache, device: torch.device, freeze: bool):
    """The compiled decode step, called as :func:`forward_step` is."""
    if device.type == "cuda":
        # CUDA graphs replay fixed memory addresses: the cache must stay where it is.
        for t in cache.key_cache + cache.value_cache + [cache.length]:
            torch._dynamo.mark_static_address(t)
        # (mode="reduce-overhead" is these CUDA-graph options; a mode cannot be given with options)
        compiled = torch.compile(_module_of_its_own(_DecodeStep, model), dynamic=False, fullgraph=True,
                                 options={"triton.cudagraphs": True, "guard_filter_fn": _guards_on_inputs})
        head_t = model.column_major_head(cache.max_batch_size, device)
        return lambda model, cache, *inputs: compiled(cache, *map(_own_strides, inputs), head_t=head_t)
    warn_if_scalar_kernels()
    if freeze:
        step = _AheadOfTimeStep(model, cache.max_cache_len, _frozen_cpu_options(model),
                                fallback=lambda: _plain_cpu_step(model, cache))
    else:
        step = _plain_cpu_step(model, cache)
    slots = torch.arange(cache.max_cache_len, device=device)

    def cpu_step(model, cache, input_ids, position_ids, cache_position, padding_mask):
        written = slots[: int(cache_position[-1]) + 1]
        inputs = map(_own_strides, (input_ids, position_ids, cache_position, padding_mask))
        return step(cache.key_cache, cache.value_cache, cache.length, written, *inputs)

    return cpu_step


def _plain_cpu_step(model, cache: StaticCache):
    """:class:`_CpuDecodeStep` through ``torch.compile``, the weights as inputs (a model over
    :data:`FREEZE_MAX_BYTES`, or where the ahead-of-time step cannot be built), called as
    :class:`_AheadOfTimeStep` is. The column-major head (see LlamaForCausalLM.logits) goes in as
    an argument: a tensor argument is guarded by its shape, not its identity."""
    compiled = torch.compile(_module_of_its_own(_CpuDecodeStep, model), dynamic=False, fullgraph=True,
                             # the generated C++ wrapper saves the Python glue around each kernel
                             options={"cpp_wrapper": True, "guard_filter_fn": _guards_on_inputs})
    head_t = model.column_major_head(cache.max_batch_size, cache.length.device)

    def step(key_cache, value_cache, length, written, *inputs):
        # the count of written slots, as a symbol (2: a decode step follows a prompt; at most
        # the cache's length - 1: the loop stops when the cache is full)
        torch._dynamo.mark_dynamic(written, 0, min=2, max=cache.max_cache_len - 1)
        return compiled(key_cache, value_cache, length, written, *inputs, head_t=head_t)

    return step


class _AheadOfTimeStep:
    """The CPU decode step of a model of at most :data:`FREEZE_MAX_BYTES`: :class:`_CpuDecodeStep`
    exported and compiled ahead of time by AOTInductor, its weights frozen in (see
    :func:`_compiled_step`). One library per case (with a padding mask, or without), built on
    first use with ``options``; where one cannot be built (a CPU or compiler that inductor's
    C++ GEMM template does not cover), it warns and uses the plain compiled step instead."""

    def __init__(self, model, max_cache_len: int, options: dict, fallback) -> None:
        self.module = _CpuDecodeStep(model)
        self.max_cache_len, self.options, self.fallback = max_cache_len, options, fallback
        self.libraries: dict[bool, Any] = {}

    def __call__(self, *args):
        padded = args[-1] is not None
        library = self.libraries.get(padded)
        if library is None:  # set only once built: a build stopped by Ctrl-C is tried again
            library = self.libraries[padded] = self._build(args)
        return library(*args)

    def _build(self, args):
        try:
            return _aot_compile(self.module, args, self.max_cache_len, self.options)
        except Exception as error:  # noqa: BLE001 (a compiler failure: fall back, and say so)
            warnings.warn(f"compile=True: the ahead-of-time CPU step did not build ({type(error).__name__}: {error}); "
                          "using the plain compiled step", stacklevel=4)
            return self.fallback()


def _aot_compile(module: torch.nn.Module, args: tuple, max_cache_len: int, options: dict):
    """``module`` exported with ``args`` (``written``, the fourth, of any length from 2 to
    ``max_cache_len`` - 1) and compiled by AOTInductor with ``options``: a callable taking
    arguments like ``args``. The package file is only a way in: it is loaded, then deleted."""
    layers = len(args[0])
    written = torch.export.Dim("written", min=2, max=max_cache_len - 1)
    if hasattr(torch._inductor.config.aot_inductor, "package_constants_on_disk_format"):
        # The frozen weights go in a file beside the library, not inside it: a loaded library is
        # never unloaded (its file stays mapped until the process ends), and weights inside it
        # stayed in memory with it after the model was deleted, the model's size per compiled model.
        options = {**options, "aot_inductor.package_constants_in_so": False,
                   "aot_inductor.package_constants_on_disk_format": "binary_blob"}
    shapes = ([None] * layers, [None] * layers, None, {0: written}) + (None,) * (len(args) - 4)
    try:
        with warnings.catch_warnings():
            # torch's own code (not ours) still calls Tensor.storage(), isinstance(..., LeafSpec), torch.jit
            warnings.filterwarnings("ignore", message="TypedStorage is deprecated")
            warnings.filterwarnings("ignore", message=".*LeafSpec.*")
            warnings.filterwarnings("ignore", message=".*torch.jit.script_method.*")
            program = torch.export.export(module, args, dynamic_shapes=shapes, strict=False)
            with tempfile.TemporaryDirectory(prefix="llama_edu_step_") as folder:
                path = torch._inductor.aoti_compile_and_package(
                    program, package_path=os.path.join(folder, "decode_step.pt2"), inductor_configs=options)
                library = torch._inductor.aoti_load_package(path)
    finally:
        _forget_last_trace()
    # Called as a function, the library parses its input and output layouts from JSON and
    # flattens the arguments at every call (22 µs a token on a 4-layer model); its loader takes
    # the flat list of tensors: the arguments in order, lists opened, None left out.
    run = getattr(getattr(library, "loader", None), "run", None)
    if run is None:  # (a torch without the loader: the documented call)
        return library

    def step(key_cache, value_cache, *tensors):
        return run([*key_cache, *value_cache, *(t for t in tensors if t is not None)])[0]

    return step


def _forget_last_trace() -> None:
    """Empty the map from traced values to graph nodes that ``torch.export`` (torch 2.13) keeps in a
    module-level dict after it returns (it is read only while exporting, to report leaked fake
    tensors). Through its nodes it held the last exported model's modules, weights included,
    after the model itself was deleted."""
    proxy_tensor = sys.modules.get("torch.fx.experimental.proxy_tensor")
    getattr(proxy_tensor, "_FAKE_TENSOR_ID_TO_PROXY_MAP_FOR_EXPORT", {}).clear()


@functools.cache
def warn_if_scalar_kernels() -> bool:
    """Warn (once per process; True when warned) when inductor will write scalar C++ for this CPU
    although it has vector units. Inductor vectorizes only for the instruction sets its probe
    confirms: it builds a small library and loads it in a child Python that is given this process's
    ``sys.path`` ahead of the standard library. A file named like a standard module (``struct.py``)
    in the script's or notebook's folder is then imported instead, the probe fails, and every
    compiled kernel runs scalar (here the compiled step became about 7x slower), with no error."""
    if platform.machine().lower() not in ("x86_64", "amd64") or not torch.cpu.get_capabilities().get("avx2"):
        return False  # only x86 with AVX2 is sure to have an instruction set inductor vectorizes for
    try:
        from torch._inductor.cpu_vec_isa import pick_vec_isa
        if pick_vec_isa():
            return False
    except Exception:  # noqa: BLE001 (a torch without this module, or no compiler: inductor reports that itself)
        return False
    warnings.warn("compile=True: inductor's check of this CPU's vector instructions failed, so the compiled kernels "
                  "are scalar and several times slower than they should be" + _why_a_child_python_fails(), stacklevel=2)
    return True


def _why_a_child_python_fails() -> str:
    """Why a child Python given this ``sys.path`` ahead of its own (as inductor's probe is) cannot
    load a library through ``ctypes``, as the end of a sentence; "" when it can."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    try:
        child = subprocess.run([sys.executable, "-c", "import ctypes"], env=env, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return ""
    if child.returncode == 0:
        return ""
    files = [f for f in shadowing_files() if f in child.stderr]
    if files:
        return (f"; {', '.join(files)} {'is' if len(files) == 1 else 'are'} imported instead of the standard module of "
                "that name by the child Python that runs the check: rename or move it")
    last = (child.stderr.strip().splitlines() or [f"exit status {child.returncode}"])[-1]
    return f"; a child Python given this sys.path cannot import ctypes ({last})"


def shadowing_files() -> list[str]:
    """Files on ``sys.path`` outside the installation (a script's or notebook's folder, PYTHONPATH)
    named like a standard-library module."""
    installed = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, *sysconfig.get_paths().values())}
    found = []
    for entry in dict.fromkeys(sys.path):
        folder, real = os.path.abspath(entry or "."), os.path.realpath(entry or ".")
        if not os.path.isdir(folder) or any(real == p or real.startswith(p + os.sep) for p in installed):
            continue
        for name in sorted(sys.stdlib_module_names):
            for candidate in (f"{name}.py", os.path.join(name, "__init__.py")):
                if os.path.isfile(os.path.join(folder, candidate)):
                    found.append(os.path.join(folder, candidate))
    return found


def _own_strides(t: torch.Tensor | None) -> torch.Tensor | None:
    """A copy of ``t`` with the strides of a fresh tensor. The step's tokens and positions are
    slices of (batch, max_length) buffers, whose row stride is max_length. A ``torch.compile``
    step guards every input's strides, and would be compiled again for every other generation
    length; the ahead-of-time step checks none, and reads its inputs with the strides it was
    built for."""
    return None if t is None else t.clone(memory_format=torch.contiguous_format)
