"""SFT: labels on the assistant's tokens only (token by token), padding that changes nothing,
the loss, clear errors, the project's instruction set, and a short run that learns."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from llama_edu import LlamaConfig, LlamaForCausalLM, LlamaTokenizer
from llama_edu.files import DEFAULT_MODEL_DIR
from llama_edu.sft import (
    IGNORE_INDEX,
    SFT_DATA,
    assistant_labels,
    collate,
    format_report,
    load_jsonl,
    pad_id,
    sft_loss,
    tokenize_chat,
    train_sft,
)

from conftest import SMALL


@pytest.fixture(scope="module")
def tok():
    return LlamaTokenizer.from_pretrained(DEFAULT_MODEL_DIR)


CONV = [{"role": "user", "content": "Greet Romeo."}, {"role": "assistant", "content": "Good morrow, Romeo!"}]


def test_labels_cover_exactly_the_assistant_tokens(tok):
    ex = tokenize_chat(tok, CONV)
    pieces = tok.convert_ids_to_tokens(ex["input_ids"].tolist())
    # <s>[INST] Greet Romeo. [/INST] Good morrow, Romeo! </s>
    prompt = ["<s>", "▁", "<0x5B>", "IN", "ST", "<0x5D>", "▁G", "re", "et", "▁Romeo", ".", "▁", "<0x5B>", "<0x2F>", "IN", "ST", "<0x5D>"]
    answer = ["▁Good", "▁m", "orrow", ",", "▁Romeo", "!", "▁", "</s>"]
    assert pieces == prompt + answer
    assert ex["spans"] == [(len(prompt), len(prompt) + len(answer))]
    for i, (piece, tid, label) in enumerate(zip(pieces, ex["input_ids"].tolist(), ex["labels"].tolist())):
        if i < len(prompt):
            assert label == IGNORE_INDEX, (i, piece)
        else:
            assert label == tid, (i, piece)  # not shifted: the model shifts inside its loss
    assert ex["input_ids"].tolist() == tok.apply_chat_template(CONV)


def test_multi_turn_with_system_labels_every_answer_and_nothing_else(tok):
    conv = [
        {"role": "system", "content": "Speak briefly."},
        {"role": "user", "content": "Greet Romeo."},
        {"role": "assistant", "content": "Good morrow, Romeo!"},
        {"role": "user", "content": "Thank Juliet."},
        {"role": "assistant", "content": "I thank you, Juliet."},
    ]
    ex = tokenize_chat(tok, conv)
    ids, labels = ex["input_ids"].tolist(), ex["labels"].tolist()
    assert len(ex["spans"]) == 2
    answers = [tok.decode(ids[s:e]) for s, e in ex["spans"]]
    assert [a.strip() for a in answers] == ["Good morrow, Romeo! </s>", "I thank you, Juliet. </s>"]
    kept = [i for i, lab in enumerate(labels) if lab != IGNORE_INDEX]
    assert kept == [i for s, e in ex["spans"] for i in range(s, e)]
    assert "Thank Juliet" in tok.decode(ids[ex["spans"][0][1] : ex["spans"][1][0]])  # the user turn between is masked


def test_assistant_labels_reference():
    ids = torch.tensor([5, 6, 7, 8, 9, 10])
    assert assistant_labels(ids, [(1, 3), (4, 6)]).tolist() == [-100, 6, 7, -100, 9, 10]
    assert assistant_labels(ids, []).tolist() == [-100] * 6


TINYLLAMA_TEMPLATE = (  # TinyLlama-1.1B-Chat-v1.0's tokenizer_config.json (Zephyr's format)
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"
)


def test_a_jinja_template_like_tinyllamas_works():
    tok2 = LlamaTokenizer.from_pretrained(DEFAULT_MODEL_DIR)
    tok2.chat_template = TINYLLAMA_TEMPLATE
    ex = tokenize_chat(tok2, CONV)
    s, e = ex["spans"][0]
    # The role header "<|assistant|>" is prompt (the generation prompt), the answer and its </s> are labels.
    assert tok2.decode(ex["input_ids"][:s].tolist()).endswith("<|user|>\nGreet Romeo.</s>\n<|assistant|>\n")
    assert tok2.decode(ex["input_ids"][s:e].tolist()).strip() == "Good morrow, Romeo!</s>"
    assert (ex["labels"][:s] == IGNORE_INDEX).all() and (ex["labels"][s:e] == ex["input_ids"][s:e]).all()


def test_clear_errors(tok, tmp_path):
    with pytest.raises(ValueError, match="no assistant turn"):
        tokenize_chat(tok, [{"role": "user", "content": "Greet Romeo."}])
    with pytest.raises(ValueError, match="non-empty list of messages"):
        tokenize_chat(tok, [])
    with pytest.raises(ValueError, match="string 'role' and 'content'"):
        tokenize_chat(tok, [{"role": "user"}, {"role": "assistant", "content": "x"}])
    with pytest.raises(ValueError, match="cuts off every assistant token"):
        tokenize_chat(tok, CONV, max_length=5)
    tok2 = LlamaTokenizer.from_pretrained(DEFAULT_MODEL_DIR)
    tok2.chat_template = "{% for m in messages|reverse %}{{ m['content'] + ' ' }}{% endfor %}"  # not prefix-stable
    with pytest.raises(ValueError, match="prefix"):
        tokenize_chat(tok2, CONV)
    with pytest.raises(FileNotFoundError, match="no data file"):
        load_jsonl(tmp_path / "nope.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"messages": []}\n{oops\n')
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        load_jsonl(tmp_path / "bad.jsonl")


def test_truncation_keeps_labels_aligned(tok):
    full = tokenize_chat(tok, CONV)
    cut = tokenize_chat(tok, CONV, max_length=20)
    assert cut["input_ids"].tolist() == full["input_ids"][:20].tolist()
    assert cut["labels"].tolist() == full["labels"][:20].tolist()


def test_padding_changes_nothing():
    """A right-padded batch gives each example the loss it has alone: pads come after the
    tokens (causal attention never looks ahead) and their labels are -100."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMALL)).eval()
    a = {"input_ids": torch.tensor([1, 5, 6, 7, 8, 9, 2]), "labels": torch.tensor([-100, -100, -100, 7, 8, 9, 2])}
    b = {"input_ids": torch.tensor([1, 11, 12, 2]), "labels": torch.tensor([-100, -100, 12, 2])}
    batch = collate([a, b], pad_token_id=0)
    assert batch["input_ids"].tolist()[1] == [1, 11, 12, 2, 0, 0, 0]
    assert batch["attention_mask"].tolist()[1] == [1, 1, 1, 1, 0, 0, 0]
    assert batch["labels"].tolist()[1] == [-100, -100, 12, 2, -100, -100, -100]
    with torch.no_grad():
        loss = sft_loss(model, batch)
        per_token = []
        for ex in (a, b):  # each alone, token by token
            logits = model(ex["input_ids"][None]).logits[0]
            for t in range(1, len(ex["input_ids"])):
                if ex["labels"][t] != IGNORE_INDEX:
                    per_token.append(F.cross_entropy(logits[t - 1], ex["labels"][t]))
    assert len(per_token) == 4 + 2
    assert torch.allclose(loss, torch.stack(per_token).mean(), atol=1e-6)


def test_the_project_instruction_set():
    train, test = load_jsonl(SFT_DATA, "train"), load_jsonl(SFT_DATA, "test")
    assert (len(train), len(test)) == (252, 48)
    def name(row):
        return re.search(r"[A-Z][a-z]+(?=[.!])", row["messages"][-1]["content"]).group(0)
    assert not {name(r) for r in train} & {name(r) for r in test}  # held-out names are unseen
    for row in train + test:
        assert re.fullmatch(row["pattern"], row["messages"][-1]["content"])
    assert format_report(["Good morrow, Romeo!", "Farewell"], ["Good morrow, Romeo!", "Farewell, Juliet!"],
                         [train[0]["pattern"], r"Farewell, [A-Z][a-z]+!"]) == {"format": 0.5, "exact": 0.5}  # fmt: skip


def test_a_short_sft_run_learns_the_answers(tok):
    """12 steps on the instruction set: the assistant-token loss on training examples falls by half
    (the notebook runs longer and measures the format on held-out prompts)."""
    torch.manual_seed(0)
    model = LlamaForCausalLM.from_pretrained(DEFAULT_MODEL_DIR)
    rows = load_jsonl(SFT_DATA, "train")[:32]
    batch = collate([tokenize_chat(tok, r["messages"]) for r in rows], pad_id(tok))
    with torch.no_grad():
        before = sft_loss(model.eval(), batch).item()
    losses = train_sft(model, tok, [r["messages"] for r in rows], steps=12, batch_size=8, lr=1e-3, log=None)
    with torch.no_grad():
        after = sft_loss(model, batch).item()
    assert len(losses) == 12 and not model.training
    assert after < before / 2, (before, after)


def test_exercise_assistant_labels_both_ways(capsys):
    from llama_edu.exercises import check

    def alternative(input_ids, assistant_spans):
        labels = torch.full_like(input_ids, -100)
        for start, end in assistant_spans:
            labels[start:end] = input_ids[start:end]
        return labels

    assert check("assistant_labels", alternative)
    capsys.readouterr()
    assert not check("assistant_labels", lambda ids, spans: ids.clone())
    assert "Likely mistake: nothing is masked" in capsys.readouterr().out
    off_by_one = lambda ids, spans: torch.where(  # noqa: E731
        torch.zeros_like(ids, dtype=torch.bool).index_fill_(0, torch.tensor([t for s, e in spans for t in range(s, e + 1) if t < len(ids)]), True), ids, -100)
    assert not check("assistant_labels", off_by_one)
    assert "Likely mistake: the spans' end is included" in capsys.readouterr().out


def test_cli_sft_and_dpo_with_lora(tmp_path, capsys):
    """The commands run end to end (2 steps each) and save PEFT-layout adapters."""
    from llama_edu.cli import main

    assert main(["sft", "--steps", "2", "--batch-size", "4", "--lora-r", "2", "--out", str(tmp_path / "sft")]) == 0
    assert (tmp_path / "sft" / "adapter_model.safetensors").is_file() and (tmp_path / "sft" / "adapter_config.json").is_file()
    assert main(["dpo", "--steps", "2", "--batch-size", "4", "--lora-r", "2", "--out", str(tmp_path / "dpo")]) == 0
    assert (tmp_path / "dpo" / "adapter_model.safetensors").is_file()
    assert "trainable params" in capsys.readouterr().out


def test_cli_offline_hub_model_says_what_to_download(tmp_path, capsys, monkeypatch):
    from llama_edu.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["sft", "--model", "TinyLlama/TinyLlama-1.1B-Chat-v1.0", "--lora-r", "8", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "huggingface-cli download TinyLlama/TinyLlama-1.1B-Chat-v1.0" in err
