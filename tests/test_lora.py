"""LoRA: the equation, the layer on any linear base, freezing, merge/unmerge identity, and the
adapter saved in PEFT's layout (loaded by PEFT onto transformers' Llama, and back)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from llama_edu import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification
from llama_edu.files import DEFAULT_MODEL_DIR
from llama_edu.lora import (
    LORA_TARGET_NAMES,
    LoraConfig,
    LoraLinear,
    apply_lora,
    count_parameters,
    load_lora_adapter,
    lora_forward,
    lora_layers,
    merge_and_unload,
    merge_lora,
    save_lora_adapter,
    set_lora_enabled,
    trainable_parameters_report,
    unmerge_lora,
)

from conftest import SMALL, max_diff


def _randomize_adapters(model: nn.Module, seed: int = 0, scale: float = 0.05) -> None:
    """B starts at zero (the adapter is a no-op); give it values so the tests see an effect."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * scale)


@pytest.fixture(scope="module")
def shakespeare_state():
    return LlamaForCausalLM.from_pretrained(DEFAULT_MODEL_DIR).state_dict()


def _shakespeare(state) -> LlamaForCausalLM:
    model = LlamaForCausalLM(LlamaConfig.from_pretrained(DEFAULT_MODEL_DIR)).eval()
    model.load_state_dict(state)
    return model


IDS = torch.tensor([[1, 45, 300, 17, 900, 1200, 5, 77, 2000, 13]])


def test_lora_forward_is_eq3():
    torch.manual_seed(0)
    x, w = torch.randn(3, 5, 16), torch.randn(24, 16)
    a, b = torch.randn(4, 16), torch.randn(24, 4)
    expected = x @ w.T + (8 / 4) * (x @ (b @ a).T)  # W0 x + (alpha/r) B A x, for row vectors
    assert torch.allclose(lora_forward(x, w, a, b, alpha=8, r=4), expected, atol=1e-5)


def test_lora_linear_starts_as_the_base_and_uses_lora_forward():
    torch.manual_seed(0)
    base = nn.Linear(16, 24, bias=False)
    layer = LoraLinear(base, r=4, lora_alpha=8)
    x = torch.randn(2, 3, 16)
    assert torch.equal(layer(x), base(x))  # B = 0 at the start
    assert (layer.lora_B.weight == 0).all() and layer.lora_A.weight.abs().sum() > 0
    nn.init.normal_(layer.lora_B.weight)
    ref = lora_forward(x, base.weight, layer.lora_A.weight, layer.lora_B.weight, 8, 4)
    assert torch.allclose(layer(x), ref, atol=1e-5)
    assert (layer.base_layer is base) and layer.lora_A.weight.shape == (4, 16) and layer.lora_B.weight.shape == (24, 4)
    assert not base.weight.requires_grad and layer.lora_A.weight.requires_grad and layer.lora_B.weight.requires_grad


class FakeInt8Linear(nn.Module):
    """A quantized linear layer as the quant helper would write one: int8 weight, a float scale,
    no float `weight`. LoRA must wrap it without knowing its insides."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach()
        scale = w.abs().amax(dim=1, keepdim=True) / 127
        self.register_buffer("qweight", torch.round(w / scale).to(torch.int8))
        self.register_buffer("scale", scale)

    def forward(self, x):
        return x @ (self.qweight.float() * self.scale).T


def test_lora_on_a_quantized_base_trains_and_refuses_to_merge():
    torch.manual_seed(0)
    base = FakeInt8Linear(nn.Linear(16, 24))
    layer = LoraLinear(base, r=2, lora_alpha=4)
    x = torch.randn(5, 16)
    assert torch.equal(layer(x), base(x))
    layer(x).pow(2).sum().backward()  # gradient reaches B (A's grad is zero while B = 0)
    assert layer.lora_B.weight.grad is not None and layer.lora_B.weight.grad.abs().sum() > 0
    with pytest.raises(TypeError, match="float `weight`"):
        layer.merge()


def test_adapters_follow_the_base_device():
    with torch.device("meta"):
        quantized = FakeInt8Linear(nn.Linear(16, 24))  # buffers only, no parameters
    layer = LoraLinear(quantized, r=2, lora_alpha=4)
    assert layer.lora_A.weight.device.type == "meta" and layer.lora_B.weight.dtype == torch.float32


def test_lora_linear_needs_a_linear_like_base():
    with pytest.raises(TypeError, match="in_features and out_features"):
        LoraLinear(nn.ReLU(), r=2, lora_alpha=4)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(r=0), "rank r must be a positive integer"),
        (dict(r=-2), "rank r must be a positive integer"),
        (dict(r=2.5), "rank r must be a positive integer"),
        (dict(lora_alpha=0), "lora_alpha must be a positive finite"),
        (dict(lora_alpha=-1.0), "lora_alpha must be a positive finite"),
        (dict(lora_alpha=float("inf")), "lora_alpha must be a positive finite"),  # inf x (B = 0) is NaN
        (dict(lora_alpha=float("nan")), "lora_alpha must be a positive finite"),
        (dict(lora_dropout=1.0), "lora_dropout"),
        (dict(target_modules=("q_proj", "query")), r"unknown LoRA target module\(s\) \['query'\]; valid choices are q_proj, k_proj"),
        (dict(target_modules=()), "target_modules is empty"),
    ],
)
def test_bad_config_is_a_clear_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoraConfig(**kwargs)


def test_apply_lora_freezes_all_but_adapters(shakespeare_state):
    model = _shakespeare(shakespeare_state)
    total_before = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        before = model(IDS).logits
    apply_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=("q_proj", "v_proj")))
    cfg = model.config
    q_out, v_out = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    per_layer = 4 * (cfg.hidden_size + q_out) + 4 * (cfg.hidden_size + v_out)
    expected_trainable = cfg.num_hidden_layers * per_layer
    trainable, total = count_parameters(model)
    assert (trainable, total) == (expected_trainable, total_before + expected_trainable)
    assert all(("lora_A" in n or "lora_B" in n) == p.requires_grad for n, p in model.named_parameters())
    assert len(lora_layers(model)) == 2 * cfg.num_hidden_layers
    assert trainable_parameters_report(model).startswith(f"trainable params: {expected_trainable:,d} || all params: {total:,d}")
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, before)  # B = 0: the adapted model is the base model
    # A training step moves adapters only.
    _randomize_adapters(model)
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(IDS, labels=IDS).loss.backward()
    opt.step()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        apply_lora(model, LoraConfig())


def test_target_missing_from_model_names_valid_choices():
    model = LlamaForCausalLM(LlamaConfig(**SMALL))
    with pytest.raises(ValueError, match="modules_to_save names 'classifier'"):
        apply_lora(model, LoraConfig(modules_to_save=("classifier",)))
    assert LORA_TARGET_NAMES == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def test_merge_and_unmerge_keep_the_logits(shakespeare_state):
    model = _shakespeare(shakespeare_state)
    base_q = model.model.layers[0].self_attn.q_proj.weight.clone()
    apply_lora(model, LoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGET_NAMES))
    _randomize_adapters(model, scale=0.2)
    with torch.no_grad():
        adapted = model(IDS).logits
        merge_lora(model)
        merged = model(IDS).logits
        unmerge_lora(model)
        unmerged = model(IDS).logits
    layer = model.model.layers[0].self_attn.q_proj
    assert max_diff(adapted, merged) < 1e-4, max_diff(adapted, merged)
    assert max_diff(adapted, unmerged) < 1e-4
    assert max_diff(layer.base_layer.weight, base_q) < 1e-6  # unmerge restores W0
    assert max_diff(adapted, model(IDS).logits.detach()) < 1e-4
    with pytest.raises(ValueError, match="not merged"):
        unmerge_lora(model)
    # merge_and_unload: a plain model with the original keys and the adapted outputs.
    merge_and_unload(model)
    assert not lora_layers(model) and isinstance(model.model.layers[0].self_attn.q_proj, nn.Linear)
    assert set(model.state_dict()) == set(shakespeare_state)
    with torch.no_grad():
        assert max_diff(model(IDS).logits, adapted) < 1e-4


def test_disabled_adapters_give_the_base_model(shakespeare_state):
    model = _shakespeare(shakespeare_state)
    with torch.no_grad():
        base = model(IDS).logits
    apply_lora(model, LoraConfig(r=4, lora_alpha=8))
    _randomize_adapters(model, scale=0.2)
    set_lora_enabled(model, False)
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, base)
        set_lora_enabled(model, True)
        assert max_diff(model(IDS).logits, base) > 1e-3


def test_save_and_load_adapter_in_peft_layout(tmp_path, shakespeare_state):
    model = _shakespeare(shakespeare_state)
    apply_lora(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05, target_modules=("q_proj", "v_proj")))
    _randomize_adapters(model)
    save_lora_adapter(model, tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["task_type"], cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"]) == ("LORA", "CAUSAL_LM", 4, 8, 0.05)
    assert cfg["target_modules"] == ["q_proj", "v_proj"] and cfg["bias"] == "none" and cfg["use_rslora"] is False
    keys = set(load_file(str(tmp_path / "adapter" / "adapter_model.safetensors")))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.3.self_attn.v_proj.lora_B.weight" in keys
    assert len(keys) == 4 * 2 * 2
    fresh = _shakespeare(shakespeare_state)
    load_lora_adapter(fresh, tmp_path / "adapter")
    model.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(IDS).logits, model(IDS).logits)
    # Wrong folder, wrong model: clear errors.
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_lora_adapter(_shakespeare(shakespeare_state), tmp_path)
    small = LlamaForCausalLM(LlamaConfig(**SMALL))
    with pytest.raises(ValueError, match="does not fit this model: missing keys .*unexpected keys .*layers.2.self_attn"):
        load_lora_adapter(small, tmp_path / "adapter")
    assert not lora_layers(small) and all(p.requires_grad for p in small.parameters())  # left as it came
    with pytest.raises(ValueError, match="saved shape"):
        load_lora_adapter(LlamaForCausalLM(LlamaConfig(**{**SMALL, "num_hidden_layers": 4})), tmp_path / "adapter")
    other = _shakespeare(shakespeare_state)
    apply_lora(other, LoraConfig(r=2, lora_alpha=8))
    with pytest.raises(ValueError, match="do not match the saved ones"):
        load_lora_adapter(other, tmp_path / "adapter")


def test_classification_head_saved_with_the_adapter(tmp_path):
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(LlamaConfig(**SMALL, num_labels=2, pad_token_id=0)).eval()
    apply_lora(model, LoraConfig(r=2, lora_alpha=4, modules_to_save=("score",)))
    assert model.score.weight.requires_grad and not model.model.embed_tokens.weight.requires_grad
    _randomize_adapters(model)
    save_lora_adapter(model, tmp_path)
    keys = set(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert "base_model.model.score.weight" in keys
    assert json.loads((tmp_path / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"
    torch.manual_seed(1)  # a different random head: the saved one must replace it
    fresh = LlamaForSequenceClassification(LlamaConfig(**SMALL, num_labels=2, pad_token_id=0)).eval()
    fresh.model.load_state_dict(model.model.state_dict(), strict=False)
    for name, layer in lora_layers(model).items():  # copy base weights under the adapters
        fresh.get_submodule(name).weight.data.copy_(layer.base_layer.weight)
    load_lora_adapter(fresh, tmp_path)
    ids = torch.tensor([[1, 5, 9, 11]])
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, model(ids).logits)


# -- PEFT, the tool learners use next, reads our adapters and we read its ---------------------------


def _hf_twin(shakespeare_state):
    transformers = pytest.importorskip("transformers")
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig.from_pretrained(DEFAULT_MODEL_DIR)).eval()
    hf.load_state_dict(shakespeare_state)
    return hf


def test_peft_loads_our_adapter_with_the_same_logits(tmp_path, shakespeare_state):
    peft = pytest.importorskip("peft")
    ours = _shakespeare(shakespeare_state)
    apply_lora(ours, LoraConfig(r=4, lora_alpha=8, target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")))
    _randomize_adapters(ours, scale=0.1)
    save_lora_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(_hf_twin(shakespeare_state), str(tmp_path)).eval()
    with torch.no_grad():
        a, b = ours(IDS).logits, theirs(input_ids=IDS).logits
    base = _shakespeare(shakespeare_state)(IDS).logits.detach()
    assert max_diff(a, base) > 1e-2  # the adapter does change the model...
    assert max_diff(a, b) < 1e-5, max_diff(a, b)  # ...and PEFT computes the same change


def test_we_load_an_adapter_peft_saved(tmp_path, shakespeare_state):
    peft = pytest.importorskip("peft")
    hf = _hf_twin(shakespeare_state)
    theirs = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    theirs.save_pretrained(str(tmp_path))
    ours = load_lora_adapter(_shakespeare(shakespeare_state), tmp_path).eval()
    theirs.eval()
    with torch.no_grad():
        assert max_diff(ours(IDS).logits, theirs(input_ids=IDS).logits) < 1e-5


def test_exercise_lora_forward_both_ways(capsys):
    from llama_edu.exercises import check

    def alternative(x, weight, lora_A, lora_B, alpha, r):  # the merged weight, written differently
        return torch.nn.functional.linear(x, weight + (alpha / r) * lora_B @ lora_A)

    assert check("lora_forward", alternative)
    assert check("lora_forward", lambda x, w, a, b, alpha, r: torch.addmm((x @ a.T).flatten(0, -2) @ b.T * (alpha / r), x.flatten(0, -2), w.T).view(*x.shape[:-1], -1))
    capsys.readouterr()
    assert not check("lora_forward", lambda x, w, a, b, alpha, r: x @ w.T + x @ a.T @ b.T)
    assert "Likely mistake: the low-rank update is not scaled by alpha / r." in capsys.readouterr().out
    assert not check("lora_forward", lambda x, w, a, b, alpha, r: x @ w.T + (alpha / r) * (x @ (b @ a)))
    assert "instead of (B A)^T" in capsys.readouterr().out


def test_peft_loads_our_classification_adapter(tmp_path):
    """A sequence-classification adapter with its trained `score` head (modules_to_save) loads in
    PEFT onto transformers' LlamaForSequenceClassification with the same logits."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    kw = {**SMALL, "num_labels": 2, "pad_token_id": 0}
    torch.manual_seed(0)
    theirs = transformers.LlamaForSequenceClassification(transformers.LlamaConfig(**kw)).eval()
    ours = LlamaForSequenceClassification(LlamaConfig(**kw)).eval()
    ours.load_state_dict(theirs.state_dict())
    apply_lora(ours, LoraConfig(r=4, lora_alpha=8, target_modules=("q_proj", "v_proj"), modules_to_save=("score",)))
    _randomize_adapters(ours, scale=0.1)
    with torch.no_grad():
        ours.score.weight.mul_(3.0)  # a "trained" head that differs from the base model's
    save_lora_adapter(ours, tmp_path)
    loaded = peft.PeftModel.from_pretrained(theirs, str(tmp_path)).eval()
    ids = torch.tensor([[1, 5, 9, 11, 40]])
    with torch.no_grad():
        assert max_diff(ours(ids).logits, loaded(input_ids=ids).logits) < 1e-5
