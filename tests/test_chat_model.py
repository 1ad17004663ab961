"""The shipped chat model, data/shakespeare-chat (a LoRA adapter on the Shakespeare model, made by
scripts/train_chat_model.py): it loads on its base, answers held-out requests in the taught format,
and is what `python -m llama_edu chat` talks to by default."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from llama_edu.generation.chat import load_model_and_tokenizer
from llama_edu.io.files import DEFAULT_CHAT_MODEL_DIR, DEFAULT_MODEL_DIR
from llama_edu.training.sft import SFT_DATA, evaluate_format, load_jsonl

ROOT = Path(__file__).resolve().parent.parent


def test_the_chat_model_is_small_and_names_its_base():
    sizes = sum(p.stat().st_size for p in DEFAULT_CHAT_MODEL_DIR.iterdir())
    assert sizes < 2_000_000  # a few hundred KB: the adapter, not a second copy of the model
    assert (DEFAULT_CHAT_MODEL_DIR / "adapter_config.json").is_file() and not (DEFAULT_CHAT_MODEL_DIR / "config.json").exists()


def test_held_out_requests_get_answers_in_the_taught_format():
    model, tok = load_model_and_tokenizer(DEFAULT_CHAT_MODEL_DIR, device="cpu")
    rows = load_jsonl(SFT_DATA, split="test")
    report, answers = evaluate_format(model, tok, rows)
    assert report["format"] >= 0.9, list(zip([r["messages"][0]["content"] for r in rows], answers))[:8]
    base, _ = load_model_and_tokenizer(DEFAULT_MODEL_DIR, device="cpu")
    assert evaluate_format(base, tok, rows[:8])[0]["format"] == 0.0  # the base model never learned the format


def test_chat_command_uses_it_by_default():
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "llama_edu", "chat", "--greedy", "--max-new-tokens", "12"],
                          input="Greet Ophelia.\n/exit\n", capture_output=True, text=True, env=env, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "Good morrow, " in proc.stdout, proc.stdout


def test_an_adapter_without_a_base_fails_clearly(tmp_path):
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}')
    with pytest.raises(ValueError, match="no base_model_name_or_path"):
        load_model_and_tokenizer(tmp_path)
