"""Sequence classification on the real SMS spam collection: data, split, padding, metrics, and a
short fine-tuning run that beats the majority baseline."""

from __future__ import annotations

import pytest
import torch

from llama_edu import LlamaConfig, LlamaForSequenceClassification, LlamaTokenizer
from llama_edu.classification import (LABELS, batches, classification_metrics, evaluate_classifier, fine_tune,
                                      load_sms_spam, load_spam_splits, majority_baseline, predict, set_pad_token,
                                      stratified_split, subsample)
from llama_edu.files import DEFAULT_MODEL_DIR

TINY = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="module")
def splits():
    return load_spam_splits()


@pytest.fixture()
def tok():
    return LlamaTokenizer.from_pretrained(DEFAULT_MODEL_DIR)


def test_collection_counts_and_labels():
    texts, labels = load_sms_spam()
    assert len(texts) == 5574 and labels.count(0) == 4827 and labels.count(1) == 747  # the UCI counts
    assert LABELS[labels[2]] == "spam" and texts[2].startswith("Free entry in 2 a wkly comp")


def test_bad_line_names_the_line(tmp_path):
    path = tmp_path / "bad.tsv"
    path.write_text("ham\thello\nnot a label line\n", encoding="utf-8")
    with pytest.raises(ValueError, match="line 2"):
        load_sms_spam(path)


def test_split_is_stratified_fixed_and_disjoint(splits):
    _, labels = load_sms_spam()
    train, test = stratified_split(labels)
    assert (train, test) == stratified_split(labels)  # same every time
    assert not set(train) & set(test) and len(train) + len(test) == len(labels)
    assert len(splits.test_labels) == 1114 and splits.test_labels.count(1) == 149  # 20 % of each class
    assert len(splits.train_labels) == 4460 and splits.train_labels.count(1) == 598
    assert stratified_split(labels, seed=1)[1] != test  # the seed picks the messages
    with pytest.raises(ValueError, match="test_fraction"):
        stratified_split(labels, 1.0)
    sub_texts, sub_labels = subsample(splits.train_texts, splits.train_labels, 300)
    assert len(sub_texts) == 300 and 35 <= sub_labels.count(1) <= 45  # the 13.4 % spam kept
    assert all(t in set(splits.train_texts) for t in sub_texts)


def test_majority_baseline_is_86_6_percent_ham(splits):
    base = majority_baseline(splits.train_labels, splits.test_labels)
    assert round(base["accuracy"], 3) == 0.866 and base["f1"] == 0.0
    assert base["confusion"] == [[965, 0], [149, 0]]


def test_metrics_by_hand():
    y_true = [0, 0, 0, 0, 1, 1, 1, 0]
    y_pred = [0, 1, 0, 0, 1, 0, 1, 0]
    m = classification_metrics(y_true, y_pred)
    assert m["confusion"] == [[4, 1], [1, 2]]  # rows truth, columns prediction
    assert m["accuracy"] == 6 / 8
    assert m["precision"] == 2 / 3 and m["recall"] == 2 / 3 and m["f1"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="one length"):
        classification_metrics([0, 1], [0])


def test_pad_token_the_documented_way_and_batches(tok, splits):
    model = LlamaForSequenceClassification(LlamaConfig(vocab_size=2048, num_labels=2, **TINY))
    with pytest.raises(ValueError, match="set_pad_token"):
        next(batches(tok, ["hi"], [0]))
    assert set_pad_token(tok, model) == tok.unk_token_id == model.config.pad_token_id == 0
    assert tok.pad_token == "<unk>"
    texts, labels = splits.train_texts[:7], splits.train_labels[:7]
    (b,) = list(batches(tok, texts, labels, batch_size=8, max_length=12))
    assert b["input_ids"].shape == b["attention_mask"].shape and b["input_ids"].shape[1] <= 12
    assert b["labels"].tolist() == labels
    last = b["attention_mask"].sum(1) - 1  # right padding: the last attended position
    assert (b["input_ids"][torch.arange(7), last] == tok.eos_token_id).all()  # EOS kept through truncation
    assert (b["input_ids"][:, 0] == tok.bos_token_id).all()
    assert (b["input_ids"][b["attention_mask"] == 0] == 0).all()
    # The head reads the EOS position: logits equal those of each row alone, without padding.
    model.eval()
    with torch.no_grad():
        batched = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        for i in range(7):
            n = int(b["attention_mask"][i].sum())
            alone = model(input_ids=b["input_ids"][i : i + 1, :n]).logits
            assert torch.allclose(batched[i], alone[0], atol=1e-5)


def test_fine_tune_beats_the_baseline_on_real_messages(tok, splits):
    """A small pretrained-body run on 480 real training messages; scored on 400 test messages."""
    torch.manual_seed(0)
    model = LlamaForSequenceClassification.from_pretrained(DEFAULT_MODEL_DIR, num_labels=2)
    set_pad_token(tok, model)
    texts, labels = subsample(splits.train_texts, splits.train_labels, 480)
    test_texts, test_labels = subsample(splits.test_texts, splits.test_labels, 400)
    seen = []
    losses = fine_tune(model, tok, texts, labels, steps=40, batch_size=16, max_length=32, lr=2e-3,
                       on_step=lambda step, loss: seen.append(step))
    assert seen == list(range(1, 41)) and len(losses) == 40
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    result = evaluate_classifier(model, tok, test_texts, test_labels, max_length=32)
    baseline = majority_baseline(labels, test_labels)
    assert result["accuracy"] > baseline["accuracy"] + 0.03 and result["f1"] > 0.5
    # predict() returns the input order, whatever order it batches in.
    shuffled = list(reversed(test_texts[:50]))
    assert predict(model, tok, shuffled, max_length=32).tolist() == list(reversed(predict(model, tok, test_texts[:50], max_length=32).tolist()))


def test_fine_tune_updates_only_trainable_parameters(tok, splits):
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(LlamaConfig(vocab_size=2048, num_labels=2, **TINY))
    set_pad_token(tok, model)
    for p in model.model.parameters():
        p.requires_grad_(False)  # a frozen body, as LoRA leaves it
    body = {k: v.clone() for k, v in model.model.state_dict().items()}
    head = model.score.weight.detach().clone()
    fine_tune(model, tok, splits.train_texts[:40], splits.train_labels[:40], steps=3, batch_size=8, max_length=16)
    assert all(torch.equal(v, model.model.state_dict()[k]) for k, v in body.items())
    assert not torch.equal(head, model.score.weight)
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        fine_tune(model, tok, ["a"], [0], steps=1)


def test_spam_f1_exercise_both_ways(capsys):
    from llama_edu.exercises import check

    def counted(y_true, y_pred):  # a correct answer written differently
        pairs = list(zip(y_true, y_pred))
        tp, fp, fn = pairs.count((1, 1)), pairs.count((0, 1)), pairs.count((1, 0))
        return 2 * tp / (2 * tp + fp + fn) if tp else 0.0

    assert check("spam_f1", counted)
    assert not check("spam_f1", lambda t, p: sum(a == b for a, b in zip(t, p)) / len(t))
    assert "Likely mistake: this is the accuracy" in capsys.readouterr().out
