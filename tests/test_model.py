"""Behaviour of our model beyond transformers parity: caches, dtypes, errors, embeddings."""

from __future__ import annotations

import pytest
import torch

from conftest import SMALL, max_diff
from llama_edu import (DynamicCache, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification,
                       StaticCache, repeat_kv)
from llama_edu.attention import causal_mask
from llama_edu.modeling import _HEAD_COPIES


def _model(**kw):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**{**SMALL, **kw})).eval()


def test_repeat_kv_is_repeat_interleave():
    x = torch.randn(2, 3, 5, 4)
    assert torch.equal(repeat_kv(x, 4), torch.repeat_interleave(x, 4, dim=1))
    assert repeat_kv(x, 1) is x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_rotates_q_and_k_together_as_each_alone(dtype):
    """apply_rotary_pos_emb is q * cos + rotate_half(q) * sin for each of q and k, numbers and
    gradients, for GQA head counts and every heads axis (unsqueeze_dim 1, 2 or None)."""
    from llama_edu.rope import apply_rotary_pos_emb, rotate_half

    def each(q, k, cos, sin):
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 8, 3, 16, generator=g), torch.randn(2, 2, 3, 16, generator=g)  # 8 heads, 2 kv heads
    cos, sin = torch.randn(2, 3, 16, generator=g), torch.randn(2, 3, 16, generator=g)
    q, k, cos, sin = (t.to(dtype).requires_grad_(t is q or t is k) for t in (q, k, cos, sin))
    got = apply_rotary_pos_emb(q, k, cos, sin)  # heads on dim 1
    want = each(q, k, cos[:, None], sin[:, None])
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    grads = [torch.autograd.grad(out[0].sum() + 2 * out[1].sum(), (q, k)) for out in (got, want)]
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    # (batch, seq, heads, dim) with unsqueeze_dim=2, and cos/sin already unsqueezed (None)
    qt, kt = q.detach().transpose(1, 2), k.detach().transpose(1, 2)
    got = apply_rotary_pos_emb(qt, kt, cos, sin, unsqueeze_dim=2)
    assert all(torch.equal(a, b) for a, b in zip(got, each(qt, kt, cos[:, :, None], sin[:, :, None])))
    got = apply_rotary_pos_emb(q.detach(), k.detach(), cos[:, None], sin[:, None], unsqueeze_dim=None)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_causal_mask_shape_and_values():
    # Two new tokens at slots 1 and 2 after one cached (padding) slot.
    allowed = causal_mask(torch.tensor([1, 2]), 3, torch.tensor([[0, 1, 1]]))
    assert allowed.shape == (1, 1, 2, 3) and allowed.dtype == torch.bool
    assert allowed[0, 0].tolist() == [[False, True, False], [False, True, True]]
    # A preallocated cache of 5 slots: slots after the position are hidden, like the future.
    assert causal_mask(torch.tensor([2]), 5)[0, 0].tolist() == [[True, True, True, False, False]]
    # A query at a padding position sees nothing, or everything when asked (fused SDPA kernels).
    pad_row = causal_mask(torch.tensor([0, 1]), 2, torch.tensor([[0, 1]]))
    assert pad_row[0, 0].tolist() == [[False, False], [False, True]]
    unmasked = causal_mask(torch.tensor([0, 1]), 2, torch.tensor([[0, 1]]), unmask_empty_rows=True)
    assert unmasked[0, 0].tolist() == [[True, True], [False, True]]


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_eager_and_sdpa_agree_on_real_positions(impl):
    model = _model(attn_implementation="eager")
    ids = torch.randint(0, 97, (3, 11))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    mask[2, 8:] = 0
    with torch.no_grad():
        eager = model(ids, attention_mask=mask).logits
        model.config.attn_implementation = impl
        other = model(ids, attention_mask=mask).logits
    real = mask.bool()
    assert max_diff(eager[real], other[real]) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_left_padded_half_precision_has_no_nan(dtype, impl):
    """transformers #25311/#27179: fully masked rows turned into NaN in half precision."""
    model = _model(attn_implementation=impl).to(dtype)
    ids = torch.randint(0, 97, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, :6] = 0
    with torch.no_grad():
        out = model(ids, attention_mask=mask, output_hidden_states=True)
    assert not out.logits.isnan().any()
    assert out.logits.dtype == torch.float32  # logits are upcast, as in transformers
    ref = _model(attn_implementation=impl)(ids, attention_mask=mask).logits
    assert max_diff(out.logits[mask.bool()], ref[mask.bool()]) < 0.1


@pytest.mark.parametrize("trim", [False, True])
def test_static_cache_equals_dynamic_cache(trim):
    model = _model()
    ids = torch.randint(0, 97, (2, 12))
    static = StaticCache(model.config, max_batch_size=2, max_cache_len=16, trim=trim)
    dynamic = DynamicCache()
    with torch.no_grad():
        a = model(ids[:, :5], past_key_values=static, use_cache=True).logits
        b = model(ids[:, :5], past_key_values=dynamic, use_cache=True).logits
        outs_a, outs_b = [a], [b]
        for t in range(5, 12):
            outs_a.append(model(ids[:, t : t + 1], past_key_values=static, use_cache=True).logits)
            outs_b.append(model(ids[:, t : t + 1], past_key_values=dynamic, use_cache=True).logits)
    assert static.get_seq_length() == dynamic.get_seq_length() == 12
    # Not bit-identical untrimmed: the static cache attends over all 16 slots (the unwritten ones
    # masked), so the kernel sums in another order. Trimmed, it reads the 12 written slots only.
    assert max_diff(torch.cat(outs_a, 1), torch.cat(outs_b, 1)) <= (0 if trim else 1e-6)
    keys = static.update(*dynamic[0], 0, torch.arange(12))[0]
    assert keys.shape[2] == (12 if trim else 16)
    with pytest.raises(ValueError, match="max_cache_len"):
        model(torch.randint(0, 97, (2, 5)), past_key_values=static, use_cache=True)


def test_cache_object_is_returned_and_updated_in_place():
    model = _model()
    cache = DynamicCache()
    with torch.no_grad():
        out = model(torch.randint(0, 97, (1, 4)), past_key_values=cache, use_cache=True)
    assert out.past_key_values is cache and cache.get_seq_length() == 4
    assert cache[0][0].shape == (1, 2, 4, 8)  # (batch, kv_heads, seq, head_dim)


def test_bad_inputs_raise_clear_errors():
    model = _model()
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(torch.tensor([[1, 2, 97]]))
    with pytest.raises(ValueError, match="2-D"):
        model(torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="exactly one"):
        model()
    with pytest.raises(ValueError, match="attention_mask has shape"):
        model(torch.tensor([[1, 2, 3]]), attention_mask=torch.ones(1, 4))
    with pytest.raises(ValueError, match="labels"):
        model(torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2]]))


def test_flash_attention_without_package_is_a_clear_error():
    with pytest.raises((ImportError, ValueError), match="flash"):
        _model(attn_implementation="flash_attention_2")


def test_tied_embeddings_and_padding_idx():
    model = _model(tie_word_embeddings=True, pad_token_id=0)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert "lm_head.weight" in model.state_dict()
    assert torch.all(model.model.embed_tokens.weight[0] == 0)
    untied = _model()
    assert untied.num_parameters() - model.num_parameters() == 97 * 64


def test_resize_token_embeddings_for_a_new_pad_token():
    model = _model()
    ids = torch.randint(0, 97, (1, 6))
    with torch.no_grad():
        before = model(ids).logits
        model.resize_token_embeddings(98)
        after = model(ids).logits
        model(torch.tensor([[97, 1]]))  # the new id is now valid
    assert model.config.vocab_size == 98 and model.lm_head.weight.shape == (98, 64)
    assert max_diff(before, after[..., :97]) == 0.0  # old tokens unchanged
    tied = _model(tie_word_embeddings=True)
    tied.resize_token_embeddings(100, pad_to_multiple_of=64)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight and tied.config.vocab_size == 128


def test_gradient_checkpointing_gives_the_same_gradients():
    ids = torch.randint(0, 97, (2, 10))
    grads = []
    for ckpt in (False, True):
        model = _model().train()
        if ckpt:
            model.gradient_checkpointing_enable()
        model(ids, labels=ids).loss.backward()
        grads.append(model.model.layers[0].self_attn.q_proj.weight.grad)
    assert max_diff(*grads) <= 1e-6


def test_attention_dropout_only_in_training():
    model = _model(attention_dropout=0.5)
    ids = torch.randint(0, 97, (1, 8))
    with torch.no_grad():
        assert max_diff(model(ids).logits, model(ids).logits) == 0.0
        model.train()
        assert max_diff(model(ids).logits, model(ids).logits) > 0.0


def test_meta_device_build_counts_7b_parameters():
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig.from_preset("llama2-7b"))
    assert model.num_parameters() == 6_738_415_616  # the published 6.7B


def test_classification_head_shape():
    model = LlamaForSequenceClassification(LlamaConfig(**SMALL, num_labels=4, pad_token_id=0))
    out = model(torch.randint(1, 97, (3, 7)))
    assert out.logits.shape == (3, 4)


def test_beyond_context_warns_once_without_rope_scaling():
    model = _model()  # max_position_embeddings = 32
    with pytest.warns(UserWarning, match="longer than max_position_embeddings"):
        model(torch.randint(0, 97, (1, 40)))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(torch.randint(0, 97, (1, 40)))  # only once
        _model(rope_scaling={"type": "dynamic", "factor": 2.0})(torch.randint(0, 97, (1, 40)))


def test_cpu_decode_head_matches_and_follows_weight_changes():
    model = _model()
    hidden = torch.randn(1, model.config.hidden_size)
    with torch.no_grad():
        plain = torch.nn.functional.linear(hidden, model.lm_head.weight)
        assert max_diff(model.logits(hidden), plain) <= 1e-5  # one row: the column-major copy
        assert model.lm_head in _HEAD_COPIES
        model.lm_head.weight.mul_(2)  # an in-place update must not leave a stale copy
        assert max_diff(model.logits(hidden), 2 * plain) <= 1e-5
    out = model.logits(hidden)  # with gradients: the real weight, so it gets a gradient
    out.sum().backward()
    assert model.lm_head.weight.grad is not None


def test_dynamic_cache_keeps_only_the_keys_memory():
    """The cache a prefill returns holds the keys' and values' own memory: no view into a larger
    tensor (the fused projection or the queries, with GQA many times more) kept alive with them."""
    model = _model(num_attention_heads=4, num_key_value_heads=1)
    with torch.no_grad():
        cache = model(torch.randint(0, 97, (2, 9)), past_key_values=DynamicCache(), use_cache=True).past_key_values
    for key, value in cache:
        assert key.untyped_storage().nbytes() == key.numel() * key.element_size()
        assert value.untyped_storage().nbytes() == value.numel() * value.element_size()
