"""Exercises of notebook 10_pretraining."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from ...modeling import causal_lm_loss

from .checking import Cases, register, _gen


def _causal_lm_loss_cases() -> Cases:
    g = _gen(10)
    logits = torch.randn(2, 7, 11, generator=g) * 3
    labels = torch.randint(0, 11, (2, 7), generator=g)
    padded = labels.clone()
    padded[0, 4:] = -100  # right padding in the first row
    padded[1, :3] = -100  # a prompt that is not trained on in the second
    return [
        ("2 x 7 tokens, vocab 11, every label counts", (logits, labels)),
        ("the same with -100 on padding and on a prompt", (logits, padded)),
        ("one sequence of 2 tokens (one prediction)", (logits[:1, :2], labels[:1, :2])),
        ("peaked logits: a confident model", (F.one_hot(labels, 11).float() * 8, padded)),
    ]


def _loss_no_shift(logits, labels):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)


def _loss_shift_backwards(logits, labels):
    return F.cross_entropy(logits[:, 1:].reshape(-1, logits.shape[-1]), labels[:, :-1].reshape(-1), ignore_index=-100)


def _loss_minus_100_as_token_0(logits, labels):
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    return -logp.gather(-1, labels[:, 1:].clamp(min=0).unsqueeze(-1)).mean()


def _loss_minus_100_in_the_count(logits, labels):
    per_token = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100,
                                reduction="none")
    return per_token.sum() / per_token.numel()


def _loss_shifted(logits, labels):
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)


def _loss_sum(logits, labels):
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100,
                           reduction="sum")


def _loss_per_sequence(logits, labels):
    return torch.stack([F.cross_entropy(logits[b, :-1], labels[b, 1:], ignore_index=-100) for b in range(logits.shape[0])]).mean()


register(
    "causal_lm_loss", "10_pretraining", "(logits, labels)",
    "the mean next-token cross-entropy: logits (batch, seq, vocab) at t predict labels[:, t + 1]; labels of -100 do not count",
    reference=causal_lm_loss,
    cases=_causal_lm_loss_cases,
    mistakes=[
        (_loss_no_shift, "the labels are not shifted: position t is scored on its own token, not the next one",
         "compare logits[:, :-1] with labels[:, 1:]"),
        (_loss_shift_backwards, "the shift goes the wrong way: each position is scored on the token before it",
         "drop the LAST logit and the FIRST label: logits[:, :-1] with labels[:, 1:]"),
        (_loss_minus_100_as_token_0, "labels of -100 (padding, an untrained prompt) are read as token 0 instead of being ignored",
         "leave them out: F.cross_entropy(..., ignore_index=-100), or mask them before gathering"),
        (_loss_minus_100_in_the_count, "ignored positions (-100: padding, prompt) are counted in the number of tokens the mean divides by",
         "divide by the number of labels that are not -100"),
        (_loss_sum, "the loss is the sum over tokens, not the mean", "average over the tokens that count (reduction='mean')"),
        (_loss_per_sequence, "the loss is averaged per sequence, then over the batch: a sequence with fewer labelled tokens counts as much as a long one",
         "one mean over all the labelled tokens of the batch: flatten (batch, seq) before cross_entropy"),
        (lambda lg, lb: F.nll_loss(lg[:, :-1].reshape(-1, lg.shape[-1]), lb[:, 1:].reshape(-1), ignore_index=-100),
         "the raw logits go into nll_loss, which expects log-probabilities: log_softmax is missing",
         "F.cross_entropy(logits, labels) (it applies log_softmax itself), or F.nll_loss(F.log_softmax(logits, -1), labels)"),
        (lambda lg, lb: F.nll_loss(lg[:, :-1].softmax(-1).reshape(-1, lg.shape[-1]), lb[:, 1:].reshape(-1), ignore_index=-100),
         "nll_loss gets probabilities (softmax), not log-probabilities (log_softmax)", "F.cross_entropy on the logits"),
        (lambda lg, lb: F.cross_entropy(lg[:, :-1], lb[:, 1:], ignore_index=-100),
         "cross_entropy takes the classes on dim 1: (batch, seq, vocab) must be flattened to (batch * seq, vocab) first",
         "F.cross_entropy(logits[:, :-1].reshape(-1, vocab), labels[:, 1:].reshape(-1))"),
        (lambda lg, lb: F.cross_entropy(lg[:, 1:].reshape(-1, lg.shape[-1]), lb[:, 1:].reshape(-1), ignore_index=-100),
         "logits and labels are cut the same way ([:, 1:] for both): the shift needs logits[:, :-1] with labels[:, 1:]",
         "drop the LAST logit and the FIRST label"),
        (lambda lg, lb: F.cross_entropy(lg[:, :-1].reshape(-1, lg.shape[-1]), lb[:, :-1].reshape(-1), ignore_index=-100),
         "logits and labels are cut the same way ([:, :-1] for both): the shift needs logits[:, :-1] with labels[:, 1:]",
         "drop the LAST logit and the FIRST label"),
        (lambda lg, lb: F.cross_entropy(lg[:, :-1].reshape(-1, lg.shape[-1]), lb[:, 1:].reshape(-1), ignore_index=0),
         "ignore_index=0 skips token 0 and leaves the -100 labels in (out of bounds): the labels to skip are -100",
         "ignore_index=-100 (cross_entropy's default)"),
        (lambda lg, lb: F.nll_loss(lg[:, :-1].log_softmax(1).reshape(-1, lg.shape[-1]), lb[:, 1:].reshape(-1), ignore_index=-100),
         "log_softmax runs over dim 1 (the positions); the probabilities are over the vocabulary, the last dimension",
         "log_softmax(dim=-1), or F.cross_entropy on the flattened logits"),
        (lambda lg, lb: _loss_shifted(lg, lb).exp(), "this is the perplexity exp(loss), not the loss", "return the mean cross-entropy itself"),
        (lambda lg, lb: -_loss_shifted(lg, lb), "the loss has the wrong sign: cross-entropy is -log p, a positive number", "mean of -log p(label)"),
    ],
)
