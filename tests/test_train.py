"""The training-loop pieces: LR schedule, batches, nats/char, checkpoints, a short run, the CLI."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest
import torch

from llama_edu import LlamaConfig, LlamaForCausalLM
from llama_edu.files import DEFAULT_MODEL_DIR, find_data_file
from llama_edu.cli import build_parser
from llama_edu.train import (TokenDataset, TrainConfig, evaluate, get_batch,
                             load_checkpoint, lr_at, make_optimizer, save_checkpoint, train)

TINY_MODEL = dict(hidden_size=32, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=True)

@pytest.fixture(scope="module")
def shakespeare_slice(tmp_path_factory) -> Path:
    """The first 30,000 characters of tiny Shakespeare, as a file."""
    text = find_data_file("tinyshakespeare.txt").read_text(encoding="utf-8")[:30_000]
    path = tmp_path_factory.mktemp("data") / "slice.txt"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def dataset(shakespeare_slice) -> TokenDataset:
    return TokenDataset(shakespeare_slice)


def test_lr_schedule_shape():
    kw = dict(max_lr=1e-3, warmup_steps=10, total_steps=110, min_lr=1e-4)
    lrs = [lr_at(s, **kw) for s in range(130)]
    assert lrs[0] == pytest.approx(1e-4)  # warm-up starts at max_lr / warmup_steps, not 0
    assert lrs[9] == pytest.approx(1e-3)  # the peak at the end of the warm-up
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10]))  # rising linearly ...
    assert all(a >= b for a, b in zip(lrs[10:110], lrs[11:111]))  # ... then falling
    assert lrs[60] == pytest.approx(1e-4 + 0.5 * 9e-4)  # cosine midpoint: halfway between max and min
    assert lrs[110] == lrs[129] == pytest.approx(1e-4)  # floor after the end


def test_split_is_last_tenth_and_char_lengths_spell_the_text(dataset):
    text = dataset.text
    assert dataset.train_text + dataset.val_text == text
    assert 0.1 * len(text) - 100 < len(dataset.val_text) <= 0.1 * len(text)
    assert dataset.train_text.endswith("\n")
    assert dataset.train[0] == dataset.val[0] == dataset.sp.bos_id()  # one BOS per part, no others
    assert (dataset.train[1:] != dataset.sp.bos_id()).all()
    # Every character is spelled by exactly one token; the "+1" is the dummy-prefix space
    # SentencePiece puts before the first word of each part.
    assert int(dataset.char_lengths[dataset.val].sum()) == len(dataset.val_text) + 1
    assert int(dataset.char_lengths[dataset.train].sum()) == len(dataset.train_text) + 1


def test_get_batch_windows_are_shifted_slices(dataset):
    g = torch.Generator().manual_seed(0)
    x, y = get_batch(dataset.train, 4, 16, g)
    assert x.shape == y.shape == (4, 16)
    assert torch.equal(x[:, 1:], y[:, :-1])
    stream = dataset.train.tolist()
    for row in x.tolist():
        starts = [i for i in range(len(stream) - 16) if stream[i : i + 16] == row]
        assert starts, "a window is not a contiguous slice of the stream"
    with pytest.raises(ValueError, match="block_size"):
        get_batch(dataset.train[:10], 2, 16)


def test_evaluate_nats_per_char_arithmetic(dataset):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=dataset.vocab_size, max_position_embeddings=32, **TINY_MODEL)).eval()
    block = 32
    res = evaluate(model, dataset.val, dataset.char_lengths, block, batch_size=8)
    # By hand: all full non-overlapping windows, summed cross-entropy / tokens and / characters.
    n = (len(dataset.val) - 1) // block
    x = torch.stack([dataset.val[i * block : (i + 1) * block] for i in range(n)])
    y = torch.stack([dataset.val[i * block + 1 : (i + 1) * block + 1] for i in range(n)])
    with torch.no_grad():
        logits = model(input_ids=x).logits
    nats = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum").item()
    chars = int(dataset.char_lengths[y].sum())
    assert res["tokens"] == n * block and res["chars"] == chars
    assert res["loss"] == pytest.approx(nats / (n * block), rel=1e-5)
    assert res["nats_per_char"] == pytest.approx(nats / chars, rel=1e-5)
    assert res["nats_per_char"] == pytest.approx(res["loss"] * res["tokens"] / res["chars"], rel=1e-9)
    assert res["loss"] == pytest.approx(math.log(dataset.vocab_size), abs=0.2)  # untrained: ~uniform


def test_optimizer_decays_matrices_only():
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, max_position_embeddings=16, **TINY_MODEL))
    decay, no_decay = make_optimizer(model, 1e-3, 0.1).param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))  # tied head once


def test_loss_decreases_on_shakespeare(dataset, tmp_path):
    cfg = TrainConfig(data="", out_dir=str(tmp_path), model={**TINY_MODEL}, steps=40, batch_size=8, block_size=32,
                      lr=3e-3, warmup_steps=5, eval_interval=20, eval_batches=4, log_interval=1000, seed=0)
    history = train(cfg, dataset=dataset, log=lambda s: None)
    train_losses = [loss for _, loss in history["train"]]
    assert sum(train_losses[-5:]) / 5 < train_losses[0] - 1.0
    val = [loss for _, loss, _ in history["val"]]
    assert len(val) == 2 and val[-1] < math.log(dataset.vocab_size) - 1.0
    assert history["best"]["val_loss"] == min(val)
    assert history["tokens_seen"] == 40 * 8 * 32
    # The returned model holds the best weights, and so does the best/ checkpoint.
    reloaded = load_checkpoint(tmp_path / "best")
    res = evaluate(reloaded, dataset.val, dataset.char_lengths, 32, 8, max_batches=4)
    assert res["loss"] == pytest.approx(history["best"]["val_loss"], rel=1e-5)
    assert json.loads((tmp_path / "best" / "train_state.json").read_text())["step"] == history["best"]["step"]


def test_checkpoint_is_atomic_and_reloads(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, max_position_embeddings=16, **TINY_MODEL)).eval()
    save_checkpoint(model, tmp_path, {"step": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors", "train_state.json"]
    reloaded = load_checkpoint(tmp_path).eval()
    ids = torch.randint(0, 64, (2, 8))
    assert torch.equal(model(ids).logits, reloaded(ids).logits)
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight  # still tied

    # A save that dies while writing the weights leaves the previous files whole and no
    # temporary file behind.
    import llama_edu.checkpoint as checkpoint

    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def dies_midway(tensors, path, safe_serialization):
        Path(path).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "_write_weights", dies_midway)
    with torch.no_grad():
        model.model.norm.weight.add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(model, tmp_path, {"step": 2})
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    monkeypatch.undo()
    save_checkpoint(model, tmp_path, {"step": 2})  # and a save that succeeds replaces them
    assert torch.equal(load_checkpoint(tmp_path).model.norm.weight, model.model.norm.weight)
    assert json.loads((tmp_path / "train_state.json").read_text()) == {"step": 2}


def test_cli_trains_five_steps(shakespeare_slice, tmp_path, capsys):
    from llama_edu.cli import main  # python -m llama_edu

    out = tmp_path / "run"
    argv = ["train", "--data", str(shakespeare_slice), "--out", str(out), "--steps", "5", "--batch-size", "4",
            "--block-size", "32", "--hidden-size", "32", "--num-hidden-layers", "1", "--num-attention-heads", "4",
            "--eval-batches", "2", "--seed", "3", "--threads", "1"]
    assert main(argv) == 0
    assert "best val" in capsys.readouterr().out
    history = json.loads((out / "history.json").read_text())
    assert history["steps"] == 5 and len(history["train"]) == 5
    config = json.loads((out / "best" / "config.json").read_text())
    assert config["hidden_size"] == 32 and config["vocab_size"] == 2048 and config["num_hidden_layers"] == 1
    assert load_checkpoint(out / "last").config.max_position_embeddings >= 32


def test_cli_missing_data_is_a_clear_error(tmp_path):
    args = build_parser().parse_args(["train", "--data", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "o")])
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        args.func(args)
    assert not (tmp_path / "o").exists()  # nothing written for a run that could not start


def test_default_model_loads_in_both_libraries_with_equal_logits():
    transformers = pytest.importorskip("transformers")
    ours = LlamaForCausalLM.from_pretrained(DEFAULT_MODEL_DIR).eval()
    theirs = transformers.LlamaForCausalLM.from_pretrained(DEFAULT_MODEL_DIR).eval()
    tok = transformers.AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR, use_fast=False)
    ids = tok("ROMEO:\nBut soft, what light through yonder window breaks?", return_tensors="pt").input_ids
    assert ids[0, 0] == 1  # BOS, as in training
    with torch.no_grad():
        a, b = ours(input_ids=ids).logits, theirs(ids).logits
    assert (a - b).abs().max().item() < 1e-5
    # Trained, not random: the next-token loss on this Shakespeare line is far below uniform.
    loss = torch.nn.functional.cross_entropy(a[0, :-1], ids[0, 1:]).item()
    assert loss < math.log(ours.config.vocab_size) - 2.0
