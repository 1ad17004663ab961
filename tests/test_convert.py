"""Meta consolidated.*.pth -> HF layout, and llama2.c model.bin import.

The Meta checkpoints are built from an HF-layout model whose logits we know (q/k un-permuted,
split into model-parallel shards under Meta's key names); after conversion the logits must be
identical. Independently, Meta's own forward (complex-number RoPE) on the Meta-layout weights
must give the same logits as our model: that pins the q/k permutation down without trusting
our inverse of it.
"""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors import safe_open

import llama_edu
from llama_edu import convert
from llama_edu.cli import main
from llama_edu.convert import (
    convert_meta_checkpoint,
    guess_max_position_embeddings,
    load_llama2c,
    merged_meta_state_dict,
    permute_qk,
    read_llama2c,
    stories260k_hf,
    unpermute_qk,
    write_meta_checkpoint,
)
from llama_edu.files import find_data_file
from llama_edu.mlp import swiglu_hidden_size
from llama_edu.reference import reference_forward
from llama_edu.rope import LlamaRotaryEmbedding, apply_rotary_pos_emb

transformers = pytest.importorskip("transformers")

IDS = torch.randint(0, 96, (2, 13), generator=torch.Generator().manual_seed(0))


def small_model(n_kv=8, seed=0, tie=False, vocab=96):
    """A random LlamaForCausalLM whose intermediate_size follows Meta's formula (multiple_of 32)."""
    torch.manual_seed(seed)
    cfg = llama_edu.LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=swiglu_hidden_size(64, 32), num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=n_kv, rms_norm_eps=1e-5, max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    model = llama_edu.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norm weights, so a misplaced norm would show
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


# ============================================================== the permutation itself
def test_permutation_turns_interleaved_rope_into_rotate_half():
    """Meta rotates neighbours (2i, 2i+1) as complex numbers; HF rotates (i, i + d/2) with
    rotate_half. Projecting with the permuted weight and using HF's RoPE must equal projecting
    with Meta's weight, using Meta's RoPE, and permuting the result the same way."""
    n_heads, head_dim, seq = 2, 8, 5
    torch.manual_seed(0)  # unseeded, one draw in a few hundred differed by 1.9e-6 > the 1e-6 allowed
    w = torch.randn(n_heads * head_dim, 16)
    x = torch.randn(1, seq, 16)
    # Meta: complex RoPE on the interleaved projection
    q = (x @ w.T).view(1, seq, n_heads, head_dim)
    freqs = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    cis = torch.polar(torch.ones(seq, head_dim // 2), torch.outer(torch.arange(seq).float(), freqs))
    q_meta = torch.view_as_real(torch.view_as_complex(q.reshape(1, seq, n_heads, -1, 2)) * cis[None, :, None]).flatten(3)
    # HF: rotate_half RoPE on the permuted projection
    q_hf = (x @ permute_qk(w, n_heads).T).view(1, seq, n_heads, head_dim).transpose(1, 2)
    cos, sin = LlamaRotaryEmbedding(head_dim)(torch.arange(seq)[None], seq, torch.float32)
    q_hf, _ = apply_rotary_pos_emb(q_hf, q_hf, cos, sin)
    # Same numbers, in the permuted order
    expected = permute_qk(q_meta[0].reshape(seq, -1).T, n_heads).T.reshape(1, seq, n_heads, head_dim).transpose(1, 2)
    torch.testing.assert_close(q_hf, expected, rtol=0, atol=1e-6)
    # and without the permutation they are not the same
    assert not torch.allclose(q_meta.transpose(1, 2), q_hf, atol=1e-3)


def test_unpermute_inverts_permute():
    w = torch.randn(4 * 16, 24)
    assert torch.equal(unpermute_qk(permute_qk(w, 4), 4), w)
    assert not torch.equal(permute_qk(w, 4), w)


@pytest.mark.parametrize("dim,multiple_of,mult,expected", [
    (4096, 256, None, 11008),  # Llama 2 7B
    (5120, 256, None, 13824),  # 13B
    (8192, 4096, 1.3, 28672),  # 70B
    (4096, 256, 1.3, 14336),   # Llama 3 8B-style
])
def test_swiglu_hidden_size(dim, multiple_of, mult, expected):
    assert swiglu_hidden_size(dim, multiple_of, mult) == expected


def test_max_position_embeddings_rule():
    llama2 = {"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-05, "vocab_size": -1}
    assert guess_max_position_embeddings(llama2) == 4096
    assert guess_max_position_embeddings({**llama2, "norm_eps": 1e-6}) == 2048  # Llama 1
    assert guess_max_position_embeddings({**llama2, "norm_eps": 1e-6}, "7Bf") == 4096
    assert guess_max_position_embeddings({**llama2, "rope_theta": 1e6}) == 16384  # Code Llama
    assert guess_max_position_embeddings({**llama2, "max_seq_len": 512}) == 512


# ============================================================== Meta checkpoints
@pytest.mark.parametrize("n_kv,shards", [(8, 1), (8, 2), (2, 2), (4, 4)], ids=["1-shard", "2-shards", "GQA-2-shards", "GQA-4-shards"])
def test_meta_checkpoint_converts_to_identical_logits(tmp_path, n_kv, shards):
    model = small_model(n_kv=n_kv)
    expected = logits(model)
    write_meta_checkpoint(model, tmp_path / "meta", num_shards=shards)
    assert len(list((tmp_path / "meta").glob("consolidated.*.pth"))) == shards
    params = json.loads((tmp_path / "meta" / "params.json").read_text())
    assert params["vocab_size"] == -1

    # Meta's own forward on Meta's layout gives our model's logits (an independent check).
    meta_sd, params = merged_meta_state_dict(tmp_path / "meta")
    with torch.no_grad():
        torch.testing.assert_close(reference_forward(meta_sd, params, IDS), expected, rtol=0, atol=1e-5)

    shard = "100KB" if shards == 2 else "5GB"  # sharded output once is enough (transformers loads shards slowly)
    config = convert_meta_checkpoint(tmp_path / "meta", tmp_path / "hf", dtype=torch.float32, max_shard_size=shard)
    assert config.vocab_size == 96 and config.num_key_value_heads == n_kv
    ours = llama_edu.LlamaForCausalLM.from_pretrained(tmp_path / "hf", progress=False)
    for (k, a), b in zip(ours.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), k
    assert (logits(ours) - expected).abs().max() == 0.0
    theirs = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf")
    assert (logits(theirs) - expected).abs().max() == 0.0


def test_conversion_without_permutation_is_wrong_and_refused(tmp_path, monkeypatch):
    """The negative control: skip the q/k permutation and the logits change; the check against
    Meta's reference forward, run before anything is written, refuses the conversion."""
    model = small_model()
    write_meta_checkpoint(model, tmp_path / "meta", num_shards=2)
    shards = [convert.load_torch_state_dict(f) for f in sorted((tmp_path / "meta").glob("consolidated.*.pth"))]
    params = json.loads((tmp_path / "meta" / "params.json").read_text())
    assert convert.check_against_reference(shards, params, model.config) < 1e-6
    monkeypatch.setattr(convert, "permute_qk", lambda w, n: w)
    with pytest.raises(ValueError, match=r"differ from Meta's reference forward by .*nothing was written"):
        convert_meta_checkpoint(tmp_path / "meta", tmp_path / "hf", dtype=torch.float32)
    assert not (tmp_path / "hf").exists()


def test_a_release_shape_with_another_head_count_is_refused(tmp_path):
    """A wrong head count that still divides the shapes gives a working, different model: the
    weights alone cannot tell. For the shapes of Meta's releases the head count is known."""
    params = {"dim": 4096, "n_layers": 32, "n_heads": 16, "n_kv_heads": 16}
    with pytest.raises(ValueError, match=r"n_heads=16, but every Meta release with dim=4096 and 32 layers has n_heads=32"):
        convert.check_against_reference([{}], params, None)


def test_meta_conversion_output_files(tmp_path):
    model = small_model(n_kv=2)
    meta = write_meta_checkpoint(model, tmp_path / "meta", num_shards=2)
    tok = find_data_file("llama2-tokenizer.model")
    (meta / "tokenizer.model").write_bytes(tok.read_bytes())
    with pytest.warns(UserWarning, match="32000 pieces but the embedding 96 rows"):
        convert_meta_checkpoint(meta, tmp_path / "hf", max_shard_size="100KB")
    out = tmp_path / "hf"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["torch_dtype"] == "float16" and cfg["max_position_embeddings"] == 4096
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["vocab_size"] == 96
    assert cfg["intermediate_size"] == 192 and cfg["rms_norm_eps"] == 1e-5
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["bos_token_id"] == 1 and gen["eos_token_id"] == 2
    index = json.loads((out / "model.safetensors.index.json").read_text())
    for file in set(index["weight_map"].values()):
        with safe_open(str(out / file), "pt") as f:
            assert all(f.get_tensor(k).dtype == torch.float16 for k in f.keys())
    assert (out / "tokenizer.model").read_bytes() == tok.read_bytes()
    hf_tok = transformers.LlamaTokenizer.from_pretrained(out)
    assert hf_tok("Hello this is a test").input_ids == [1, 15043, 445, 338, 263, 1243]
    # float16 weights are the float32 ones rounded
    ours = llama_edu.LlamaForCausalLM.from_pretrained(out, torch_dtype="auto", progress=False)
    assert ours.dtype == torch.float16
    assert torch.equal(ours.lm_head.weight, model.lm_head.weight.half())


def test_model_size_is_only_a_cross_check(tmp_path):
    write_meta_checkpoint(small_model(), tmp_path / "meta", num_shards=2)
    with pytest.warns(UserWarning, match="7B is released as 1 shard.*holds 2"):
        convert_meta_checkpoint(tmp_path / "meta", tmp_path / "hf", model_size="7B", dtype="float32")
    with pytest.raises(ValueError, match="unknown model_size"):
        convert_meta_checkpoint(tmp_path / "meta", tmp_path / "hf2", model_size="8B")


def test_meta_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a folder"):
        convert_meta_checkpoint(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="params.json is missing"):
        convert_meta_checkpoint(tmp_path / "empty", tmp_path / "out")
    meta = write_meta_checkpoint(small_model(n_kv=2), tmp_path / "meta", num_shards=2)
    (meta / "consolidated.00.pth").unlink()
    with pytest.raises(FileNotFoundError, match="one is missing"):
        convert_meta_checkpoint(meta, tmp_path / "out")
    meta = write_meta_checkpoint(small_model(n_kv=2), tmp_path / "meta2", num_shards=2)
    params = json.loads((meta / "params.json").read_text())
    (meta / "params.json").write_text(json.dumps({**params, "n_kv_heads": 4}))
    with pytest.raises(ValueError, match="n_kv_heads=4"):
        convert_meta_checkpoint(meta, tmp_path / "out")
    (meta / "params.json").write_text(json.dumps({**params, "multiple_of": 256}))
    with pytest.raises(ValueError, match="feed-forward size of 256 .* the weights have 192"):
        convert_meta_checkpoint(meta, tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_meta_pth_with_code_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("ran",))

    meta = write_meta_checkpoint(small_model(), tmp_path / "meta")
    sd = torch.load(meta / "consolidated.00.pth", weights_only=True)
    torch.save({**sd, "trap": Payload()}, meta / "consolidated.00.pth")
    with pytest.raises(OSError, match="refused to load"):
        convert_meta_checkpoint(meta, tmp_path / "out")


def test_cli_convert_meta(tmp_path, capsys):
    model = small_model(n_kv=2)
    write_meta_checkpoint(model, tmp_path / "meta", num_shards=2)
    rc = main(["convert-meta", "--input_dir", str(tmp_path / "meta"), "--output_dir", str(tmp_path / "hf"),
               "--dtype", "float32", "--max_position_embeddings", "2048"])
    assert rc == 0 and "wrote" in capsys.readouterr().out
    ours = llama_edu.LlamaForCausalLM.from_pretrained(tmp_path / "hf", progress=False)
    assert ours.config.max_position_embeddings == 2048
    assert (logits(ours) - logits(model)).abs().max() == 0.0
    rc = main(["convert-meta", "--input_dir", str(tmp_path / "nothing"), "--output_dir", str(tmp_path / "x")])
    assert rc == 1 and "error:" in capsys.readouterr().err


# ============================================================== llama2.c
def write_llama2c(model, path, version):
    """A llama2.c export of an HF-layout model, written the way llama2.c's export.py writes it
    (legacy: 7-int header, freq_cis tables; version 1: "ak42" magic, 256-byte header)."""
    cfg = model.config
    sd = model.state_dict()
    L, nh, nkv, hd = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    shared = cfg.tie_word_embeddings

    def layers(name, fn=lambda t: t):
        return [fn(sd[f"model.layers.{i}.{name}"]) for i in range(L)]

    wq = layers("self_attn.q_proj.weight", lambda t: unpermute_qk(t, nh))
    wk = layers("self_attn.k_proj.weight", lambda t: unpermute_qk(t, nkv))
    rest = {n: layers(n) for n in ("self_attn.v_proj.weight", "self_attn.o_proj.weight", "mlp.gate_proj.weight",
                                  "mlp.down_proj.weight", "mlp.up_proj.weight", "input_layernorm.weight",
                                  "post_attention_layernorm.weight")}
    shape = (cfg.hidden_size, cfg.intermediate_size, L, nh, nkv, cfg.vocab_size, cfg.max_position_embeddings)
    with open(path, "wb") as f:
        if version == 0:
            f.write(struct.pack("<7i", *shape[:5], shape[5] if shared else -shape[5], shape[6]))
            tensors = [sd["model.embed_tokens.weight"], *rest["input_layernorm.weight"], *wq, *wk,
                       *rest["self_attn.v_proj.weight"], *rest["self_attn.o_proj.weight"],
                       *rest["post_attention_layernorm.weight"], *rest["mlp.gate_proj.weight"],
                       *rest["mlp.down_proj.weight"], *rest["mlp.up_proj.weight"], sd["model.norm.weight"]]
            freqs = 1.0 / (10000.0 ** (torch.arange(0, hd, 2).float() / hd))
            angles = torch.outer(torch.arange(shape[6]).float(), freqs)
            tensors += [angles.cos(), angles.sin()]
        else:
            f.write(struct.pack("<I", 0x616B3432) + struct.pack("<i", 1) + struct.pack("<7i", *shape))
            f.write(struct.pack("B", int(shared)))
            f.write(b"\0" * (256 - f.tell()))
            tensors = [*rest["input_layernorm.weight"], *rest["post_attention_layernorm.weight"], sd["model.norm.weight"],
                       sd["model.embed_tokens.weight"], *wq, *wk, *rest["self_attn.v_proj.weight"],
                       *rest["self_attn.o_proj.weight"], *rest["mlp.gate_proj.weight"], *rest["mlp.down_proj.weight"],
                       *rest["mlp.up_proj.weight"]]
        if not shared:
            tensors.append(sd["lm_head.weight"])
        for t in tensors:
            f.write(t.detach().float().contiguous().numpy().astype("<f4").tobytes())
    return path


@pytest.mark.parametrize("version", [0, 1], ids=["legacy", "v1"])
@pytest.mark.parametrize("tie", [True, False], ids=["shared", "unshared"])
def test_llama2c_formats(tmp_path, version, tie):
    model = small_model(n_kv=4, tie=tie)
    path = write_llama2c(model, tmp_path / "model.bin", version)
    loaded = load_llama2c(path)
    assert loaded.config.tie_word_embeddings == tie
    for (k, a), b in zip(loaded.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), k
    assert (logits(loaded) - logits(model)).abs().max() == 0.0


def test_llama2c_errors(tmp_path):
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"GGUF" + b"\xff" * 100)
    with pytest.raises(ValueError, match="not a llama2.c checkpoint"):
        read_llama2c(bad)
    v2 = tmp_path / "v2.bin"
    v2.write_bytes(struct.pack("<Ii", 0x616B3432, 2) + b"\0" * 300)
    with pytest.raises(ValueError, match="version 2"):
        read_llama2c(v2)
    good = write_llama2c(small_model(), tmp_path / "good.bin", 0)
    data = good.read_bytes()
    cut = tmp_path / "cut.bin"
    cut.write_bytes(data[:-100])
    with pytest.raises(ValueError, match="truncated"):
        read_llama2c(cut)
    tiny = tmp_path / "tiny.bin"
    tiny.write_bytes(b"\0" * 10)
    with pytest.raises(ValueError, match="too short"):
        read_llama2c(tiny)
    with pytest.raises(FileNotFoundError):
        read_llama2c(tmp_path / "missing.bin")


def greedy(model, n=60, start=(1,)):
    """Greedy decoding by plain argmax with the KV cache (generation lives elsewhere)."""
    ids = torch.tensor([list(start)])
    new, past = ids, None
    with torch.no_grad():
        for _ in range(n):
            out = model(new, past_key_values=past, use_cache=True)
            new, past = out.logits[:, -1].argmax(-1, keepdim=True), out.past_key_values
            ids = torch.cat([ids, new], dim=1)
    return ids[0].tolist()


def test_stories260k_llama2c_import_matches_hf_form():
    ours = load_llama2c(find_data_file("stories260K/stories260K.bin"))
    theirs = transformers.LlamaForCausalLM.from_pretrained(stories260k_hf())
    sd = theirs.state_dict()
    for k, v in ours.state_dict().items():
        assert torch.equal(v, sd[k]), k
    tokens = greedy(ours)
    assert tokens == greedy(theirs)
    assert len(set(tokens)) > 10  # a real story, not one token repeated


def test_cli_convert_llama2c(tmp_path, capsys):
    src = find_data_file("stories260K/stories260K.bin")
    rc = main(["convert-llama2c", "--input", str(src), "--output_dir", str(tmp_path / "hf")])
    assert rc == 0 and "5 layers" in capsys.readouterr().out
    ref = find_data_file("stories260K/hf")  # the shared copy, made independently of this converter
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["num_key_value_heads"] == 4
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as a, safe_open(str(ref / "model.safetensors"), "pt") as b:
        assert set(a.keys()) == set(b.keys())
        for k in a.keys():
            assert torch.equal(a.get_tensor(k), b.get_tensor(k)), k
    theirs = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf")
    assert theirs.config.tie_word_embeddings
    rc = main(["convert-llama2c", "--input", str(tmp_path / "nope.bin"), "--output_dir", str(tmp_path / "x")])
    assert rc == 1 and "does not exist" in capsys.readouterr().err
