"""`python -m llama_edu generate | chat`, run in-process."""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

import llama_edu
import llama_edu.cli
from llama_edu.cli import main
from llama_edu.files import PROJECT_DATA_DIR

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """An HF-layout folder written by transformers, with the project's tokenizer.model."""
    path = tmp_path_factory.mktemp("cli_model")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=2048, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    shutil.copy(PROJECT_DATA_DIR / "tokenizer.model", path / "tokenizer.model")
    return path


def run(argv, capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def expected_text(model_dir, prompt, max_new_tokens, **gen_kwargs):
    from llama_edu.tokenizer import LlamaTokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tok = LlamaTokenizer.from_pretrained(model_dir)
        model = llama_edu.LlamaForCausalLM.from_pretrained(model_dir)
        ids = model.generate(torch.tensor([tok.encode(prompt)]), max_new_tokens=max_new_tokens, eos_token_id=2,
                             pad_token_id=2, **gen_kwargs)
    return tok.decode(ids[0].tolist(), skip_special_tokens=True) + "\n"


def test_generate_greedy_streams_the_continuation(model_dir, capsys):
    rc, out, err = run(["generate", "--model", str(model_dir), "--prompt", "To be, or not", "--max-new-tokens", "12",
                        "--greedy"], capsys)
    assert rc == 0, err
    assert out.startswith("To be, or not")
    assert out == expected_text(model_dir, "To be, or not", 12)
    rc, out0, _ = run(["generate", "--model", str(model_dir), "--prompt", "To be, or not", "--max-new-tokens", "12",
                       "--temperature", "0"], capsys)
    assert out0 == out  # temperature 0 is greedy


def test_generate_default_sampling_is_seeded(model_dir, capsys):
    args = ["generate", "--model", str(model_dir), "--prompt", "ROMEO:", "--max-new-tokens", "15"]
    _, a, _ = run(args, capsys)
    _, b, _ = run(args, capsys)
    _, c, _ = run(args + ["--seed", "1"], capsys)
    assert a == b and a != c
    assert a == expected_text(model_dir, "ROMEO:", 15, do_sample=True, temperature=0.8, top_k=0, top_p=0.95, seed=0)


def test_missing_model_dir_is_one_clear_line(tmp_path, capsys):
    rc, out, err = run(["generate", "--model", str(tmp_path / "nope"), "--prompt", "hi"], capsys)
    assert rc == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: ") and "does not exist" in err


def test_missing_default_model_says_how_to_get_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys.modules["llama_edu.generation.chat"], "DEFAULT_MODEL_DIR", tmp_path / "shakespeare-llama")
    rc, _, err = run(["generate", "--prompt", "hi"], capsys)
    assert rc == 1 and err.count("\n") == 1 and "python -m llama_edu train" in err


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--max-new-tokens", "0"], "--max-new-tokens"),
        (["--temperature", "-1"], "--temperature"),
        (["--top-p", "1.5"], "--top-p"),
        (["--dtype", "float13"], "float13"),
    ],
)
def test_bad_options_are_one_clear_line(model_dir, capsys, extra, match):
    rc, _, err = run(["generate", "--model", str(model_dir), "--prompt", "hi", *extra], capsys)
    assert rc == 1 and err.count("\n") == 1 and match in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_gpu_is_a_clear_error(model_dir, capsys):
    rc, _, err = run(["generate", "--model", str(model_dir), "--prompt", "hi", "--device", "cuda"], capsys)
    assert rc == 1 and "no CUDA GPU" in err


def test_chat_reads_turns_until_eof(model_dir, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("Good morrow\n\nWhat news?\n/reset\nFarewell\n"))
    rc, out, err = run(["chat", "--model", str(model_dir), "--system", "Speak as a bard.", "--max-new-tokens", "6",
                        "--greedy"], capsys)
    assert rc == 0, err
    assert out.count("assistant> ") == 3
    assert "(history cleared)" in out


def test_generate_with_the_default_model_is_deterministic(capsys):
    args = ["generate", "--prompt", "ROMEO:", "--max-new-tokens", "20"]
    rc, a, err = run(args, capsys)
    assert rc == 0, err
    _, b, _ = run(args, capsys)
    assert a == b and a.startswith("ROMEO:") and len(a) > len("ROMEO:") + 10


# -- Ctrl-C and terminal safety, as a user meets them: real processes and real signals ----------


@pytest.fixture(scope="module")
def slow_model_dir(tmp_path_factory):
    """A model big enough (and with a long enough context) that generating takes seconds."""
    path = tmp_path_factory.mktemp("slow_model")
    torch.manual_seed(0)
    cfg = llama_edu.LlamaConfig(vocab_size=2048, hidden_size=256, intermediate_size=688, num_hidden_layers=6,
                                num_attention_heads=8, max_position_embeddings=4096)
    llama_edu.LlamaForCausalLM(cfg).save_pretrained(path)
    shutil.copy(PROJECT_DATA_DIR / "tokenizer.model", path / "tokenizer.model")
    return path


def _spawn(args, **kw):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "llama_edu", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=kw.pop("stdin", subprocess.DEVNULL), env=env, cwd=Path(llama_edu.__file__).parent.parent, **kw)


def _wait_for(stream, text: str, timeout: float = 60.0) -> str:
    """Read ``stream`` until ``text`` appears (or fail after ``timeout`` seconds)."""
    seen, deadline = "", time.monotonic() + timeout
    while text not in seen:
        assert time.monotonic() < deadline, f"no {text!r} in {seen!r}"
        seen += os.read(stream.fileno(), 4096).decode(errors="replace")
    return seen


def test_ctrl_c_during_generate_flushes_and_exits_130(slow_model_dir):
    proc = _spawn(["generate", "--model", str(slow_model_dir), "--prompt", "To be", "--max-new-tokens", "4000", "--greedy"])
    seen = _wait_for(proc.stdout, "To be")  # streaming has started
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "Traceback" not in err.decode()
    assert (seen + out.decode()).endswith("\n")  # the streamed text was flushed and the line ended


def test_ctrl_c_during_a_chat_answer_keeps_the_session(slow_model_dir):
    proc = _spawn(["chat", "--model", str(slow_model_dir), "--max-new-tokens", "3000", "--greedy"], stdin=subprocess.PIPE)
    proc.stdin.write(b"Good morrow\n")
    proc.stdin.flush()
    _wait_for(proc.stdout, "assistant> ")
    time.sleep(0.5)  # let the answer begin
    proc.send_signal(signal.SIGINT)
    _wait_for(proc.stdout, "(stopped)")
    proc.stdin.write(b"/exit\n")  # the session goes on: it still reads commands
    proc.stdin.flush()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode()
    assert "Traceback" not in err.decode()


def test_terminal_control_characters_are_stripped(capsys):
    """Byte tokens can spell escape sequences; the command line never prints them."""
    from llama_edu.generation.streaming import TerminalStreamer, printable

    assert printable("a\x1b[31mb\x07\r\x9b\n\tc") == "a[31mb\n\tc"
    tok = llama_edu.LlamaTokenizer.from_pretrained(PROJECT_DATA_DIR / "tokenizer.model")
    ids = tok.encode("Hark\x1b[2J\x1b]0;owned\x07 now", add_special_tokens=False)
    assert "\x1b" in tok.decode(ids)  # the tokenizer does round-trip the escape bytes ...
    streamer = TerminalStreamer(tok)
    streamer.put(torch.tensor([ids]))
    streamer.end()
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "Hark" in out  # ... the terminal never sees them
