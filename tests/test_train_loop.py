"""The training loop's guarantees on tiny Shakespeare: gradient accumulation equals a bigger
batch, stop + resume is bit-identical, precision and compile options, the progress bar, and the
faults of issue 9 (Ctrl-C, kill -9 during a save, non-finite loss, bad arguments, an existing
--out), with real signals sent to real subprocesses where the fault is a signal."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llama_edu import LlamaConfig, LlamaForCausalLM
from llama_edu.files import REPO_ROOT, find_data_file
from llama_edu.atomic_save import recover_folder
from llama_edu.train import (NonFiniteLossError, TokenDataset, TrainConfig, TrainingInterrupted, load_checkpoint,
                             save_checkpoint, train, train_step)

TINY_MODEL = dict(hidden_size=32, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=True)
QUIET = lambda s: None  # noqa: E731
ENV = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    text = find_data_file("tinyshakespeare.txt").read_text(encoding="utf-8")[:30_000]
    path = tmp_path_factory.mktemp("data") / "slice.txt"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def dataset(text_file) -> TokenDataset:
    return TokenDataset(text_file)


def tiny_config(out=None, **kw) -> TrainConfig:
    base = dict(data="", out_dir=str(out) if out else None, model={**TINY_MODEL}, steps=12, batch_size=4, block_size=32,
                lr=3e-3, warmup_steps=3, eval_interval=4, eval_batches=2, log_interval=1000, seed=0, threads=1)
    return TrainConfig(**{**base, **kw})


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


# ----------------------------------------------------------------------------- accumulation
def test_accumulated_micro_batches_give_the_big_batch_update(dataset):
    """4 micro-batches of 2 windows and one batch of the same 8 windows: the same SGD step
    (SGD, so the size of the gradient shows; Adam would hide a missing 1/n)."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=dataset.vocab_size, max_position_embeddings=32, **TINY_MODEL))
    twin = copy.deepcopy(model)
    x = torch.stack([dataset.train[i * 100 : i * 100 + 32] for i in range(8)])
    y = torch.stack([dataset.train[i * 100 + 1 : i * 100 + 33] for i in range(8)])
    for clip in (0.0, 0.05):  # without clipping, and with a clip that binds
        a, b = copy.deepcopy(model), copy.deepcopy(twin)
        loss_a = train_step(a, torch.optim.SGD(a.parameters(), lr=1.0), list(zip(x.split(2), y.split(2))), grad_clip=clip)
        loss_b = train_step(b, torch.optim.SGD(b.parameters(), lr=1.0), [(x, y)], grad_clip=clip)
        assert loss_a == pytest.approx(loss_b, rel=1e-6)
        moved = max((p - q).abs().max().item() for p, q in zip(model.parameters(), b.parameters()))
        diff = max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))
        assert moved > 1e-3 and diff < 1e-6, (moved, diff)


def test_grad_accum_run_matches_big_batch_run(dataset):
    """The whole loop: batch 2 x 4 micro-batches draws the same windows as batch 8 x 1."""
    small = train(tiny_config(batch_size=2, grad_accum=4, steps=5, eval_interval=5), dataset, QUIET)
    big = train(tiny_config(batch_size=8, grad_accum=1, steps=5, eval_interval=5), dataset, QUIET)
    assert small["tokens_seen"] == big["tokens_seen"] == 5 * 8 * 32
    for (_, la), (_, lb) in zip(small["train"], big["train"]):
        assert la == pytest.approx(lb, rel=1e-5)
    diff = max((p - q).abs().max().item() for p, q in zip(small["model"].parameters(), big["model"].parameters()))
    assert diff < 1e-5


def test_no_clipping_when_grad_clip_is_not_positive(dataset):
    """--grad-clip <= 0 is "no clipping" (transformers' Trainer); -1 must not flip the gradient."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=dataset.vocab_size, max_position_embeddings=32, **TINY_MODEL))
    x, y = dataset.train[:32].view(1, 32), dataset.train[1:33].view(1, 32)
    after = {}
    for clip in (0.0, -1.0, 0.01):
        m = copy.deepcopy(model)
        train_step(m, torch.optim.SGD(m.parameters(), lr=1.0), [(x, y)], grad_clip=clip)
        after[clip] = torch.cat([p.detach().flatten() for p in m.parameters()])
    before = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert torch.equal(after[0.0], after[-1.0])
    assert not torch.allclose(after[0.01], after[0.0])
    # The clipped step points the same way as the unclipped one (a flipped gradient would not).
    assert torch.nn.functional.cosine_similarity(after[0.01] - before, after[0.0] - before, dim=0) > 0.999


# ----------------------------------------------------------------------------- resume
def test_sigint_then_resume_is_bit_identical(dataset, tmp_path):
    whole = train(tiny_config(tmp_path / "whole"), dataset, QUIET)

    def ctrl_c_at_step_6(step, history, model):
        if step == 6:
            os.kill(os.getpid(), signal.SIGINT)  # the real signal, handled by the loop

    with pytest.raises(TrainingInterrupted) as info:
        train(tiny_config(tmp_path / "cut"), dataset, QUIET, on_step=ctrl_c_at_step_6)
    assert info.value.step == 6 and info.value.checkpoint == tmp_path / "cut" / "last"
    state = json.loads((tmp_path / "cut" / "last" / "train_state.json").read_text())
    assert state["step"] == 6 and len(state["history"]["train"]) == 6
    assert sorted(p.name for p in (tmp_path / "cut" / "last").iterdir()) == [
        "config.json", "model.safetensors", "optimizer.pt", "rng.pt", "train_state.json"]

    resumed = train(tiny_config(tmp_path / "cut"), dataset, QUIET, resume=True)
    for name in ("last", "best"):
        a, b = weights(tmp_path / "whole" / name), weights(tmp_path / "cut" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert resumed["train"] == whole["train"] and resumed["val"] == whole["val"] and resumed["best"] == whole["best"]
    assert resumed["steps"] == whole["steps"] == 12


def test_resume_refuses_another_configuration(dataset, tmp_path):
    train(tiny_config(tmp_path, steps=4), dataset, QUIET)
    with pytest.raises(ValueError, match=r"another configuration.*--batch-size: 4 in the checkpoint, 8 now"):
        train(tiny_config(tmp_path, steps=8, batch_size=8), dataset, QUIET, resume=True)
    with pytest.raises(ValueError, match=r"another configuration.*model:.*'hidden_size': 32.*'hidden_size': 64"):
        train(tiny_config(tmp_path, steps=8, model={**TINY_MODEL, "hidden_size": 64}), dataset, QUIET, resume=True)
    other = TokenDataset.__new__(TokenDataset)
    other.__dict__.update(dataset.__dict__, train=dataset.train.flip(0))
    with pytest.raises(ValueError, match="the training data"):
        train(tiny_config(tmp_path, steps=8), other, QUIET, resume=True)
    more = train(tiny_config(tmp_path, steps=8), dataset, QUIET, resume=True)  # more steps: allowed
    assert more["steps"] == 8 and [s for s, _ in more["train"]] == list(range(1, 9))


# ----------------------------------------------------------------------------- the output folder
def test_existing_out_needs_resume_or_overwrite(dataset, tmp_path):
    train(tiny_config(tmp_path, steps=4), dataset, QUIET)
    best_before = weights(tmp_path / "best")
    with pytest.raises(ValueError, match="already holds files.*--resume.*--overwrite"):
        train(tiny_config(tmp_path, steps=4, seed=1), dataset, QUIET)
    assert all(torch.equal(best_before[k], v) for k, v in weights(tmp_path / "best").items())  # untouched
    (tmp_path / "notes.txt").write_text("mine")
    train(tiny_config(tmp_path, steps=4, seed=1), dataset, QUIET, overwrite=True)
    assert not torch.equal(best_before["model.norm.weight"], weights(tmp_path / "best")["model.norm.weight"])
    assert (tmp_path / "notes.txt").read_text() == "mine"  # only what a run writes is removed
    with pytest.raises(ValueError, match="only one"):
        train(tiny_config(tmp_path, steps=4), dataset, QUIET, resume=True, overwrite=True)
    with pytest.raises(ValueError, match="no resumable checkpoint"):
        train(tiny_config(tmp_path / "empty", steps=4), dataset, QUIET, resume=True)


# ----------------------------------------------------------------------------- non-finite loss
@pytest.mark.parametrize("eval_interval, grad_clip, caught_by", [(1, 0.0, "validation loss"), (100, 0.0, "training loss"),
                                                               (100, 1.0, "gradient norm")])
def test_non_finite_loss_stops_and_never_becomes_best(dataset, tmp_path, eval_interval, grad_clip, caught_by):
    """lr 1e30: the weights blow up after a step or two. With clipping, the NaN gradient norm
    stops the step; without, the next evaluation or training loss does."""
    with pytest.raises(NonFiniteLossError, match=rf"the {caught_by} is (nan|inf)\b.* at step \d+.*training stopped and "
                                                 rf"(this model was not saved|nothing of this step was saved)"):
        train(tiny_config(tmp_path, steps=10, eval_interval=eval_interval, lr=1e30, warmup_steps=0, grad_clip=grad_clip), dataset, QUIET)
    for name in ("best", "last"):
        if (tmp_path / name).exists():
            assert all(torch.isfinite(t).all() for t in weights(tmp_path / name).values()), name
    if (tmp_path / "last").exists():
        state = json.loads((tmp_path / "last" / "train_state.json").read_text())
        assert all(torch.isfinite(torch.tensor(loss)) for _, loss in state["history"]["train"])


# ----------------------------------------------------------------------------- precision, compile, bar
def test_precision_choices_on_cpu(dataset):
    run = train(tiny_config(steps=2, eval_interval=2, precision="bf16"), dataset, QUIET)
    assert all(torch.isfinite(torch.tensor(loss)) for _, loss in run["train"])
    assert all(p.dtype == torch.float32 for p in run["model"].parameters())  # autocast: fp32 master weights
    fp32 = train(tiny_config(steps=2, eval_interval=2, precision="auto"), dataset, QUIET)  # auto is fp32 on a CPU
    assert fp32["train"][0][1] != run["train"][0][1] and abs(fp32["train"][0][1] - run["train"][0][1]) < 0.05
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--precision fp16 needs a CUDA GPU"):
            train(tiny_config(steps=2, precision="fp16"), dataset, QUIET)


def test_compiled_model_trains_like_the_eager_one(dataset):
    eager = train(tiny_config(steps=3, eval_interval=3), dataset, QUIET)
    compiled = train(tiny_config(steps=3, eval_interval=3, compile=True), dataset, QUIET)
    for (_, a), (_, b) in zip(eager["train"], compiled["train"]):
        assert a == pytest.approx(b, abs=1e-4)


def test_progress_bar_shows_loss_and_tokens_per_second(dataset, capsys):
    train(tiny_config(steps=2, eval_interval=2, progress=True), dataset, QUIET)
    err = capsys.readouterr().err
    assert "2/2" in err and "loss=" in err and "tok_s=" in err
    train(tiny_config(steps=2, eval_interval=2), dataset, QUIET)  # not a terminal here: quiet
    assert capsys.readouterr().err == ""


# ----------------------------------------------------------------------------- bad arguments (CLI)
def cli_args(text_file, out, *extra):
    return ["train", "--data", str(text_file), "--out", str(out), "--steps", "2", "--batch-size", "2", "--block-size",
            "16", "--hidden-size", "32", "--num-hidden-layers", "1", "--num-attention-heads", "4", "--threads", "1",
            "--eval-batches", "1", "--quiet", *extra]


BAD_ARGUMENTS = [
    (["--log-interval", "0"], "--log-interval"),
    (["--threads", "-1"], "--threads"),
    (["--steps", "0"], "--steps"),
    (["--batch-size", "0"], "--batch-size"),
    (["--grad-accum", "0"], "--grad-accum"),
    (["--block-size", "1"], "--block-size"),
    (["--eval-interval", "-1"], "--eval-interval"),
    (["--eval-batches", "0"], "--eval-batches"),
    (["--warmup-steps", "-5"], "--warmup-steps"),
    (["--lr", "inf"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--lr", "-0.1"], "--lr"),
    (["--min-lr", "-1"], "--min-lr"),
    (["--weight-decay", "nan"], "--weight-decay"),
    (["--beta2", "1.5"], "--beta2"),
    (["--grad-clip", "nan"], "--grad-clip"),
    (["--max-minutes", "0"], "--max-minutes"),
    (["--device", "meta"], "--device meta"),
    (["--device", "gpu"], "--device 'gpu'"),
    (["--device", "cuda:7"], "--device cuda:7"),
]


@pytest.mark.parametrize("extra, names", BAD_ARGUMENTS, ids=[" ".join(a) for a, _ in BAD_ARGUMENTS])
def test_bad_argument_is_one_clear_line(text_file, tmp_path, capsys, extra, names):
    from llama_edu.cli import main

    if extra[-1].startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    rc = main(cli_args(text_file, tmp_path / "out", *extra))
    err = capsys.readouterr().err
    assert rc in (1, 2) and err.count("\n") == 1 and names in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()  # nothing written for a run that could not start


def test_unwritable_or_odd_out_is_one_clear_line(text_file, tmp_path, capsys):
    from llama_edu.cli import main

    (tmp_path / "file").write_text("x")
    read_only = Path("/proc/llama_edu_run") if os.geteuid() == 0 else tmp_path / "ro" / "run"
    if os.geteuid() != 0:
        (tmp_path / "ro").mkdir()
        (tmp_path / "ro").chmod(0o500)
    for out, says in ((read_only, "cannot be written"), (tmp_path / "file", "is not a folder")):
        rc = main(cli_args(text_file, out))
        err = capsys.readouterr().err
        assert rc == 1 and err.count("\n") == 1 and f"--out {out}" in err and says in err, err
    with pytest.raises(SystemExit) as exit_info:  # argparse: the two flags exclude each other
        main(cli_args(text_file, tmp_path / "x", "--resume", "--overwrite"))
    assert exit_info.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


# ----------------------------------------------------------------------------- real signals
def cli(text_file, out, *extra, steps=400):
    argv = [sys.executable, "-m", "llama_edu", *cli_args(text_file, out, *extra)]
    argv[argv.index("--steps") + 1] = str(steps)
    argv.remove("--quiet")
    return argv


def test_ctrl_c_saves_last_exits_130_and_resumes_to_the_same_weights(text_file, tmp_path):
    """SIGINT to `python -m llama_edu train`: one line, status 130, a resumable last/ whose
    continuation gives the weights of an uninterrupted run, bit for bit."""
    extra = ("--eval-interval", "25", "--log-interval", "1")
    whole = subprocess.run(cli(text_file, tmp_path / "whole", *extra, steps=60), env=ENV, capture_output=True, text=True)
    assert whole.returncode == 0, whole.stderr

    proc = subprocess.Popen(cli(text_file, tmp_path / "cut", *extra, steps=60), env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("step    20 |"):
            proc.send_signal(signal.SIGINT)
            break
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.count("\n") == 1 and "Traceback" not in err and "--resume" in err and "interrupted after step" in err
    stopped_at = json.loads((tmp_path / "cut" / "last" / "train_state.json").read_text())["step"]
    assert 20 <= stopped_at < 60

    again = subprocess.run(cli(text_file, tmp_path / "cut", *extra, "--resume", steps=60), env=ENV,
                           capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert f"resuming {tmp_path / 'cut'} at step {stopped_at}" in again.stdout
    a, b = weights(tmp_path / "whole" / "last"), weights(tmp_path / "cut" / "last")
    assert all(torch.equal(a[k], b[k]) for k in a)


KILLER = r"""
import os, signal, sys, torch
import llama_edu.atomic_save as atomic_save, llama_edu.checkpoint as checkpoint, llama_edu.train as train
from llama_edu import LlamaConfig, LlamaForCausalLM
folder, kill_at = sys.argv[1], int(sys.argv[2])
torch.manual_seed(1)
model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, max_position_embeddings=16))
calls = 0
def counting(fn):
    def wrapped(*a, **k):
        global calls
        calls += 1
        if calls == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return fn(*a, **k)
    return wrapped
os.replace, os.rename, torch.save = counting(os.replace), counting(os.rename), counting(torch.save)
checkpoint._write_weights = counting(checkpoint._write_weights)
atomic_save._exchange = counting(atomic_save._exchange)
atomic_save._remove = counting(atomic_save._remove)  # after the swap: the old folder goes
train.save_checkpoint(model, folder, {"step": 2}, {"optimizer.pt": {"step": 2}})
print(calls)
"""


def test_kill_9_at_any_point_of_a_save_leaves_a_whole_checkpoint(tmp_path):
    """SIGKILL at every rename and write of a checkpoint save: the folder holds the previous
    checkpoint or the new one, whole, never a mix (the next save or resume finishes the swap)."""
    torch.manual_seed(0)
    old_model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, max_position_embeddings=16))
    folder = tmp_path / "last"
    save_checkpoint(old_model, tmp_path / "probe", {"step": 1})  # so the probe save swaps, as the others do
    done = subprocess.run([sys.executable, "-c", KILLER, str(tmp_path / "probe"), "0"], env=ENV, capture_output=True, text=True)
    n_calls = int(done.stdout)
    new = weights(tmp_path / "probe")
    assert n_calls >= 4  # the weights and their rename, optimizer.pt, the swap
    outcomes = set()
    for kill_at in range(1, n_calls + 1):
        save_checkpoint(old_model, folder, {"step": 1}, {"optimizer.pt": {"step": 1}})
        proc = subprocess.run([sys.executable, "-c", KILLER, str(folder), str(kill_at)], env=ENV, capture_output=True)
        assert proc.returncode == -signal.SIGKILL
        recover_folder(folder)
        state = json.loads((folder / "train_state.json").read_text())
        got = weights(folder)
        expected = {1: old_model.state_dict(), 2: new}[state["step"]]
        assert all(torch.equal(got[k], expected[k]) for k in got), kill_at
        assert torch.load(folder / "optimizer.pt", weights_only=True) == {"step": state["step"]}
        assert load_checkpoint(folder) is not None
        # No leftovers: only the saves' lock files stay (by design: deleting a lock file another
        # process waits on would break the lock).
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".") and not p.name.endswith("-lock")] == []
        outcomes.add(state["step"])
    assert outcomes == {1, 2}  # both sides of the swap were hit


# ----------------------------------------------------------------------------- the exercise of notebook 10
def test_causal_lm_loss_is_the_models_loss_and_the_checker_works_both_ways(capsys):
    from llama_edu.exercises import check
    from llama_edu.train import causal_lm_loss

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, max_position_embeddings=16, **TINY_MODEL)).eval()
    ids = torch.randint(0, 50, (3, 10))
    labels = ids.clone()
    labels[0, 6:] = -100
    out = model(input_ids=ids, labels=labels)
    assert torch.equal(causal_lm_loss(out.logits, labels), out.loss)

    def written_out(logits, labels):  # a correct answer written differently: log-softmax, gather, mask
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        target = labels[:, 1:]
        keep = target != -100
        picked = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return -(picked * keep).sum() / keep.sum()

    assert check("causal_lm_loss", written_out)
    assert not check("causal_lm_loss", lambda logits, labels: torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)))
    assert "Likely mistake: the labels are not shifted" in capsys.readouterr().out


def test_kill_9_during_training_keeps_best_and_last_and_resumes(text_file, tmp_path):
    """SIGKILL a training run in the middle of its evaluations and saves: best/ and last/ load,
    and --resume finishes the run."""
    extra = ("--eval-interval", "2", "--log-interval", "1")
    proc = subprocess.Popen(cli(text_file, tmp_path, *extra, steps=400), env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:
        if line.startswith("step    30 | val"):
            time.sleep(0.05)  # somewhere inside the next steps and saves
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    for name in ("best", "last"):
        recover_folder(tmp_path / name)
        assert all(torch.isfinite(t).all() for t in weights(tmp_path / name).values())
        assert load_checkpoint(tmp_path / name).config.hidden_size == 32
    step = json.loads((tmp_path / "last" / "train_state.json").read_text())["step"]
    assert step >= 30
    again = subprocess.run(cli(text_file, tmp_path, *extra, "--resume", steps=step + 4), env=ENV, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert json.loads((tmp_path / "last" / "train_state.json").read_text())["step"] == step + 4
