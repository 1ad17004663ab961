"""Fault injection: saves killed (SIGKILL, SIGINT) at several points, concurrent saves, and
threads. After each fault the folder loads the old model or the new one, entirely (compared by
logits), and no temporary survives the next save.

A child process saves a model; a hook in it (patched over one of the save's steps) writes a
"ready" file and then sleeps, so the parent can kill it exactly there, reliably.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import llama_edu
from llama_edu import atomic_save, checkpoint
from llama_edu import LlamaConfig, LlamaForCausalLM

REPO = Path(__file__).resolve().parents[1]
TINY = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
SHARDED = "12KB"  # ~6 shards for the tiny model
SINGLE = "5GB"
IDS = torch.tensor([[1, 5, 9, 33, 70, 2, 101]])

# The child: build the model of `seed`, save it to `target` with `shard`, pausing at `point`.
CHILD = r"""
import json, os, sys, time
import torch
torch.set_num_threads(1)
from llama_edu import LlamaConfig, LlamaForCausalLM, atomic_save, checkpoint
a = json.loads(sys.argv[1])
ready = a["ready"]

def pause():
    open(ready, "w").close()
    time.sleep(120)

point = a["point"]
if point.startswith("shard"):  # "shardK-mid": half of shard K written, "shardK-done": shard K complete
    k, when = int(point[5]), point.split("-")[1]
    real = checkpoint._write_weights
    calls = []
    def write(tensors, path, safe):
        calls.append(path)
        if len(calls) == k + 1:
            if when == "mid":
                with open(path, "wb") as f:
                    f.write(b"\0" * 4096)
                pause()
            real(tensors, path, safe)
            pause()
        real(tensors, path, safe)
    checkpoint._write_weights = write
elif point == "before-swap":
    real_swap = atomic_save._swap_in
    def swap(*args):
        pause()
        real_swap(*args)
    atomic_save._swap_in = swap
elif point == "after-swap":  # the new folder is in place, the old one not yet deleted
    real_ex = atomic_save._exchange
    def ex(a_, b_):
        ok = real_ex(a_, b_)
        pause()
        return ok
    atomic_save._exchange = ex
elif point == "between-renames":  # no RENAME_EXCHANGE: killed between the two renames
    atomic_save._exchange = lambda a_, b_: False
    real_rename = os.rename
    def rename(src, dst):
        real_rename(src, dst)
        if "-old-" in os.fspath(dst):
            pause()
    os.rename = rename
elif point == "first-publish":  # the first step that changes the target folder itself has happened
    published = []
    def after_first(real):
        def wrapped(*args):
            result = real(*args)
            if not published:
                published.append(1)
                pause()
            return result
        return wrapped
    os.replace = after_first(os.replace)  # renames into the folder, one by one (an in-place save)
    atomic_save._exchange = after_first(atomic_save._exchange)  # the swap of the whole folder
elif point == "wait-go":  # concurrent saves start together
    while not os.path.exists(a["go"]):
        time.sleep(0.005)

torch.manual_seed(a["seed"])
model = LlamaForCausalLM(LlamaConfig(**a["config"]))
open(a["built"], "w").close() if a.get("built") else None
model.save_pretrained(a["target"], max_shard_size=a["shard"])
"""


def make_model(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**TINY)).eval()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def loaded_logits(folder: Path) -> torch.Tensor:
    return logits(LlamaForCausalLM.from_pretrained(folder, progress=False))


def which(folder: Path, old: torch.Tensor, new: torch.Tensor) -> str:
    """'old' or 'new': the model the folder loads, entirely (bit-identical logits)."""
    got = loaded_logits(folder)
    if torch.equal(got, old):
        return "old"
    if torch.equal(got, new):
        return "new"
    raise AssertionError(f"{folder} loads neither the old nor the new model: {sorted(os.listdir(folder))}")


def temporaries(folder: Path) -> list[str]:
    """Hidden temporaries of a save into ``folder`` (beside it or inside it)."""
    beside = [p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}{atomic_save.MARKER}")]
    inside = [p.name for p in folder.iterdir() if p.name.startswith(".")] if folder.is_dir() else []
    return [n for n in beside + inside if not n.endswith("lock")]


def start_child(tmp_path: Path, target: Path | str, seed: int, shard: str, point: str, cwd: Path | None = None,
                **extra) -> tuple[subprocess.Popen, Path]:
    """A child that saves the model of ``seed`` to ``target`` (a path as the user typed it,
    relative to ``cwd``) and pauses at ``point``."""
    ready = tmp_path / f"ready-{seed}-{point}-{time.monotonic_ns()}"
    args = dict(seed=seed, config=TINY, target=str(target), shard=shard, point=point, ready=str(ready), **extra)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(args)], env=env, cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, ready


def wait_for(path: Path, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + 120
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the child exited ({proc.returncode}) before {what}: {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"the child never reached {what}")
        time.sleep(0.01)


@pytest.fixture(scope="module")
def models():
    old, new = make_model(1), make_model(2)
    return old, new, logits(old), logits(new)


# ---------------------------------------------------------------------------------------------
# Killed mid-save
# ---------------------------------------------------------------------------------------------
KILLS = [
    # (point, signal, old layout, new layout, what the folder holds afterwards)
    ("shard0-mid", signal.SIGKILL, SHARDED, SHARDED, "old"),
    ("shard1-mid", signal.SIGKILL, SHARDED, SHARDED, "old"),  # during the write of the second shard
    ("shard1-done", signal.SIGKILL, SINGLE, SHARDED, "old"),
    ("shard3-mid", signal.SIGINT, SHARDED, SHARDED, "old"),
    ("shard0-done", signal.SIGINT, SHARDED, SINGLE, "old"),
    ("before-swap", signal.SIGKILL, SHARDED, SINGLE, "old"),
    ("before-swap", signal.SIGINT, SINGLE, SHARDED, "old"),
    ("after-swap", signal.SIGKILL, SHARDED, SHARDED, "new"),
    ("between-renames", signal.SIGKILL, SHARDED, SINGLE, "old-after-repair"),
]


@pytest.mark.parametrize(
    "point,sig,old_shard,new_shard,expect", KILLS,
    ids=[f"{p}-{signal.Signals(s).name}-{'sharded' if o == SHARDED else 'single'}-to-{'sharded' if n == SHARDED else 'single'}"
         for p, s, o, n, _ in KILLS],
)
def test_killed_save_leaves_old_or_new_whole(tmp_path, models, point, sig, old_shard, new_shard, expect):
    old, _, old_logits, new_logits = models
    target = tmp_path / "ckpt"
    old.save_pretrained(target, max_shard_size=old_shard)
    (target / "README.md").write_text("my notes")  # a user's file, kept by every save
    proc, ready = start_child(tmp_path, target, seed=2, shard=new_shard, point=point)
    wait_for(ready, proc, point)
    proc.send_signal(sig)
    proc.wait(timeout=60)
    assert proc.returncode != 0
    if sig == signal.SIGINT:  # Ctrl-C: the save cleans up after itself at once
        assert "KeyboardInterrupt" in proc.stderr.read()
        assert temporaries(target) == []
    if expect == "old-after-repair":
        # Without an atomic exchange, a kill between the two renames leaves the old folder
        # under its hidden name; the next save (here: remove_stale_temporaries) puts it back.
        assert not target.exists()
        atomic_save.remove_stale_temporaries(tmp_path, f".{target.name}", target)
        expect = "old"
    assert which(target, old_logits, new_logits) == expect
    assert (target / "README.md").read_text() == "my notes"
    # the next save removes what the killed one left, and keeps the user's file
    third = make_model(3)
    third.save_pretrained(target, max_shard_size=SINGLE)
    assert temporaries(target) == []
    assert torch.equal(loaded_logits(target), logits(third))
    assert sorted(os.listdir(target)) == ["README.md", "config.json", "model.safetensors"]


# The path forms a user types: (working directory relative to tmp_path, the target as typed).
PATH_FORMS = {
    "dot": ("ckpt", "."),
    "relative": (".", "ckpt"),
    "trailing-slash": (".", "./ckpt/"),
    "symlink": (".", "link"),
    "dotdot": ("ckpt/sub", ".."),
}
RELATIVE_KILLS = [("dot", p) for p in ("shard1-mid", "before-swap")] + [
    (form, "first-publish") for form in PATH_FORMS]


@pytest.mark.parametrize("form,point", RELATIVE_KILLS, ids=[f"{f}-{p}" for f, p in RELATIVE_KILLS])
def test_kill_9_during_a_save_to_a_relative_path_leaves_old_or_new_whole(tmp_path, models, form, point):
    """kill -9 of `save_pretrained(".")` (and other relative forms) left a folder without
    config.json: saves into the working directory renamed files in place, config.json first
    removed ("first-publish": killed right after the first file moved in). Now every form
    swaps the folder: after the kill it loads the old model or the new one, whole."""
    old, _, old_logits, new_logits = models
    target = tmp_path / "ckpt"
    old.save_pretrained(target, max_shard_size=SHARDED)
    (target / "sub").mkdir()
    (tmp_path / "link").symlink_to("ckpt")
    cwd, typed = PATH_FORMS[form]
    proc, ready = start_child(tmp_path, typed, seed=2, shard=SHARDED, point=point, cwd=tmp_path / cwd)
    wait_for(ready, proc, point)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert which(target, old_logits, new_logits) == ("new" if point == "first-publish" else "old")
    assert (tmp_path / "link").is_symlink() and (target / "sub").is_dir()
    models[1].save_pretrained(target, max_shard_size=SINGLE)  # the next save cleans up after the killed one
    assert which(target, old_logits, new_logits) == "new" and temporaries(target) == []


def test_only_this_targets_stale_temporaries_are_removed(tmp_path, models):
    """A save removes its own target's leftovers (made under the lock it now holds), never
    another folder's; without fcntl only a dead writer's (by PID)."""
    target = tmp_path / "ckpt"
    models[0].save_pretrained(target)
    dead_pid = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                                  capture_output=True, text=True).stdout)
    mine = tmp_path / f".ckpt{atomic_save.MARKER}tmp-{dead_pid}-89abcdef"
    other = tmp_path / f".ckpt2{atomic_save.MARKER}tmp-{dead_pid}-0123abcd"
    inside = target / f"{atomic_save.MARKER}tmp-{dead_pid}-fedcba98"
    for p in (mine, other, inside):
        p.mkdir()
    models[1].save_pretrained(target)
    assert not mine.exists() and not inside.exists() and other.exists()
    # the PID rule, for systems without fcntl
    live = tmp_path / f".ckpt2{atomic_save.MARKER}tmp-{os.getppid()}-00000000"
    live.mkdir()
    removed = atomic_save.remove_stale_temporaries(tmp_path, ".ckpt2", locked=False)
    assert removed == [other] and live.exists()


# ---------------------------------------------------------------------------------------------
# Concurrent saves
# ---------------------------------------------------------------------------------------------
def test_concurrent_saves_with_different_layouts(tmp_path, models):
    """Two processes save different models with different shard layouts into one folder at the
    same moment: the folder holds one of them entirely, with one layout, and no temporaries."""
    _, _, old_logits, new_logits = models
    target = tmp_path / "ckpt"
    go = tmp_path / "go"
    procs = []
    for seed, shard in ((1, SHARDED), (2, SINGLE)):
        built = tmp_path / f"built-{seed}"
        proc, _ = start_child(tmp_path, target, seed=seed, shard=shard, point="wait-go", go=str(go), built=str(built))
        procs.append(proc)
    go.touch()
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read()
    winner = which(target, old_logits, new_logits)
    files = sorted(os.listdir(target))
    if winner == "old":  # seed 1, sharded
        assert "model.safetensors.index.json" in files and "model.safetensors" not in files
    else:
        assert files == ["config.json", "model.safetensors"]
    assert temporaries(target) == []


def test_second_writer_waits_for_the_lock_and_cleans_up_after_a_killed_first(tmp_path, models):
    """Writer 1 is killed while holding the lock, with a full staging folder; writer 2, blocked
    on the lock until then, completes, and removes writer 1's temporary."""
    old, _, old_logits, new_logits = models
    target = tmp_path / "ckpt"
    old.save_pretrained(target, max_shard_size=SINGLE)
    first, ready = start_child(tmp_path, target, seed=3, shard=SHARDED, point="before-swap")
    wait_for(ready, first, "before-swap")
    second, _ = start_child(tmp_path, target, seed=2, shard=SHARDED, point="none", built=str(tmp_path / "built2"))
    wait_for(tmp_path / "built2", second, "model built")
    time.sleep(1.0)  # give writer 2 time to reach the lock; it must not get past it
    assert second.poll() is None
    staging = [n for n in temporaries(target) if "-tmp-" in n]
    assert len(staging) == 1 and str(first.pid) in staging[0]  # only writer 1's staging folder
    first.kill()
    first.wait()
    assert second.wait(timeout=120) == 0, second.stderr.read()
    assert which(target, old_logits, new_logits) == "new"
    assert temporaries(target) == []


# ---------------------------------------------------------------------------------------------
# What a save keeps and replaces
# ---------------------------------------------------------------------------------------------
def test_save_keeps_user_files_and_replaces_checkpoint_files(tmp_path, models):
    old, new, old_logits, new_logits = models
    target = tmp_path / "ckpt"
    old.save_pretrained(target, max_shard_size=SHARDED)
    (target / "README.md").write_text("notes")
    (target / "generation_config.json").write_text('{"max_new_tokens": 5}')
    (target / "runs").mkdir()
    (target / "runs" / "log.txt").write_text("epoch 1")
    (target / "pytorch_model.bin").write_bytes(b"an old pickle of another layout")  # ours: replaced
    new.save_pretrained(target, max_shard_size=SINGLE)
    assert sorted(os.listdir(target)) == ["README.md", "config.json", "generation_config.json", "model.safetensors", "runs"]
    assert (target / "runs" / "log.txt").read_text() == "epoch 1"
    assert (target / "generation_config.json").read_text() == '{"max_new_tokens": 5}'
    assert which(target, old_logits, new_logits) == "new"


def test_saving_into_the_working_directory_keeps_it_usable(tmp_path, models, monkeypatch):
    """A save into the folder this process works in (or one holding it) swaps it like any other
    and moves the process into the new folder, at the same place."""
    old, new, old_logits, new_logits = models
    target = tmp_path / "ckpt"
    old.save_pretrained(target, max_shard_size=SHARDED)
    (target / "sub").mkdir()
    monkeypatch.chdir(target / "sub")
    new.save_pretrained(target, max_shard_size=SINGLE)
    assert Path(os.getcwd()) == (target / "sub").resolve()  # still there
    assert which(target, old_logits, new_logits) == "new"
    monkeypatch.chdir(target)
    old.save_pretrained(".", max_shard_size=SHARDED)
    assert which(target, old_logits, new_logits) == "old"
    assert Path(os.getcwd()) == target.resolve()


def test_swap_keeps_the_folders_permissions(tmp_path, models):
    target = tmp_path / "ckpt"
    models[0].save_pretrained(target)
    target.chmod(0o2770)
    models[1].save_pretrained(target, max_shard_size=SHARDED)
    assert target.stat().st_mode & 0o7777 == 0o2770


def test_tokenizer_and_model_saves_keep_each_others_files(tmp_path, models, monkeypatch):
    tok = llama_edu.LlamaTokenizer.from_pretrained(REPO / "data")
    target = tmp_path / "ckpt"
    models[0].save_pretrained(target)
    tok.save_pretrained(target)
    models[1].save_pretrained(target)
    assert {"tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "config.json",
            "model.safetensors"} <= set(os.listdir(target))
    before = {f: (target / f).read_bytes() for f in os.listdir(target)}
    # A tokenizer save interrupted (Ctrl-C) after its first file leaves everything as it was.
    from llama_edu.text import base as tokmod  # where the shared save writes its files

    calls = []

    def interrupted(path, data):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return llama_edu.files.atomic_write_bytes(path, data)

    monkeypatch.setattr(tokmod, "atomic_write_bytes", interrupted)
    tok.add_special_tokens({"pad_token": "<pad>"})
    with pytest.raises(KeyboardInterrupt):
        tok.save_pretrained(target)
    assert {f: (target / f).read_bytes() for f in os.listdir(target)} == before
    assert temporaries(target) == []


def test_in_place_fallback_when_the_parent_is_not_writable(tmp_path, models, monkeypatch):
    """Where the folder cannot be swapped (read-only parent, mount point) files are renamed in
    one by one; config.json goes first and comes back last, so a failure mid-way leaves a folder
    that refuses to load rather than one that loads a mixture."""
    old, new, old_logits, new_logits = models
    target = tmp_path / "ckpt"
    old.save_pretrained(target, max_shard_size=SHARDED)
    (target / "README.md").write_text("notes")
    real_access = os.access
    monkeypatch.setattr(atomic_save.os, "access", lambda p, m: False if Path(p) == tmp_path else real_access(p, m))
    new.save_pretrained(target, max_shard_size=SINGLE)
    assert sorted(os.listdir(target)) == [".llama_edu-lock", "README.md", "config.json", "model.safetensors"]
    assert which(target, old_logits, new_logits) == "new"

    real_replace = os.replace
    calls = []

    def failing(src, dst):
        calls.append(dst)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(atomic_save.os, "replace", failing)
    with pytest.raises(OSError, match="No space"):
        old.save_pretrained(target, max_shard_size=SHARDED)
    monkeypatch.setattr(atomic_save.os, "replace", real_replace)
    with pytest.raises(FileNotFoundError, match="config.json"):
        LlamaForCausalLM.from_pretrained(target, progress=False)
    old.save_pretrained(target, max_shard_size=SHARDED)  # the next save repairs it
    assert which(target, old_logits, new_logits) == "old"
    assert [n for n in os.listdir(target) if n.startswith(".") and "lock" not in n] == []


# ---------------------------------------------------------------------------------------------
# Threads: loading must not change how other threads initialise their models
# ---------------------------------------------------------------------------------------------
def test_loading_in_one_thread_does_not_skip_init_in_another(tmp_path):
    folder = tmp_path / "ckpt"
    make_model(0).save_pretrained(folder)
    stop = threading.Event()
    errors = []

    def loader():
        try:
            while not stop.is_set():
                LlamaForCausalLM.from_pretrained(folder, progress=False)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    t = threading.Thread(target=loader)
    t.start()
    bad = 0
    try:
        for _ in range(60):
            m = LlamaForCausalLM(LlamaConfig(**TINY))
            # _init_weights draws every matrix from N(0, 0.02): a skipped init shows up as
            # torch.empty garbage or zeros.
            for p in m.parameters():
                if p.dim() == 2 and not 0.014 < p.std().item() < 0.026:
                    bad += 1
                    break
    finally:
        stop.set()
        t.join()
    assert errors == []
    assert bad == 0, f"{bad} of 60 models built beside a loading thread were not initialised"


def test_skip_init_is_off_outside_the_load():
    with torch.device("meta"), checkpoint._skip_init(LlamaForCausalLM):
        LlamaForCausalLM(LlamaConfig(**TINY))
    m = LlamaForCausalLM(LlamaConfig(**TINY))
    assert 0.014 < m.lm_head.weight.std().item() < 0.026


# ---------------------------------------------------------------------------------------------
# Ctrl-C in the generate and chat commands
# ---------------------------------------------------------------------------------------------
STREAM_PAUSE = r"""
import os, sys, time
import llama_edu.streaming as streaming
ready, pause_at = sys.argv[1], int(sys.argv[2])  # pause after the pause_at-th non-blank piece of text
paused = []
def pausing(real):
    def on_text(self, text, stream_end=False):
        real(self, text, stream_end)
        if text.strip():
            paused.append(1)
            if len(paused) == pause_at:  # wait here to be interrupted
                open(ready, "w").close()
                time.sleep(120)
    return on_text
for cls in (streaming.TextStreamer, streaming.CallbackStreamer):
    cls.on_finalized_text = pausing(cls.on_finalized_text)
import importlib
chat_module = importlib.import_module("llama_edu.generation.chat")  # the module (llama_edu.chat is also a function)
real_generate = chat_module.generate
def spy(model, ids, **kw):
    print("PROMPT", ids[0].tolist(), file=sys.stderr, flush=True)
    return real_generate(model, ids, **kw)
chat_module.generate = spy
from llama_edu.cli import main
sys.exit(main(sys.argv[3:]))
"""


def _run_paused(tmp_path: Path, argv: list[str], pause_at: int, stdin: str | None = None):
    ready = tmp_path / "ready"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", STREAM_PAUSE, str(ready), str(pause_at), *argv], env=env, cwd=REPO,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if stdin is not None:
        proc.stdin.write(stdin)
        proc.stdin.flush()
    wait_for(ready, proc, "the first words of the answer")
    proc.send_signal(signal.SIGINT)
    return proc


def test_ctrl_c_during_generate_flushes_and_exits_130_quietly(tmp_path):
    proc = _run_paused(tmp_path, ["generate", "--prompt", "ROMEO:", "--max-new-tokens", "100", "--greedy"], pause_at=3)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert out.startswith("ROMEO:") and len(out.split()) >= 3  # the words so far were printed


def test_ctrl_c_during_a_chat_answer_keeps_the_session(tmp_path):
    proc = _run_paused(tmp_path, ["chat", "--max-new-tokens", "30", "--greedy"], pause_at=1,
                       stdin="first question\n")
    out, err = proc.communicate("second question\n", timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "Traceback" not in err and "(stopped)" in out
    prompts = [json.loads(line.split("PROMPT ", 1)[1]) for line in err.splitlines() if line.startswith("PROMPT ")]
    assert len(prompts) == 2  # the session went on to a second answer
    tok = llama_edu.LlamaTokenizer.from_pretrained(REPO / "data" / "shakespeare-llama")
    first = tok.encode("first question", add_special_tokens=False)
    assert any(prompts[1][i:i + len(first)] == first for i in range(len(prompts[1])))  # with its history


# ---------------------------------------------------------------------------------------------
# Real processes meeting bad bytes and a full disk
# ---------------------------------------------------------------------------------------------
def _cli(args: list[str], cwd: Path, stdin: bytes | None = None, preexec=None, env: dict | None = None):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "llama_edu", *args], cwd=cwd, input=stdin, capture_output=True,
                          env=env, preexec_fn=preexec, timeout=300)


@pytest.mark.parametrize("locale", ["C.UTF-8", "C"])
def test_chat_says_a_line_is_not_utf8_and_goes_on(tmp_path, locale):
    """Bytes that are not UTF-8 on chat's stdin (strict UTF-8 or the C locale's surrogateescape):
    one line says so, the session answers the next line, exit 0."""
    proc = _cli(["chat", "--max-new-tokens", "3", "--greedy"], tmp_path, stdin=b"hello\n\xff\xfe bad\nagain\n",
                env={"LC_ALL": locale, "LANG": locale, "PYTHONIOENCODING": ""})
    out, err = proc.stdout.decode("utf-8", "replace"), proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "internal error" not in err
    assert "that line is not valid UTF-8 (byte 0xff at character 0)" in out and "type it again" in out
    assert out.count("assistant> ") == 2  # "hello" and "again" were answered


def _limit_file_size(limit: int):
    import resource

    def preexec():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # Python ignores SIGXFSZ: writes fail with EFBIG
    return preexec


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_full_disk_while_saving_a_training_checkpoint_keeps_the_previous_one(tmp_path):
    """RLIMIT_FSIZE below the size of the optimizer state: the checkpoint save of a resumed run
    fails. One line names the file and the fix (exit 1, not 70), the previous last/ checkpoint
    is intact byte for byte, and no temporary is left."""
    (tmp_path / "t.txt").write_text(("First Citizen:\nBefore we proceed any further, hear me speak.\n" * 300))
    train = ["train", "--data", "t.txt", "--out", "run", "--preset", "tiny", "--eval-interval", "2", "--eval-batches", "1",
             "--batch-size", "2", "--block-size", "32", "--quiet"]
    first = _cli([*train, "--steps", "2"], tmp_path)
    assert first.returncode == 0, first.stderr.decode()
    last = tmp_path / "run" / "last"
    before = _snapshot(last)
    biggest = max(len(b) for b in before.values())
    proc = _cli([*train, "--steps", "4", "--resume"], tmp_path, preexec=_limit_file_size(biggest - 1000))
    err = proc.stderr.decode().strip().splitlines()
    assert proc.returncode == 1, err
    assert len(err) == 1 and err[0].startswith("error: File too large") and "ulimit -f" in err[0], err
    assert str(last) in err[0]
    assert _snapshot(last) == before
    assert temporaries(last) == []
