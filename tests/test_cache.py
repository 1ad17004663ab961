"""The caches and the one forward: prefill + decode steps equal one full forward pass.

Teacher forcing: a known sequence is fed token by token through the decode loop's own functions
(``prefill``, ``decode_one_token``), and each step's logits are compared with the full forward's
logits at that position, for the static and the dynamic cache, with and without left padding,
eager and compiled.
"""

from __future__ import annotations

import pytest
import torch

import llama_edu
from llama_edu.cache import DynamicCache, StaticCache
from llama_edu.generation import DecodeState, decode_one_token, prefill

from conftest import SMALL, max_diff

PROMPT, TOTAL = 5, 11


def _model(**overrides):
    torch.manual_seed(0)
    return llama_edu.LlamaForCausalLM(llama_edu.LlamaConfig(**{**SMALL, **overrides})).eval()


def _batch(padded: bool):
    ids = torch.randint(3, SMALL["vocab_size"], (2, TOTAL), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :3] = 0  # row 1: three left-padding tokens
        ids[1, :3] = 0
    return ids, mask


def _teacher_forced_logits(model, ids, mask, cache_implementation, compile=False):
    """Logits (batch, TOTAL - PROMPT + 1, vocab) from prefill then one decode step per token."""
    with torch.inference_mode():
        state = DecodeState.start(model, ids[:, :PROMPT], mask[:, :PROMPT], TOTAL, cache_implementation, True, compile)
        # later tokens may be padding too; compile=True's static cache has slots past TOTAL (keys, unpadded)
        extra = state.cache.max_cache_len - TOTAL if isinstance(state.cache, StaticCache) else 0
        state.padding_mask = None if bool(mask.all()) else torch.nn.functional.pad(mask, (0, extra), value=1)
        steps = [prefill(model, state)]
        for t in range(PROMPT, TOTAL):
            state.sequences[:, t] = ids[:, t]
            state.length += 1
            steps.append(decode_one_token(model, state))
    return torch.stack(steps, 1), state


@pytest.mark.parametrize("padded", [False, True], ids=["no-padding", "left-padded"])
@pytest.mark.parametrize("cache_implementation", ["static", "dynamic"])
def test_prefill_and_decode_equal_one_full_forward(cache_implementation, padded):
    model = _model()
    ids, mask = _batch(padded)
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits[:, PROMPT - 1 :]  # the logits after each token
    stepped, state = _teacher_forced_logits(model, ids, mask, cache_implementation)
    real = mask[:, PROMPT - 1 :].bool()
    assert max_diff(stepped[real], full[real]) <= 1e-5
    assert state.cache.get_seq_length() == TOTAL  # the protocol: tokens written, not capacity


def test_compiled_decode_step_equals_one_full_forward():
    """The compiled step (one torch.compile of the same forward, fixed shapes) on a padded batch."""
    model = _model()
    ids, mask = _batch(padded=True)
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits[:, PROMPT - 1 :]
    stepped, state = _teacher_forced_logits(model, ids, mask, "static", compile=True)
    real = mask[:, PROMPT - 1 :].bool()
    assert max_diff(stepped[real], full[real]) <= 1e-4  # fused kernels round differently
    assert isinstance(state.cache, StaticCache) and state.cache.get_seq_length() == TOTAL


@pytest.mark.parametrize("trim", [False, True])
def test_static_cache_through_the_public_forward_in_chunks(trim):
    """transformers' API with a StaticCache: a left-padded prompt in two chunks, then tokens
    (trimmed: attention reads the written slots only, the padding mask cut to match)."""
    model = _model()
    ids, mask = _batch(padded=True)
    cache = StaticCache(model.config, max_batch_size=2, max_cache_len=16, trim=trim)
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        parts = []
        for start, end in [(0, 4), (4, 7)] + [(t, t + 1) for t in range(7, TOTAL)]:
            out = model(ids[:, start:end], attention_mask=mask[:, :end], past_key_values=cache, use_cache=True)
            parts.append(out.logits)
            assert out.past_key_values is cache and cache.get_seq_length() == end
    real = mask.bool()
    assert max_diff(torch.cat(parts, 1)[real], full[real]) <= 1e-5


def test_dynamic_cache_and_legacy_tuples_round_trip():
    model = _model()
    ids = torch.randint(0, SMALL["vocab_size"], (1, 6))
    with torch.no_grad():
        legacy = model(ids[:, :4], use_cache=True).past_key_values  # no cache given: legacy tuples back
        assert isinstance(legacy, tuple) and len(legacy) == SMALL["num_hidden_layers"]
        nxt = model(ids[:, 4:], past_key_values=legacy, use_cache=True)
        full = model(ids).logits[:, 4:]
    assert max_diff(nxt.logits, full) <= 1e-5
    cache = DynamicCache.from_legacy_cache(nxt.past_key_values)
    assert cache.get_seq_length() == 6 and len(cache.to_legacy_cache()) == SMALL["num_hidden_layers"]


def test_a_cache_from_another_model_is_refused():
    """A cache that covers fewer layers than the model would silently give wrong logits."""
    model = _model()
    ids = torch.randint(0, SMALL["vocab_size"], (1, 4))
    with torch.no_grad():
        legacy = model(ids, use_cache=True).past_key_values
        with pytest.raises(ValueError, match="holds 1 layers but the model has 2"):
            model(ids[:, :1], past_key_values=legacy[:1], use_cache=True)
        cache = StaticCache(model.config, max_batch_size=1, max_cache_len=8)
        with pytest.raises(ValueError, match="batch size 1"):
            model(torch.randint(0, 97, (2, 3)), past_key_values=cache, use_cache=True)
