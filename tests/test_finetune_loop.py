"""The one training loop under the fine-tuning commands (issues "One shell" and "Nothing lost,
round two"): sft and dpo share train's flags and its faults. A non-finite loss or weights stop
with one line and exit status 1, saving nothing of them; float16 weights are refused on a CPU;
--out is never an input and never another run's folder; Ctrl-C saves last/, exits 130, and
--resume continues it. Real subprocesses and real signals on the project's Shakespeare model;
in-process: the resumed run equals the uninterrupted one bit for bit, and only the loop calls
backward()."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llama_edu import LlamaForCausalLM, LlamaTokenizer
from llama_edu.dpo import DPO_DATA, DPOTask
from llama_edu.files import DEFAULT_MODEL_DIR, REPO_ROOT
from llama_edu.lora import LoraConfig, apply_lora
from llama_edu.sft import SFT_DATA, SFTTask, load_jsonl
from llama_edu.training.loop import LoopConfig, NonFiniteLossError, Task, TrainingInterrupted, fit

ENV = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
FAST = ["--batch-size", "2", "--device", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, str]:
    """A few rows of the project's instruction and preference sets: the commands start fast."""
    folder = tmp_path_factory.mktemp("data")
    for name, src in (("sft", SFT_DATA), ("dpo", DPO_DATA)):
        rows = [line for line in Path(src).read_text(encoding="utf-8").splitlines() if '"train"' in line][:12]
        (folder / f"{name}.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return {name: str(folder / f"{name}.jsonl") for name in ("sft", "dpo")}


def command(argv: list[str], data: dict[str, str]) -> list[str]:
    return [*argv[:1], "--data", data[argv[0]], *argv[1:]]


def run(*argv: str, data: dict[str, str], timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llama_edu", *command(list(argv), data)], env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def main(*argv: str, data: dict[str, str], capsys) -> subprocess.CompletedProcess:
    """The command in this process (faster where no signal or exit status of a process is tested)."""
    from llama_edu.cli import main as cli_main

    capsys.readouterr()
    rc = cli_main(command(list(argv), data))
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(argv, rc, out, err)


def one_line_error(proc: subprocess.CompletedProcess, *says: str) -> None:
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    for text in says:
        assert text in proc.stderr, proc.stderr


def safetensors_in(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.safetensors")) if folder.exists() else []


# ----------------------------------------------------------------------------- bad flags: refused before training
@pytest.mark.parametrize("argv, says", [
    (["sft", "--lr", "inf"], ["--lr must be a finite number > 0"]),
    (["sft", "--lora-r", "2", "--lora-alpha", "inf"], ["lora_alpha must be a positive finite number"]),
    (["dpo", "--beta", "nan"], ["beta must be positive and finite", "--beta"]),
    (["sft", "--dtype", "float16"], ["float16", "--dtype float32", "--dtype bfloat16"]),
    (["dpo", "--dtype", "float16"], ["float16", "--dtype float32", "--dtype bfloat16"]),
], ids=["sft --lr inf", "sft --lora-alpha inf", "dpo --beta nan", "sft --dtype float16", "dpo --dtype float16"])
def test_a_bad_flag_is_one_line_and_writes_nothing(tmp_path, data, argv, says):
    """float16 training on a CPU is refused (it overflows to NaN; AdamW's updates underflow):
    the error says to load float32 or bfloat16 weights."""
    proc = run(*argv, *FAST, "--steps", "2", "--out", str(tmp_path / "out"), data=data)
    one_line_error(proc, *says)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- non-finite: stop, save nothing of it
def test_a_loss_that_becomes_nan_stops_sft_and_nothing_is_saved(tmp_path, data):
    """--lr 1e37 without clipping: the weights blow up, step 3's loss is NaN."""
    proc = run("sft", *FAST, "--lr", "1e37", "--grad-clip", "0", "--warmup-steps", "0", "--steps", "4", "--out", str(tmp_path / "out"),
               data=data)
    one_line_error(proc, "the training loss is nan at step 3", "nothing of this step was saved")
    assert list((tmp_path / "out").iterdir()) == []


def test_weights_that_become_nan_on_the_last_step_are_not_saved(tmp_path, data):
    """The last step has no next loss to catch it: the weights are checked before every save."""
    proc = run("dpo", *FAST, "--lora-r", "0", "--lr", "1e37", "--grad-clip", "0", "--warmup-steps", "0", "--steps", "2",
               "--out", str(tmp_path / "out"), data=data)
    one_line_error(proc, "the weights became NaN or infinite by step 2", "not saved")
    assert list((tmp_path / "out").iterdir()) == []


class NanGradient(Task):
    """A finite loss whose gradient is NaN: sqrt at 0 (infinite slope) times a zero inner gradient."""

    def __init__(self):
        torch.manual_seed(0)
        self.model = torch.nn.Linear(4, 4)

    def loss(self, model, batch):
        w = model.weight
        return (w - w.detach()).pow(2).sum().sqrt() + model(batch).pow(2).mean()

    def batches(self, generator):
        while True:
            yield torch.randn(8, 4, generator=generator)


def test_nan_gradients_overflowing_updates_and_nan_weights_stop_the_loop(tmp_path):
    with pytest.raises(NonFiniteLossError, match=r"the gradient norm is nan \(the loss was .*\) at step 1"):
        fit(NanGradient(), LoopConfig(steps=3, lr=1e-3), log=None)
    with pytest.raises(NonFiniteLossError, match="the weights became NaN or infinite by step 1; training stopped and they were not saved"):
        fit(NanGradient(), LoopConfig(steps=1, lr=1e-3, grad_clip=0.0, out_dir=str(tmp_path / "out")), log=None)
    assert list((tmp_path / "out").iterdir()) == []
    task = NanGradient()
    task.loss = lambda model, batch: model(batch).pow(2).mean()
    before = task.model.weight.detach().clone()
    with pytest.raises(NonFiniteLossError, match="the optimizer's update overflows float32 .* at step 1 \\(lr 1e\\+300\\)"):
        fit(task, LoopConfig(steps=2, lr=1e300), log=None)
    assert torch.equal(before, task.model.weight)  # the update was refused, not half-applied to the weights


def test_the_python_functions_stop_too():
    tok = LlamaTokenizer.from_pretrained(DEFAULT_MODEL_DIR)
    from llama_edu.dpo import train_dpo
    from llama_edu.sft import train_sft

    rows = load_jsonl(SFT_DATA, "train")[:8]
    model = LlamaForCausalLM.from_pretrained(DEFAULT_MODEL_DIR)
    with pytest.raises(NonFiniteLossError, match="the training loss is nan at step 3"):
        train_sft(model, tok, [r["messages"] for r in rows], steps=4, batch_size=4, lr=1e37, warmup_steps=0, grad_clip=0.0, log=None)
    policy = apply_lora(LlamaForCausalLM.from_pretrained(DEFAULT_MODEL_DIR), LoraConfig(r=2, lora_alpha=4))
    with pytest.raises(ValueError, match="beta must be positive"):
        train_dpo(policy, tok, load_jsonl(DPO_DATA, "train")[:4], beta=float("nan"), steps=1, log=None)
    with pytest.raises(ValueError, match="float16 weights, which do not train.*--dtype float32 or --dtype bfloat16"):
        train_sft(LlamaForCausalLM.from_pretrained(DEFAULT_MODEL_DIR).half(), tok, [r["messages"] for r in rows], steps=1, log=None)


# ----------------------------------------------------------------------------- --out
def test_out_is_never_the_model_it_reads_nor_another_runs_folder(tmp_path, data, capsys):
    def sft(*argv):
        return main("sft", *FAST, "--steps", "1", *argv, data=data, capsys=capsys)

    model_dir = tmp_path / "m"
    shutil.copytree(DEFAULT_MODEL_DIR, model_dir)
    before = {p.name: p.read_bytes() for p in model_dir.iterdir() if p.is_file()}
    # The same folder spelled another way, with --overwrite: still refused.
    same = tmp_path / "m" / ".." / "m"
    one_line_error(sft("--model", str(model_dir), "--out", str(same), "--overwrite"), "is the input", "another --out")
    assert {p.name: p.read_bytes() for p in model_dir.iterdir() if p.is_file()} == before
    # Nor may --overwrite remove an input that lies in --out (here the model in OUT/last/).
    shutil.copytree(DEFAULT_MODEL_DIR, tmp_path / "run" / "last")
    one_line_error(sft("--model", str(tmp_path / "run" / "last"), "--out", str(tmp_path / "run"), "--overwrite"),
                   "--overwrite would remove", "an input of this run")
    assert (tmp_path / "run" / "last" / "model.safetensors").is_file()

    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    one_line_error(sft("--lora-r", "2", "--out", str(out)), "already holds files", "--overwrite")
    done = sft("--lora-r", "2", "--out", str(out), "--overwrite")
    assert done.returncode == 0, done.stderr
    assert (out / "notes.txt").read_text() == "mine"  # only what a run writes is replaced
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "adapter_config.json", "adapter_model.safetensors", "history.json", "last", "notes.txt", "train_config.json"]
    # A second run over a finished one needs --overwrite too, which removes the old run's files.
    dpo = ("dpo", *FAST, "--steps", "1", "--lora-r", "0", "--out", str(out))
    one_line_error(main(*dpo, data=data, capsys=capsys), "already holds files")
    done = main(*dpo, "--overwrite", data=data, capsys=capsys)
    assert done.returncode == 0, done.stderr
    assert not (out / "adapter_model.safetensors").exists() and (out / "model.safetensors").is_file()
    assert (out / "tokenizer.model").is_file() and (out / "notes.txt").read_text() == "mine"
    assert json.loads((out / "train_config.json").read_text())["command"] == "dpo"


# ----------------------------------------------------------------------------- Ctrl-C and --resume
def test_ctrl_c_in_sft_saves_last_exits_130_and_resume_finishes(tmp_path, data):
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "llama_edu", "sft", "--data", data["sft"], "--batch-size", "2", "--device", "cpu",
            "--log-interval", "1", "--steps", "400", "--out", str(out)]
    proc = subprocess.Popen(argv, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("step     3 |"):
            proc.send_signal(signal.SIGINT)
            break
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.count("\n") == 1 and "interrupted after step" in err and "--resume" in err and "Traceback" not in err, err
    state = json.loads((out / "last" / "train_state.json").read_text())
    assert 3 <= state["step"] < 400 and len(state["history"]["train"]) == state["step"]
    saved = load_file(str(out / "last" / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in saved.values())
    assert not (out / "model.safetensors").exists()  # an unfinished run is not exported as the result

    stop = state["step"] + 2
    # Another learning rate is another run: refused, with the difference named.
    one_line_error(run("sft", "--batch-size", "2", "--device", "cpu", "--quiet", "--steps", str(stop), "--lr", "2e-3", "--resume",
                       "--out", str(out), data=data), "another configuration", "--lr: 0.001 in the checkpoint, 0.002 now")
    again = run("sft", "--batch-size", "2", "--device", "cpu", "--steps", str(stop), "--resume", "--out", str(out), data=data)
    assert again.returncode == 0, again.stderr
    assert f"resuming {out} at step {state['step']}" in again.stdout
    assert json.loads((out / "last" / "train_state.json").read_text())["step"] == stop
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.model").is_file()


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_interrupted_and_resumed_lora_run_equals_the_uninterrupted_one(tmp_path, kind):
    """Ctrl-C (the real signal) after step 3 of 6, then resume: the adapter and the losses are
    those of a run never stopped, bit for bit (the data are replayed from the seed)."""
    tok = LlamaTokenizer.from_pretrained(DEFAULT_MODEL_DIR)
    base = LlamaForCausalLM.from_pretrained(DEFAULT_MODEL_DIR)
    torch.manual_seed(0)
    base = apply_lora(base, LoraConfig(r=2, lora_alpha=4, target_modules=("q_proj", "v_proj")))
    data = load_jsonl(SFT_DATA if kind == "sft" else DPO_DATA, "train")[:20]

    def task():
        model = copy.deepcopy(base)
        if kind == "sft":
            return SFTTask(model, tok, [r["messages"] for r in data], batch_size=4, record={"lr": 3e-3})
        return DPOTask(model, tok, data, beta=0.1, batch_size=4, record={"lr": 3e-3})

    def config(out):
        return LoopConfig(steps=6, lr=3e-3, warmup_steps=2, seed=0, out_dir=str(out), progress=False)

    def ctrl_c_at_3(step, history, model):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    whole = fit(task(), config(tmp_path / "whole"), log=None)
    with pytest.raises(TrainingInterrupted) as info:
        fit(task(), config(tmp_path / "cut"), log=None, on_step=ctrl_c_at_3)
    assert info.value.step == 3 and info.value.checkpoint == tmp_path / "cut" / "last"
    assert sorted(p.name for p in (tmp_path / "cut" / "last").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "rng.pt", "train_state.json"]
    resumed = fit(task(), config(tmp_path / "cut"), log=None, resume=True)
    assert resumed["train"] == whole["train"] and resumed["metrics"] == whole["metrics"]
    a = load_file(str(tmp_path / "whole" / "last" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "last" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(a[k].abs().sum() > 0 for k in a if "lora_B" in k)  # it trained


# ----------------------------------------------------------------------------- one loop
def test_only_the_loop_calls_backward():
    """The package's one training loop is the only code that runs backward()."""
    package = REPO_ROOT / "llama_edu"
    calls = {str(p.relative_to(package)) for p in package.rglob("*.py") if re.search(r"\.backward\(", p.read_text(encoding="utf-8"))}
    assert calls == {os.path.join("training", "loop.py")}, calls
