"""LlamaConfig: the HF fields and defaults, config.json round trips, and clear errors."""

from __future__ import annotations

import json

import pytest

from llama_edu import PRESETS, LlamaConfig

HF_DEFAULTS = dict(
    vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=32, hidden_act="silu", max_position_embeddings=2048,
    initializer_range=0.02, rms_norm_eps=1e-6, use_cache=True, pad_token_id=None, bos_token_id=1,
    eos_token_id=2, pretraining_tp=1, tie_word_embeddings=False, rope_theta=10000.0, rope_scaling=None,
    attention_bias=False, attention_dropout=0.0,
)


def test_defaults_are_the_documented_ones():
    cfg = LlamaConfig()
    for k, v in HF_DEFAULTS.items():
        assert getattr(cfg, k) == v, k
    assert cfg.head_dim == 128 and cfg.attn_implementation == "sdpa"


def test_defaults_agree_with_transformers():
    transformers = pytest.importorskip("transformers")
    theirs = transformers.LlamaConfig()
    for k in HF_DEFAULTS:
        assert getattr(theirs, k) == getattr(LlamaConfig(), k), k


def test_real_hf_config_json_loads_and_round_trips(tmp_path):
    transformers = pytest.importorskip("transformers")
    hf = transformers.LlamaConfig(hidden_size=256, num_attention_heads=8, num_key_value_heads=2,
                                  rope_scaling={"type": "linear", "factor": 4.0}, my_extra_field=7)
    hf.save_pretrained(tmp_path)
    with open(tmp_path / "config.json") as f:
        raw = json.load(f)
    ours = LlamaConfig(**raw)
    assert ours.num_key_value_heads == 2 and ours.rope_scaling == {"type": "linear", "factor": 4.0}
    assert ours.my_extra_field == 7  # unknown keys are kept
    out = tmp_path / "ours"
    ours.save_pretrained(out)
    assert LlamaConfig.from_pretrained(out) == ours
    back = transformers.LlamaConfig.from_pretrained(out)
    for k in HF_DEFAULTS:
        assert getattr(back, k) == getattr(ours, k), k
    assert not list(out.glob("*.tmp"))  # atomic write left no temporary file


def test_extra_kwargs_and_labels():
    cfg = LlamaConfig(num_labels=3, problem_type="single_label_classification", foo="bar")
    assert cfg.num_labels == 3 and cfg.id2label == {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}
    again = LlamaConfig(**cfg.to_dict())
    assert again.num_labels == 3 and again.foo == "bar" and again == cfg


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(hidden_size=100, num_attention_heads=8), "hidden_size.*divisible by num_attention_heads"),
        (dict(num_attention_heads=32, num_key_value_heads=5), "num_key_value_heads"),
        (dict(rope_scaling={"type": "yarn", "factor": 2.0}), "rope_scaling\\['type'\\]"),
        (dict(rope_scaling={"type": "linear", "factor": 1.0}), "factor.*> 1"),
        (dict(rope_scaling={"type": "linear", "factor": 2}), "factor"),
        (dict(rope_scaling={"type": "linear"}), "exactly the fields"),
        (dict(hidden_act="tanh"), "hidden_act"),
        (dict(attn_implementation="flash"), "attn_implementation"),
        (dict(num_hidden_layers=0), "num_hidden_layers"),
        (dict(vocab_size=10, pad_token_id=10), "resize_token_embeddings"),
    ],
)
def test_invalid_values_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LlamaConfig(**kwargs)


def test_not_a_llama_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="gpt2"):
        LlamaConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        LlamaConfig.from_pretrained(tmp_path)


def test_presets():
    assert set(PRESETS) >= {"llama2-7b", "llama2-13b", "llama2-70b", "tiny"}
    c70 = LlamaConfig.from_preset("llama2-70b")
    assert (c70.num_attention_heads, c70.num_key_value_heads, c70.max_position_embeddings) == (64, 8, 4096)
    with pytest.raises(ValueError, match="unknown preset"):
        LlamaConfig.from_preset("llama3")
