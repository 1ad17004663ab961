"""check() as a learner meets it at its worst: answers that write into their inputs, never return,
call sys.exit, return the right number as the wrong type; and correct answers written in ways the
reference was not (float64 RoPE angles) that must pass."""

from __future__ import annotations

import math
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from llama_edu.exercises import EXERCISES, check


def run(name, fn, capsys, **kw):
    ok = check(name, fn, **kw)
    return ok, capsys.readouterr().out


def test_reference_runs_first_on_pristine_inputs(capsys):
    # An answer that zeros its input, then raises: the reference must still have seen the original.
    seen = []
    ex = EXERCISES["softmax"]
    original = ex.reference
    ex.reference = lambda x, dim: (seen.append(x.clone()), torch.softmax(x, dim))[1]
    try:
        def spoil(x, dim):
            x.fill_(7.0)
            return torch.softmax(x, dim)

        ok, out = run("softmax", spoil, capsys)
    finally:
        ex.reference = original
    assert not ok
    assert not any(bool((t == 7.0).all()) for t in seen)  # the reference never saw the spoiled values


def test_each_call_gets_its_own_copy(capsys):
    calls = []

    def remember(x, dim):
        calls.append(x)
        return torch.softmax(x, dim)

    ok, _ = run("softmax", remember, capsys)
    assert ok
    assert len({id(t) for t in calls}) == len(calls)
    ok, _ = run("softmax", remember, capsys)  # a second check gets fresh tensors too
    assert len({id(t) for t in calls}) == len(calls)


def test_in_place_tensor_mutation_is_a_mistake(capsys):
    def scaled_in_place(x, weight, eps):
        out = x.float()
        out.mul_(torch.rsqrt(out.pow(2).mean(-1, keepdim=True) + eps))
        x.copy_(out.to(x.dtype))  # writes the result into the caller's tensor
        return weight * x

    ok, out = run("rms_norm", scaled_in_place, capsys)
    assert not ok and "`hidden_states` was written to in place" in out, out


def test_mutating_the_layer_is_a_mistake(capsys):
    def decoder_layer(layer, x, cos, sin, mask):
        layer.post_attention_layernorm.weight.data += 0  # harmless
        h = x + layer.self_attn(layer.input_layernorm(x), cos, sin, mask)[0]
        out = h + layer.mlp(layer.post_attention_layernorm(h))
        layer.input_layernorm.weight.data.mul_(2)  # but this changes the model the caller holds
        return out

    ok, out = run("decoder_layer", decoder_layer, capsys)
    assert not ok and "`layer`'s weight `input_layernorm.weight` was changed" in out, out


def test_mutating_the_config_is_a_mistake(capsys):
    def count(config):
        config.tie_word_embeddings = False
        d = config.hidden_size
        per_layer = d * config.head_dim * (2 * config.num_attention_heads + 2 * config.num_key_value_heads) + 3 * d * config.intermediate_size + 2 * d
        return config.vocab_size * d * 2 + config.num_hidden_layers * per_layer + d

    ok, out = run("count_parameters", count, capsys)
    assert not ok and "`config`'s field `tie_word_embeddings` was changed" in out, out


@pytest.mark.parametrize("wrong_type, phrase", [
    (lambda n: float(n), "should be an int, got float"),
    (lambda n: torch.tensor(n), "should be an int, got a tensor"),
    (lambda n: n + 1, "off by +1"),
])
def test_integers_are_compared_by_type_and_value(wrong_type, phrase, capsys):
    from llama_edu.course.exercises.nb06_full_model import _count_reference

    ok, out = run("count_parameters", lambda c: wrong_type(_count_reference(c)), capsys)
    assert not ok and phrase in out, out


def test_an_endless_loop_is_stopped(capsys):
    def spin(x, dim):
        while True:
            pass

    start = time.monotonic()
    ok, out = run("softmax", spin, capsys, timeout=0.5)
    assert time.monotonic() - start < 5
    assert not ok and "did not return within 0.5 s" in out and "It was stopped" in out, out


def test_an_endless_loop_that_catches_exception_is_stopped(capsys):
    def spin(x, dim):
        while True:
            try:
                time.sleep(0.001)
            except Exception:  # the time limit is not an Exception, so this cannot swallow it
                pass

    ok, out = run("softmax", spin, capsys, timeout=0.3)
    assert not ok and "It was stopped" in out, out


def test_a_long_c_call_is_reported_not_waited_for(capsys):
    start = time.monotonic()
    ok, out = run("softmax", lambda x, dim: time.sleep(4) or torch.softmax(x, dim), capsys, timeout=0.3)
    assert time.monotonic() - start < 3.5
    assert not ok and "did not return within 0.3 s" in out and "still runs in the background" in out, out


def test_timeout_from_the_environment(capsys, monkeypatch):
    monkeypatch.setenv("LLAMA_EDU_CHECK_TIMEOUT", "0.2")
    ok, out = run("softmax", lambda x, dim: time.sleep(1.0) or torch.softmax(x, dim), capsys)
    assert not ok and "within 0.2 s" in out


@pytest.mark.parametrize("raiser, phrase", [
    (lambda x, dim: sys.exit(3), "raised SystemExit: 3"),
    (lambda x, dim: exit(), "raised SystemExit"),
    (lambda x, dim: (_ for _ in ()).throw(GeneratorExit("done")), "raised GeneratorExit: done"),
    (lambda x, dim: F.linear(x, torch.ones(3, 5)), "Hint: a matrix product's inner sizes differ"),
])
def test_base_exceptions_are_failed_attempts(raiser, phrase, capsys):
    ok, out = run("softmax", raiser, capsys)
    assert not ok and phrase in out, out


def test_sys_exit_gets_a_hint(capsys):
    ok, out = run("softmax", lambda x, dim: sys.exit(0), capsys)
    assert "a function gives its answer with `return`" in out


def test_the_learners_line_is_shown(capsys):
    def broken(x, dim):
        e = x.exp()
        return e / e.sum(dim, keepdim=True) @ torch.ones(99, 2)

    ok, out = run("softmax", broken, capsys)
    assert not ok and "at line" in out and "torch.ones(99, 2)" in out, out


def test_keyboard_interrupt_goes_through():
    def stop(x, dim):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        check("softmax", stop)


def test_not_callable_is_explained(capsys):
    ok, out = run("softmax", torch.ones(3), capsys)
    assert not ok and "pass your function itself" in out


def _cos_sin(angles):
    angles = torch.cat([angles, angles], -1)
    return angles.cos().float(), angles.sin().float()


ROPE_FORMULATIONS = {
    "float32, 1 / base ** x": lambda p, d, b: _cos_sin(p[..., None].float() * (1.0 / b ** (torch.arange(0, d, 2).float() / d))),
    "float64 throughout": lambda p, d, b: _cos_sin(p[..., None].double() * b ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)),
    "exp and log": lambda p, d, b: _cos_sin(p[..., None].float() * torch.exp(-math.log(b) * torch.arange(0, d, 2).float() / d)),
    "einsum outer": lambda p, d, b: _cos_sin(torch.einsum("bs,f->bsf", p.float(), 1.0 / b ** (torch.arange(d // 2).float() * 2 / d))),
    "python floats": lambda p, d, b: _cos_sin(p[..., None].double() * torch.tensor([b ** (-2 * i / d) for i in range(d // 2)], dtype=torch.float64)),
}


@pytest.mark.parametrize("how", sorted(ROPE_FORMULATIONS))
def test_rope_cos_sin_accepts_every_correct_formulation(how, capsys):
    ok, out = run("rope_cos_sin", ROPE_FORMULATIONS[how], capsys)
    assert ok, out


def test_row_parallel_linear_rejects_one_whole_product(capsys):
    for whole in (lambda x, w, world: F.linear(x, w), lambda x, w, world: x @ w.T, lambda x, w, world: torch.matmul(x, w.t())):
        ok, out = run("row_parallel_linear", whole, capsys)
        assert not ok and "runs over all 8 input features at once" in out, out
    split = lambda x, w, world: sum(F.linear(a, b) for a, b in zip(x.chunk(world, -1), w.chunk(world, 1)))  # noqa: E731
    assert run("row_parallel_linear", split, capsys)[0]


def test_scalar_losses_are_not_called_a_scale_factor(capsys):
    ok, out = run("causal_lm_loss", lambda logits, labels: torch.tensor(1.0), capsys)
    assert not ok and "a scale factor is off" not in out and "expected" in out, out
