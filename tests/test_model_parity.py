"""Parity with transformers 4.37.2 on identical random weights, in float32 (logits within 1e-5).

Each case builds a fresh transformers model: its dynamic RoPE keeps state between calls.
"""

from __future__ import annotations

import pytest
import torch

from conftest import max_diff, twins

ATOL = 1e-5


def _ids(batch=2, seq=12, vocab=97, seed=1):  # ids in [3, vocab)
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, seq), generator=g)


@pytest.mark.parametrize("kv_heads", [8, 2, 1], ids=["MHA", "GQA", "MQA"])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_logits_match(kv_heads, impl):
    theirs, ours = twins(num_key_value_heads=kv_heads, attn_implementation=impl)
    ours.config.attn_implementation = impl
    ids = _ids()
    with torch.no_grad():
        assert max_diff(theirs(ids).logits, ours(ids).logits) <= ATOL


@pytest.mark.parametrize("scaling", [{"type": "linear", "factor": 2.0}, {"type": "dynamic", "factor": 2.0}])
@pytest.mark.parametrize("seq", [20, 50], ids=["within", "beyond"])
def test_rope_scaling(scaling, seq):
    # max_position_embeddings is 32: seq 50 exercises dynamic NTK's grown base.
    theirs, ours = twins(rope_scaling=scaling)
    ids = _ids(seq=seq)
    with torch.no_grad():
        assert max_diff(theirs(ids).logits, ours(ids).logits) <= ATOL


def test_dynamic_ntk_is_stateless_unlike_transformers():
    """transformers 4.37 keeps the base grown by a long input (#25306); we must not."""
    theirs, ours = twins(rope_scaling={"type": "dynamic", "factor": 2.0})
    short, long = _ids(seq=10), _ids(seq=60, seed=2)
    with torch.no_grad():
        ours_before = ours(short).logits
        theirs_before = theirs(short).logits
        ours(long), theirs(long)
        ours_after = ours(short).logits
        theirs_after = theirs(short).logits
    assert max_diff(ours_before, theirs_before) <= ATOL
    assert max_diff(ours_before, ours_after) == 0.0
    assert max_diff(theirs_before, theirs_after) > 10 * ATOL  # the transformers bug is real


def test_pretraining_tp():
    theirs, ours = twins(pretraining_tp=2, vocab_size=98, attn_implementation="eager")
    ours.config.attn_implementation = "eager"
    ids = _ids()
    with torch.no_grad():
        assert max_diff(theirs(ids).logits, ours(ids).logits) <= ATOL


def test_attention_bias():
    theirs, ours = twins(attention_bias=True)
    assert ours.model.layers[0].self_attn.q_proj.bias is not None
    for p in theirs.parameters():  # transformers zero-initialises biases: make them matter
        pass
    with torch.no_grad():
        for (name, p) in theirs.named_parameters():
            if name.endswith("bias"):
                p.normal_()
        ours.load_state_dict(theirs.state_dict())
        ids = _ids()
        assert max_diff(theirs(ids).logits, ours(ids).logits) <= ATOL


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch(impl, side):
    theirs, ours = twins(attn_implementation=impl)
    ours.config.attn_implementation = impl
    ids = _ids(batch=3, seq=10)
    mask = torch.ones_like(ids)
    if side == "left":
        mask[1, :4] = 0
        mask[2, :7] = 0
    else:
        mask[1, 6:] = 0
        mask[2, 3:] = 0
    with torch.no_grad():
        a, b = theirs(ids, attention_mask=mask).logits, ours(ids, attention_mask=mask).logits
    # Every position (pad rows included) matches transformers for the same implementation.
    assert max_diff(a, b) <= ATOL


def test_incremental_decoding_matches_full_forward():
    theirs, ours = twins()
    ids = _ids(seq=14)
    with torch.no_grad():
        full = ours(ids).logits
        out = ours(ids[:, :8], use_cache=True)
        pieces = [out.logits]
        past = out.past_key_values
        assert isinstance(past, tuple) and len(past) == 2  # legacy format in, legacy format out
        for t in range(8, 14):
            out = ours(ids[:, t : t + 1], past_key_values=past, use_cache=True)
            past = out.past_key_values
            pieces.append(out.logits)
        theirs_out = theirs(ids[:, :8], use_cache=True)
        theirs_next = theirs(ids[:, 8:], past_key_values=theirs_out.past_key_values, use_cache=True)
        ours_next = ours(ids[:, 8:], past_key_values=ours(ids[:, :8], use_cache=True).past_key_values, use_cache=True)
    assert max_diff(torch.cat(pieces, 1), full) <= ATOL
    assert max_diff(theirs_next.logits, ours_next.logits) <= ATOL
    # The cache holds keys after RoPE and before the GQA repeat: (batch, kv_heads, seq, head_dim).
    k_ours, k_theirs = ours_next.past_key_values[0][0], theirs_next.past_key_values[0][0]
    assert k_ours.shape == (2, 2, 14, 8)
    assert max_diff(k_ours, k_theirs) <= ATOL


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_incremental_decoding_left_padded(impl):
    theirs, ours = twins(attn_implementation=impl)
    ours.config.attn_implementation = impl
    ids = _ids(seq=10)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with torch.no_grad():
        full = ours(ids, attention_mask=mask).logits
        a = theirs(ids[:, :7], attention_mask=mask[:, :7], use_cache=True)
        b = ours(ids[:, :7], attention_mask=mask[:, :7], use_cache=True)
        a2 = theirs(ids[:, 7:], attention_mask=mask, past_key_values=a.past_key_values, use_cache=True)
        b2 = ours(ids[:, 7:], attention_mask=mask, past_key_values=b.past_key_values, use_cache=True)
    assert max_diff(a.logits, b.logits) <= ATOL
    # A 3-token chunk after a cached, left-padded prefix equals the full forward...
    assert max_diff(b2.logits, full[:, 7:]) <= ATOL
    if impl == "eager":
        assert max_diff(a2.logits, b2.logits) <= ATOL
    else:
        # ...which transformers 4.37's SDPA path gets wrong: its _unmask_unattended un-masks the
        # first query rows of the chunk as if they were padding (it ignores the cached length).
        assert max_diff(a2.logits[1], b2.logits[1]) <= ATOL
        assert max_diff(a2.logits[0], full[0, 7:]) > 1e-3


def test_loss_hidden_states_and_attentions():
    theirs, ours = twins(attn_implementation="eager")
    ids = _ids()
    labels = ids.clone()
    labels[:, :3] = -100
    kwargs = dict(labels=labels, output_hidden_states=True, output_attentions=True)
    with torch.no_grad():
        a, b = theirs(ids, **kwargs), ours(ids, **kwargs)
    assert abs(a.loss.item() - b.loss.item()) <= ATOL
    assert len(b.hidden_states) == ours.config.num_hidden_layers + 1
    for x, y in zip(a.hidden_states, b.hidden_states):
        assert max_diff(x, y) <= ATOL
    # The last hidden state is after the final norm, as in transformers.
    assert max_diff(b.hidden_states[-1], ours.model(ids).last_hidden_state) == 0.0
    assert len(b.attentions) == ours.config.num_hidden_layers
    for x, y in zip(a.attentions, b.attentions):
        assert x.shape == y.shape == (2, 8, 12, 12)
        assert max_diff(x, y) <= ATOL


def test_output_attentions_with_sdpa_model_falls_back_to_eager():
    theirs, ours = twins()  # both default to sdpa
    ids = _ids()
    with torch.no_grad():
        a, b = theirs(ids, output_attentions=True), ours(ids, output_attentions=True)
    assert max_diff(a.attentions[1], b.attentions[1]) <= ATOL
    assert max_diff(a.logits, b.logits) <= ATOL


def test_return_dict_false_gives_tuple():
    theirs, ours = twins()
    ids = _ids()
    with torch.no_grad():
        a = theirs(ids, labels=ids, use_cache=False, return_dict=False)
        b = ours(ids, labels=ids, use_cache=False, return_dict=False)
    assert isinstance(b, tuple) and len(a) == len(b) == 2  # (loss, logits)
    assert max_diff(a[1], b[1]) <= ATOL


def test_inputs_embeds_equals_input_ids():
    theirs, ours = twins()
    ids = _ids()
    with torch.no_grad():
        emb = ours.get_input_embeddings()(ids)
        assert max_diff(ours(inputs_embeds=emb).logits, ours(ids).logits) == 0.0
        assert max_diff(theirs(inputs_embeds=emb).logits, ours(inputs_embeds=emb).logits) <= ATOL


def test_base_model_parity():
    theirs, ours = twins("LlamaModel")
    ids = _ids()
    with torch.no_grad():
        assert max_diff(theirs(ids).last_hidden_state, ours(ids).last_hidden_state) <= ATOL


# --------------------------------------------------------------------- classification head
@pytest.mark.parametrize(
    "num_labels,labels",
    [
        (1, torch.tensor([0.5, -1.0, 2.0])),  # regression
        (3, torch.tensor([0, 2, 1])),  # single-label
        (3, torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0]])),  # multi-label
    ],
    ids=["regression", "single_label", "multi_label"],
)
def test_sequence_classification_losses(num_labels, labels):
    theirs, ours = twins("LlamaForSequenceClassification", num_labels=num_labels, pad_token_id=0)
    ids = _ids(batch=3, seq=9)
    ids[1, 6:] = 0  # right padding with the pad id
    with torch.no_grad():
        a, b = theirs(ids, labels=labels), ours(ids, labels=labels)
    assert b.logits.shape == (3, num_labels)
    assert max_diff(a.logits, b.logits) <= ATOL
    assert abs(a.loss.item() - b.loss.item()) <= ATOL
    assert ours.config.problem_type == theirs.config.problem_type


def test_classification_left_padding_with_mask_matches():
    theirs, ours = twins("LlamaForSequenceClassification", pad_token_id=0)
    ids = _ids(batch=2, seq=9)
    ids[1, :4] = 0
    mask = (ids != 0).long()
    with torch.no_grad():
        a, b = theirs(ids, attention_mask=mask), ours(ids, attention_mask=mask)
    assert max_diff(a.logits, b.logits) <= ATOL


def test_classification_pad_equal_to_eos_inside_text():
    """transformers #35352: with pad == eos and an eos inside the text, transformers pools at the
    token before that eos; we pool at the last attended token, which is right."""
    theirs, ours = twins("LlamaForSequenceClassification", pad_token_id=2)
    ids = _ids(batch=2, seq=10)
    ids[0, 4] = 2  # an eos in the middle of the text
    ids[1, 7:] = 2  # right padding with pad == eos
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    with torch.no_grad():
        a, b = theirs(ids, attention_mask=mask), ours(ids, attention_mask=mask)
        hidden = ours.model(ids, attention_mask=mask).last_hidden_state
        expected = ours.score(hidden)[torch.arange(2), torch.tensor([9, 6])]
    assert max_diff(b.logits, expected) <= ATOL
    assert max_diff(a.logits[1], b.logits[1]) <= ATOL  # the ordinary row agrees
    assert max_diff(a.logits[0], b.logits[0]) > 1e-4  # transformers pools row 0 at index 3


def test_classification_without_pad_token():
    theirs, ours = twins("LlamaForSequenceClassification")
    with pytest.raises(ValueError, match="no padding token"):
        ours(_ids(batch=2))
    with torch.no_grad():
        one = _ids(batch=1)
        assert max_diff(theirs(one).logits, ours(one).logits) <= ATOL
