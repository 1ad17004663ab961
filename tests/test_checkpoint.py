"""Saving and loading in the Hugging Face layout: round trips with transformers 4.37.2 in both
directions (float32 / float16 / bfloat16, single file and shards, safetensors and pickle), dtype
semantics, base-model prefixes, atomic saves and clear errors."""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import llama_edu
from llama_edu import checkpoint
from llama_edu.convert import stories260k_hf
from llama_edu.checkpoint import parse_size, resolve_file

from conftest import SMALL, max_diff, twins

transformers = pytest.importorskip("transformers")

IDS = torch.randint(3, 97, (2, 11), generator=torch.Generator().manual_seed(1))
SHARD = "110KB"  # SMALL has ~300 KB of float32 weights: four shards


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def weight_files(d):
    return sorted(f for f in os.listdir(d) if f.endswith((".safetensors", ".bin")))


@pytest.fixture(scope="module")
def hf_model():
    theirs, _ = twins()
    return theirs


# -------------------------------------------------------------------- transformers -> ours
@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "pickle"])
@pytest.mark.parametrize("shard", [None, SHARD], ids=["single", "sharded"])
def test_transformers_checkpoint_loads_here(tmp_path, hf_model, safe, shard):
    kw = {"max_shard_size": shard} if shard else {}
    hf_model.save_pretrained(tmp_path, safe_serialization=safe, **kw)
    files = weight_files(tmp_path)
    assert (len(files) > 1) == bool(shard), files
    assert all(f.endswith(".safetensors" if safe else ".bin") for f in files)
    ours = llama_edu.LlamaForCausalLM.from_pretrained(tmp_path, progress=False)
    assert not ours.training
    assert max_diff(logits(ours), logits(hf_model)) == 0.0


# -------------------------------------------------------------------- ours -> transformers
@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "pickle"])
@pytest.mark.parametrize("shard", [None, SHARD], ids=["single", "sharded"])
def test_our_checkpoint_loads_in_transformers(tmp_path, safe, shard):
    _, ours = twins(seed=3)
    kw = {"max_shard_size": shard} if shard else {}
    ours.save_pretrained(tmp_path, safe_serialization=safe, **kw)
    files = weight_files(tmp_path)
    assert (len(files) > 1) == bool(shard), files
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["torch_dtype"] == "float32"
    theirs = transformers.LlamaForCausalLM.from_pretrained(tmp_path)
    assert max_diff(logits(theirs), logits(ours)) == 0.0
    again = llama_edu.LlamaForCausalLM.from_pretrained(tmp_path, progress=False)
    assert max_diff(logits(again), logits(ours)) == 0.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_round_trip(tmp_path, dtype):
    _, ours = twins(seed=4)
    ours = ours.to(dtype)
    ours.save_pretrained(tmp_path / "ours", max_shard_size=SHARD)
    cfg = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert cfg["torch_dtype"] == str(dtype).split(".")[1]
    first = sorted((tmp_path / "ours").glob("*.safetensors"))[0]
    with safe_open(str(first), "pt") as f:
        assert all(f.get_tensor(k).dtype == dtype for k in f.keys())
    # Both libraries upcast to float32 by default: identical weights give identical logits.
    theirs = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "ours")
    back = llama_edu.LlamaForCausalLM.from_pretrained(tmp_path / "ours", progress=False)
    assert back.dtype == theirs.dtype == torch.float32
    assert max_diff(logits(theirs), logits(back)) == 0.0
    # "auto" keeps the stored dtype, bit for bit.
    auto = llama_edu.LlamaForCausalLM.from_pretrained(tmp_path / "ours", torch_dtype="auto", progress=False)
    assert auto.dtype == dtype
    for (k, a), b in zip(auto.state_dict().items(), ours.state_dict().values()):
        assert torch.equal(a, b), k
    # ... and transformers saves the same thing back.
    theirs_half = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "ours", torch_dtype=dtype)
    theirs_half.save_pretrained(tmp_path / "theirs")
    again = llama_edu.LlamaForCausalLM.from_pretrained(tmp_path / "theirs", torch_dtype=dtype, progress=False)
    assert max_diff(logits(again), logits(auto)) == 0.0


def test_dtype_semantics(tmp_path):
    _, ours = twins(seed=5)
    ours.to(torch.float16).save_pretrained(tmp_path)
    load = lambda **kw: llama_edu.LlamaForCausalLM.from_pretrained(tmp_path, progress=False, **kw)  # noqa: E731
    assert load().dtype == torch.float32  # default: float32, whatever the file holds
    assert load(torch_dtype="auto").dtype == torch.float16  # config.json's torch_dtype
    assert load(torch_dtype="bfloat16").dtype == torch.bfloat16
    assert load(torch_dtype=torch.float32).dtype == torch.float32
    # "auto" without torch_dtype in config.json: the weights' dtype
    cfg = json.loads((tmp_path / "config.json").read_text())
    del cfg["torch_dtype"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert load(torch_dtype="auto").dtype == torch.float16
    with pytest.raises(ValueError, match="torch_dtype"):
        load(torch_dtype="int8")


def test_stories260k_matches_transformers():
    path = stories260k_hf()
    ours = llama_edu.LlamaForCausalLM.from_pretrained(path)
    theirs = transformers.LlamaForCausalLM.from_pretrained(path)
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(0))
    assert max_diff(logits(ours, ids), logits(theirs, ids)) == 0.0
    assert ours.lm_head.weight is ours.model.embed_tokens.weight  # tied: lm_head is not in the file


def test_tied_weights_are_not_written(tmp_path):
    ours = llama_edu.LlamaForCausalLM.from_pretrained(stories260k_hf())
    ours.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys
    theirs = transformers.LlamaForCausalLM.from_pretrained(tmp_path)
    assert theirs.lm_head.weight.data_ptr() == theirs.model.embed_tokens.weight.data_ptr()
    assert max_diff(logits(theirs, IDS % 512), logits(ours, IDS % 512)) == 0.0


def test_index_file_format(tmp_path):
    _, ours = twins(seed=6)
    ours.save_pretrained(tmp_path, max_shard_size=SHARD)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = weight_files(tmp_path)
    n = len(files)
    assert files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    sd = ours.state_dict()
    assert set(index["weight_map"]) == set(sd)  # untied: lm_head is there
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in sd.values())
    for key, file in index["weight_map"].items():
        with safe_open(str(tmp_path / file), "pt") as f:
            assert key in f.keys()
            assert f.metadata() == {"format": "pt"}


def test_resaving_removes_stale_shards(tmp_path):
    _, ours = twins(seed=6)
    ours.save_pretrained(tmp_path, max_shard_size=SHARD)
    ours.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    assert max_diff(logits(llama_edu.LlamaForCausalLM.from_pretrained(tmp_path)), logits(ours)) == 0.0


@pytest.mark.parametrize("size,expected", [(123, 123), ("10MB", 10**7), ("5GB", 5 * 10**9), ("1MiB", 2**20), ("2KiB", 2048), ("500kb", 500_000)])
def test_parse_size(size, expected):
    assert parse_size(size) == expected


@pytest.mark.parametrize("bad", ["ten MB", "-5MB", 0, "5XB"])
def test_parse_size_rejects(bad):
    with pytest.raises(ValueError, match="max_shard_size"):
        parse_size(bad)


# -------------------------------------------------------------------- base-model prefix
def test_causal_checkpoint_into_base_model(tmp_path, hf_model):
    hf_model.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match=r"not used when initializing LlamaModel: \['lm_head.weight'\]"):
        base = llama_edu.LlamaModel.from_pretrained(tmp_path, progress=False)
    with torch.no_grad():
        expected = hf_model.model(IDS).last_hidden_state
        assert max_diff(base(IDS).last_hidden_state, expected) == 0.0


def test_base_checkpoint_into_head_models(tmp_path, hf_model):
    hf_model.model.save_pretrained(tmp_path)  # transformers' LlamaModel: keys without "model."
    with pytest.warns(UserWarning, match=r"newly initialized: \['lm_head.weight'\]"):
        lm = llama_edu.LlamaForCausalLM.from_pretrained(tmp_path, progress=False)
    for k, v in hf_model.model.state_dict().items():
        assert torch.equal(lm.model.state_dict()[k], v), k
    assert lm.lm_head.weight.std() > 0  # freshly initialised, not left empty


def test_classification_from_causal_checkpoint(tmp_path, hf_model):
    hf_model.save_pretrained(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        clf = llama_edu.LlamaForSequenceClassification.from_pretrained(tmp_path, num_labels=3, progress=False)
    text = " ".join(str(w.message) for w in caught)
    assert "newly initialized: ['score.weight']" in text and "not used" in text and "lm_head.weight" in text
    assert clf.score.weight.shape == (3, 64) and clf.config.num_labels == 3
    assert torch.equal(clf.model.embed_tokens.weight, hf_model.model.embed_tokens.weight)
    # transformers builds the same body
    theirs = transformers.LlamaForSequenceClassification.from_pretrained(tmp_path, num_labels=3)
    with torch.no_grad():
        assert max_diff(clf.model(IDS).last_hidden_state, theirs.model(IDS).last_hidden_state) == 0.0


def test_config_overrides_and_unknown_arguments(tmp_path, hf_model):
    hf_model.save_pretrained(tmp_path)
    m = llama_edu.LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="eager", rms_norm_eps=1e-3, progress=False)
    assert m.config.attn_implementation == "eager" and m.config.rms_norm_eps == 1e-3
    with pytest.raises(TypeError, match="hidden_sise"):
        llama_edu.LlamaForCausalLM.from_pretrained(tmp_path, hidden_sise=3)
    with pytest.raises(ValueError, match="device"):
        llama_edu.LlamaForCausalLM.from_pretrained(tmp_path, device="gpu0")


# -------------------------------------------------------------------- errors
@pytest.fixture
def saved(tmp_path, hf_model):
    d = tmp_path / "ckpt"
    hf_model.save_pretrained(d)
    return d


def _edit_weights(d, fn):
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
    save_file(fn(sd), str(d / "model.safetensors"), metadata={"format": "pt"})


def test_missing_keys_are_listed(saved):
    _edit_weights(saved, lambda sd: {k: v for k, v in sd.items() if "layers.1.mlp.up_proj" not in k})
    with pytest.raises(ValueError, match=r"missing keys \(1\): \['model.layers.1.mlp.up_proj.weight'\]"):
        llama_edu.LlamaForCausalLM.from_pretrained(saved)


def test_unexpected_keys_are_listed(saved):
    _edit_weights(saved, lambda sd: {**sd, "model.layers.0.extra.weight": torch.zeros(2)})
    with pytest.raises(ValueError, match=r"unexpected keys \(1\): \['model.layers.0.extra.weight'\]"):
        llama_edu.LlamaForCausalLM.from_pretrained(saved)


def test_old_rotary_buffers_are_ignored(saved):
    _edit_weights(saved, lambda sd: {**sd, "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4)})
    llama_edu.LlamaForCausalLM.from_pretrained(saved)


def test_shape_mismatch_is_named(saved):
    _edit_weights(saved, lambda sd: {**sd, "model.layers.0.mlp.gate_proj.weight": torch.zeros(112, 63)})
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.gate_proj.weight: expected \(112, 64\), found \(112, 63\)"):
        llama_edu.LlamaForCausalLM.from_pretrained(saved)


def test_config_that_does_not_match_the_weights(saved):
    cfg = json.loads((saved / "config.json").read_text())
    cfg["hidden_size"], cfg["num_hidden_layers"] = 32, 3
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError) as e:
        llama_edu.LlamaForCausalLM.from_pretrained(saved)
    msg = str(e.value)
    assert "config does not match the weights" in msg
    assert "hidden_size=32 but the weights have 64" in msg
    assert "num_hidden_layers=3 but the weights have 2 layers" in msg


def test_path_that_does_not_exist(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        llama_edu.LlamaForCausalLM.from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_file("./no/such/dir/x", "config.json")


def test_folder_without_weights_or_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json is missing from the folder"):
        llama_edu.LlamaForCausalLM.from_pretrained(tmp_path)
    llama_edu.LlamaConfig(**SMALL).save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="no weights in .*model.safetensors"):
        llama_edu.LlamaForCausalLM.from_pretrained(tmp_path)


def test_index_naming_a_missing_shard(tmp_path, hf_model):
    hf_model.save_pretrained(tmp_path, max_shard_size=SHARD)
    victim = weight_files(tmp_path)[1]
    (tmp_path / victim).unlink()
    with pytest.raises(FileNotFoundError, match=f"names the shard {victim}, which is missing"):
        llama_edu.LlamaForCausalLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "pickle"])
def test_truncated_file_names_the_file(tmp_path, hf_model, safe):
    hf_model.save_pretrained(tmp_path, safe_serialization=safe)
    f = tmp_path / ("model.safetensors" if safe else "pytorch_model.bin")
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(OSError, match=f"could not read .*{f.name}.*corrupt or truncated"):
        llama_edu.LlamaForCausalLM.from_pretrained(tmp_path)


class _RunsCodeOnLoad:
    """A pickle payload that calls a function when unpickled (harmless: print)."""

    def __reduce__(self):
        return (print, ("this ran while unpickling",))


def test_pickle_with_code_is_refused(tmp_path, hf_model):
    hf_model.config.save_pretrained(tmp_path)
    sd = dict(hf_model.state_dict())
    sd["trap"] = _RunsCodeOnLoad()
    torch.save(sd, tmp_path / "pytorch_model.bin")
    with pytest.raises(OSError, match="refused to load .*pytorch_model.bin"):
        llama_edu.LlamaForCausalLM.from_pretrained(tmp_path)


# -------------------------------------------------------------------- hub ids, offline
def test_repo_id_offline_says_what_to_download(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty hub cache
    with pytest.raises(OSError, match=r"huggingface-cli download meta-llama/Llama-2-7b-hf --local-dir DIR"):
        resolve_file("meta-llama/Llama-2-7b-hf", "config.json")
    with pytest.raises(OSError, match="HF_HUB_OFFLINE"):
        llama_edu.LlamaConfig.from_pretrained("meta-llama/Llama-2-7b-hf")


def test_repo_id_without_huggingface_hub(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails
    with pytest.raises(OSError, match="huggingface_hub is not installed.*huggingface-cli download TinyLlama/x"):
        resolve_file("TinyLlama/x", "config.json")


def test_repo_id_downloads_through_hf_hub(monkeypatch, tmp_path):
    import huggingface_hub

    calls = []

    def fake_download(repo_id, filename, **kw):
        calls.append((repo_id, filename))
        (tmp_path / filename).write_text("{}")
        return str(tmp_path / filename)

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    assert resolve_file("org/model", "config.json") == tmp_path / "config.json"
    assert calls == [("org/model", "config.json")]


def test_local_folder_missing_file_names_both(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"tokenizer.model is missing from the folder .*"):
        resolve_file(tmp_path, "tokenizer.model")
    assert resolve_file(tmp_path, "tokenizer.model", missing_ok=True) is None


# -------------------------------------------------------------------- atomic saves
def _failing_on_call(n):
    real = checkpoint._write_weights
    count = {"n": 0}

    def write(tensors, path, safe):
        count["n"] += 1
        if count["n"] == n:
            path.write_bytes(b"half a shard")  # a partial file, then the failure
            raise OSError("disk full (simulated)")
        real(tensors, path, safe)

    return write


def test_interrupted_save_leaves_nothing(tmp_path, monkeypatch):
    _, ours = twins(seed=7)
    monkeypatch.setattr(checkpoint, "_write_weights", _failing_on_call(2))
    with pytest.raises(OSError, match="disk full"):
        ours.save_pretrained(tmp_path, max_shard_size=SHARD)
    assert os.listdir(tmp_path) == []


def test_interrupted_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    _, old = twins(seed=8)
    old.save_pretrained(tmp_path, max_shard_size=SHARD)
    before = {f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path)}
    _, new = twins(seed=9)
    monkeypatch.setattr(checkpoint, "_write_weights", _failing_on_call(3))
    with pytest.raises(OSError, match="disk full"):
        new.save_pretrained(tmp_path, max_shard_size=SHARD)
    assert {f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path)} == before
    monkeypatch.undo()
    assert max_diff(logits(llama_edu.LlamaForCausalLM.from_pretrained(tmp_path, progress=False)), logits(old)) == 0.0


def test_loading_builds_on_meta_device_without_initialising(tmp_path, hf_model, monkeypatch):
    """The model is built without storage and without random initialisation (the checkpoint
    overwrites every weight): nothing is computed twice and peak memory is one copy. The skip
    is thread-local: nothing global (nn.init, _init_weights) is patched."""
    from torch.utils._python_dispatch import TorchDispatchMode

    hf_model.save_pretrained(tmp_path)

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.append(func.__name__)
            return func(*args, **(kwargs or {}))

    built_on = []
    real_new = llama_edu.LlamaForCausalLM.__init__

    def spy_init(self, config):
        real_new(self, config)
        built_on.append(self.lm_head.weight.device.type)

    monkeypatch.setattr(llama_edu.LlamaForCausalLM, "__init__", spy_init)
    real_normal, real_init = torch.nn.init.normal_, llama_edu.LlamaPreTrainedModel._init_weights
    with Ops() as ops:
        m = llama_edu.LlamaForCausalLM.from_pretrained(tmp_path, progress=False)
    assert built_on == ["meta"]
    inits = [op for op in ops.seen if op.split(".")[0] in ("normal_", "uniform_", "zero_", "fill_")]
    assert inits == [], inits
    assert all(p.device.type == "cpu" for p in m.parameters())
    assert torch.nn.init.normal_ is real_normal and llama_edu.LlamaPreTrainedModel._init_weights is real_init
    fresh = llama_edu.LlamaForCausalLM(llama_edu.LlamaConfig(**SMALL))
    assert 0.01 < fresh.lm_head.weight.std() < 0.03  # initialised as usual outside the load


def test_classification_round_trip_with_transformers(tmp_path):
    theirs, ours = twins("LlamaForSequenceClassification", seed=10, num_labels=3, pad_token_id=0)
    ours.save_pretrained(tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["architectures"] == ["LlamaForSequenceClassification"]
    back = transformers.LlamaForSequenceClassification.from_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    again = llama_edu.LlamaForSequenceClassification.from_pretrained(tmp_path / "theirs", progress=False)
    assert again.config.num_labels == 3 and again.config.pad_token_id == 0
    with torch.no_grad():
        expected = theirs(IDS).logits
        assert max_diff(back(IDS).logits, expected) == 0.0
        assert max_diff(again(IDS).logits, expected) == 0.0


def test_cpu_load_in_the_stored_dtype_is_zero_copy(tmp_path):
    """Parameters are views of the memory-mapped file (private, copy-on-write): in-place changes
    work and never reach the file, and an atomic save over the folder leaves the loaded model intact."""
    torch.manual_seed(0)
    src = llama_edu.LlamaForCausalLM(llama_edu.LlamaConfig(**SMALL))
    src.save_pretrained(tmp_path)
    model = llama_edu.LlamaForCausalLM.from_pretrained(tmp_path)
    storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert len(storages) == 1  # every parameter lives in the one mapping of model.safetensors
    if Path("/proc/self/maps").exists():
        assert str(tmp_path / "model.safetensors") in Path("/proc/self/maps").read_text()
    ids = torch.randint(0, SMALL["vocab_size"], (1, 6))
    with torch.no_grad():
        before = model(ids).logits
        model.lm_head.weight.mul_(2)  # copy-on-write: only this process sees it
    reloaded = llama_edu.LlamaForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(reloaded.lm_head.weight, src.lm_head.weight)
    with torch.no_grad():
        model.lm_head.weight.div_(2)
        assert torch.equal(model(ids).logits, before)
    torch.manual_seed(1)
    llama_edu.LlamaForCausalLM(llama_edu.LlamaConfig(**SMALL)).save_pretrained(tmp_path)  # replaces the file
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)  # the mapped (old) file is still what we read
    converted = llama_edu.LlamaForCausalLM.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    assert len({p.untyped_storage().data_ptr() for p in converted.parameters()}) > 1  # converted: copies
