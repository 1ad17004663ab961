"""`python -m llama_edu generate | chat`, run in-process."""

from __future__ import annotations

import io
import shutil
import warnings

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
    monkeypatch.setattr(llama_edu.cli, "DEFAULT_MODEL_DIR", tmp_path / "shakespeare-llama")
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
