"""Exercises of notebook 11_classification."""

from __future__ import annotations

import torch
from ...training.classification import classification_metrics

from .checking import Cases, register, _gen


def _spam_f1_cases() -> Cases:
    g = _gen(11)
    truth = (torch.rand(60, generator=g) < 0.2).long().tolist()
    noisy = [y if r > 0.25 else 1 - y for y, r in zip(truth, torch.rand(60, generator=g).tolist())]
    few = [1, 1, 0, 0, 0, 0, 0, 0, 0, 1]
    return [
        ("60 messages, 20 % spam, a quarter of the answers wrong", (truth, noisy)),
        ("10 messages: 2 of 3 spam caught, 1 false alarm", (few, [1, 0, 0, 1, 0, 0, 0, 0, 0, 1])),
        ("every answer right", (few, list(few))),
        ("the majority baseline: always ham", (few, [0] * 10)),
    ]


def _counts(y_true, y_pred, c=1):
    tp = sum(1 for t, p in zip(y_true, y_pred) if t == c and p == c)
    fp = sum(1 for t, p in zip(y_true, y_pred) if t != c and p == c)
    fn = sum(1 for t, p in zip(y_true, y_pred) if t == c and p != c)
    return tp, fp, fn


def _f1_of(c):
    def f1(y_true, y_pred):
        tp, fp, fn = _counts(y_true, y_pred, c)
        return 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    return f1


def _f1_no_zero_guard(y_true, y_pred):
    tp, fp, fn = _counts(y_true, y_pred)
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    return 2 * precision * recall / (precision + recall)


def _f1_arithmetic_mean(y_true, y_pred):
    tp, fp, fn = _counts(y_true, y_pred)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return (precision + recall) / 2


register(
    "spam_f1", "11_classification", "(y_true, y_pred)",
    "F1 of the spam class (label 1) from two lists of 0/1 labels, as a float; 0.0 when no spam is predicted",
    reference=lambda y_true, y_pred: classification_metrics(y_true, y_pred)["f1"],
    cases=_spam_f1_cases,
    mistakes=[
        (lambda t, p: sum(a == b for a, b in zip(t, p)) / len(t), "this is the accuracy, not the F1 of spam",
         "count true positives, false positives and false negatives of label 1: F1 = 2 TP / (2 TP + FP + FN)"),
        (_f1_of(0), "this is the F1 of ham (label 0); the rare class, spam (label 1), is the one to score",
         "count a true positive when both labels are 1"),
        (_f1_arithmetic_mean, "precision and recall are averaged; F1 is their harmonic mean",
         "2 * precision * recall / (precision + recall)"),
        (_f1_no_zero_guard, "a classifier that never says spam makes precision 0/0",
         "return 0.0 when there are no true positives (scikit-learn's zero_division=0)"),
        (lambda t, p: (lambda tp, fp, fn: tp / (tp + fp) if tp + fp else 0.0)(*_counts(t, p)),
         "this is the precision of spam (TP / (TP + FP)); F1 combines it with the recall", "F1 = 2 TP / (2 TP + FP + FN)"),
        (lambda t, p: (lambda tp, fp, fn: tp / (tp + fn) if tp + fn else 0.0)(*_counts(t, p)),
         "this is the recall of spam (TP / (TP + FN)); F1 combines it with the precision", "F1 = 2 TP / (2 TP + FP + FN)"),
        (lambda t, p: (lambda tp, fp, fn: tp / (tp + fp + fn) if tp else 0.0)(*_counts(t, p)),
         "TP / (TP + FP + FN) is the Jaccard index (IoU); F1 counts the true positives twice: the factor 2 TP is missing",
         "F1 = 2 TP / (2 TP + FP + FN)"),
        (lambda t, p: (lambda tp, fp, fn: 2 * tp / (tp + fp + fn) if tp else 0.0)(*_counts(t, p)),
         "2 TP / (TP + FP + FN): the factor 2 belongs in the denominator's TP too", "F1 = 2 TP / (2 TP + FP + FN)"),
        (lambda t, p: (lambda tp, fp, fn: 2 * tp // (2 * tp + fp + fn) if tp else 0.0)(*_counts(t, p)),
         "integer division (//) rounds the F1 down to 0 or 1", "use / for a float: 2 * tp / (2 * tp + fp + fn)"),
        (lambda t, p: 100 * _f1_of(1)(t, p), "the F1 is a percentage (x100); the exercise wants a fraction between 0 and 1", "drop the factor 100"),
        (lambda t, p: (_f1_of(1)(t, p) + _f1_of(0)(t, p)) / 2, "this is the macro F1 (the mean of both classes' F1); the exercise wants the F1 of spam",
         "count only label 1 as positive"),
    ],
)
