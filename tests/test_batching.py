"""Continuous batching (llama_edu.generation.batching) on the shipped Shakespeare model: requests
that arrive at different steps and share the decode loop give exactly what each gives alone."""

from __future__ import annotations

import threading
from collections import Counter

import pytest
import torch

from llama_edu.chat import load_model_and_tokenizer
from llama_edu.files import DEFAULT_MODEL_DIR
from llama_edu.generation import generate
from llama_edu.generation.batching import ContinuousBatcher, SlotView, occupancy

PROMPTS = [
    "ROMEO:",
    "First Citizen:\nBefore we proceed any further, hear me speak.",
    "To be, or not",
    "KING HENRY VI:\nWhat",
    "O",
    "JULIET:\nThou knowest the mask of night is on my face,",
]


@pytest.fixture(scope="module")
def shipped():
    if not (DEFAULT_MODEL_DIR / "model.safetensors").is_file():
        pytest.skip(f"the shipped model {DEFAULT_MODEL_DIR} is missing")
    return load_model_and_tokenizer(DEFAULT_MODEL_DIR, "cpu")


def alone(model, ids: list[int], n: int, eos: int) -> list[int]:
    """What greedy ``generate`` gives for this prompt on its own (up to its end of sequence)."""
    out = generate(model, torch.tensor([ids]), max_new_tokens=n, eos_token_id=eos, pad_token_id=eos)[0, len(ids):].tolist()
    return out[: out.index(eos)] if eos in out else out


def test_requests_arriving_at_different_steps_equal_generate_alone(shipped):
    model, tok = shipped
    batcher = ContinuousBatcher(model, slots=3, eos_token_id=tok.eos_token_id)
    arrivals = {0: [0, 1], 2: [2], 3: [3], 9: [4], 30: [5]}  # step -> prompts; 6 requests, 3 slots
    lengths = [12, 30, 20, 25, 8, 15]
    handles = {}
    for step in range(500):
        for i in arrivals.get(step, []):
            handles[i] = batcher.submit(tok.encode(PROMPTS[i]), max_new_tokens=lengths[i])
        if not batcher.step() and step > max(arrivals):
            break
    for i, h in handles.items():
        assert h.finish_reason == "length" and h.done.is_set()
        assert h.tokens == alone(model, tok.encode(PROMPTS[i]), lengths[i], tok.eos_token_id), PROMPTS[i]

    # It really was batched: steps with 3 rows decoding together, requests admitted mid-flight
    # into rows freed by finished ones, and never more rows than slots.
    per_step = Counter(e.step for e in batcher.timeline if e.kind == "decode")
    assert max(per_step.values()) == 3
    prefills = [e for e in batcher.timeline if e.kind == "prefill"]
    assert [e.request_id for e in prefills] == sorted(h.request_id for h in handles.values())
    assert {e.slot for e in batcher.timeline} == {0, 1, 2}
    first = {h.request_id: min(e.step for e in batcher.timeline if e.request_id == h.request_id) for h in handles.values()}
    last = {h.request_id: max(e.step for e in batcher.timeline if e.request_id == h.request_id) for h in handles.values()}
    assert any(first[b] > first[a] and first[b] <= last[a] for a in first for b in first)  # joined while a ran
    grid = occupancy(batcher.timeline, batcher.slots)  # (slots, steps): who held each slot when
    assert grid.shape == (3, max(last.values()) + 1)
    for h in handles.values():
        # One slot, consecutive steps: the prefill (first token) and a decode step in the step it
        # was admitted, then one decode step per further token.
        held = (grid == h.request_id).nonzero()  # (cells, 2): slot, step
        steps = held[:, 1]
        assert held[:, 0].unique().numel() == 1 and len(held) == len(h.tokens) - 1
        assert torch.equal(steps, torch.arange(int(steps[0]), int(steps[0]) + len(steps)))


def test_end_of_sequence_frees_the_slot_and_is_not_returned(shipped):
    model, tok = shipped
    newline = tok.convert_tokens_to_ids("<0x0A>")
    batcher = ContinuousBatcher(model, slots=2, eos_token_id=newline)  # "\n" as the end: it comes soon
    a = batcher.submit(tok.encode("ROMEO:\nI"), max_new_tokens=60)
    b = batcher.submit(tok.encode("To be, or not"), max_new_tokens=60)
    batcher.run_until_idle()
    for h, prompt in ((a, "ROMEO:\nI"), (b, "To be, or not")):
        assert h.finish_reason == "stop" and newline not in h.tokens
        assert h.tokens == alone(model, tok.encode(prompt), 60, newline)
    assert batcher.rows == [None, None]


def test_seeded_sampling_is_the_same_alone_and_in_a_batch(shipped):
    model, tok = shipped
    ids = tok.encode("ROMEO:")
    solo = ContinuousBatcher(model, slots=1)
    h = solo.submit(ids, max_new_tokens=20, temperature=0.9, top_p=0.95, seed=7)
    solo.run_until_idle()
    busy = ContinuousBatcher(model, slots=4)
    others = [busy.submit(tok.encode(p), max_new_tokens=20, temperature=1.0, seed=i) for i, p in enumerate(PROMPTS[1:4])]
    same = busy.submit(ids, max_new_tokens=20, temperature=0.9, top_p=0.95, seed=7)
    busy.run_until_idle()
    assert same.tokens == h.tokens and all(o.finish_reason == "length" for o in others)
    greedy = alone(model, ids, 20, tok.eos_token_id)
    assert h.tokens != greedy  # it did sample


def test_background_thread_cancel_and_close(shipped):
    model, tok = shipped
    batcher = ContinuousBatcher(model, slots=2).start()
    try:
        got, done = [], threading.Event()
        h = batcher.submit(tok.encode("ROMEO:"), max_new_tokens=200,
                           listener=lambda t: got.append(t) if t is not None else done.set())
        streamed = batcher.submit(tok.encode("O"), max_new_tokens=10)
        assert list(streamed.stream(timeout=30)) == streamed.tokens == alone(model, tok.encode("O"), 10, tok.eos_token_id)
        h.cancel()
        assert done.wait(30) and h.finish_reason == "cancelled" and got == h.tokens and len(got) < 200
        waiting = batcher.submit(tok.encode("O"), max_new_tokens=5)
        assert waiting.wait(30) and waiting.finish_reason == "length"
    finally:
        batcher.close()
    with pytest.raises(RuntimeError, match="closed"):
        batcher.submit([1], max_new_tokens=1)


def test_bad_requests_are_refused_with_the_limit(shipped):
    model, _ = shipped
    batcher = ContinuousBatcher(model, slots=1, max_len=32)
    for kwargs, match in [
        (dict(prompt_ids=[]), "empty"),
        (dict(prompt_ids=[1] * 32), "context holds 32"),
        (dict(prompt_ids=[1, 5000]), "vocab|\\[0, 2048\\)"),
        (dict(prompt_ids=[1], max_new_tokens=32), "\\[1, 31\\]"),
        (dict(prompt_ids=[1], max_new_tokens=0), "\\[1, 31\\]"),
        (dict(prompt_ids=[1], temperature=-1.0), "temperature"),
        (dict(prompt_ids=[1], top_p=0.0), "top_p"),
    ]:
        with pytest.raises(ValueError, match=match):
            batcher.submit(**kwargs)
    with pytest.raises(ValueError, match="slots"):
        ContinuousBatcher(model, slots=0)
    with pytest.raises(ValueError, match="max_len"):
        ContinuousBatcher(model, max_len=10_000)


def test_slot_view_writes_each_row_at_its_own_position(shipped):
    model, _ = shipped
    batcher = ContinuousBatcher(model, slots=3, max_len=8)
    cfg = model.config
    key = torch.tensor([1.0, 2.0, 3.0])[:, None, None, None].expand(3, cfg.num_key_value_heads, 1, cfg.head_dim)
    view = SlotView(batcher.buffers, slice(0, 3), torch.tensor([5, 0, 2]))
    k, v = view.update(key, -key, 0)
    buffer = batcher.buffers.key_cache[0]  # (slots, kv_heads, max_len, head_dim)
    assert k.data_ptr() == buffer.data_ptr()  # a view of the shared memory, not a copy
    expected = torch.zeros(3, 8)
    expected[0, 5], expected[1, 0], expected[2, 2] = 1.0, 2.0, 3.0
    assert torch.equal(buffer[:, :, :, :].amax(dim=(1, 3)), expected)
    assert torch.equal(batcher.buffers.value_cache[0].amin(dim=(1, 3)), -expected)
