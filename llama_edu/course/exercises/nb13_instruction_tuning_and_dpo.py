"""Exercises of notebook 13_instruction_tuning_and_dpo."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from ...training.dpo import dpo_loss
from ...training.sft import assistant_labels

from .checking import Cases, register, _gen


def _labels_cases() -> Cases:
    g = _gen(130)
    ids = torch.randint(3, 2048, (25,), generator=g)
    return [
        ("one answer: tokens 17-24", (ids.clone(), [(17, 25)])),
        ("two answers in a multi-turn chat", (torch.randint(3, 2048, (30,), generator=g), [(8, 13), (24, 30)])),
        ("an answer in the middle", (torch.randint(3, 2048, (12,), generator=g), [(4, 9)])),
    ]


def _labels_variant(ids, spans, fill=-100, inclusive=False, skip_first=False, invert=False, shift=False, drop_last=False,
                    first_span_only=False, shift_right=False):
    keep = torch.zeros(ids.shape, dtype=torch.bool)
    for s, e in spans[:1] if first_span_only else spans:
        keep[s + int(skip_first): e + int(inclusive) - int(drop_last)] = True
    if shift_right:
        return torch.cat([ids.new_full((1,), fill), torch.where(keep, ids, torch.full_like(ids, fill))[:-1]])
    if invert:
        keep = ~keep
    out = torch.where(keep, ids, torch.full_like(ids, fill))
    if shift:
        out = torch.cat([out[1:], out.new_full((1,), fill)])
    return out


register(
    "assistant_labels", "13_instruction_tuning_and_dpo", "(input_ids, assistant_spans)",
    "SFT labels: input_ids inside the [start, end) assistant spans, -100 everywhere else (not shifted)",
    reference=assistant_labels,
    cases=_labels_cases,
    mistakes=[
        (lambda ids, spans: ids.clone(), "nothing is masked: the loss would also train the model to write the user's prompt",
         "set the labels outside the assistant spans to -100"),
        (lambda ids, spans: _labels_variant(ids, spans, fill=0), "the masked positions hold 0, a real token id (<unk>), not -100",
         "cross_entropy skips only ignore_index = -100; fill with -100"),
        (lambda ids, spans: _labels_variant(ids, spans, invert=True), "the mask is inverted: the prompt is kept and the answer masked",
         "keep the labels inside the spans and mask the rest"),
        (lambda ids, spans: _labels_variant(ids, spans, inclusive=True), "the spans' end is included: [start, end) is half-open",
         "keep positions start <= t < end, i.e. labels[start:end]"),
        (lambda ids, spans: _labels_variant(ids, spans, skip_first=True), "the first assistant token is masked",
         "the span starts at the answer's first token: keep labels[start:end]"),
        (lambda ids, spans: _labels_variant(ids, spans, shift=True), "the labels are shifted by one; the model shifts them itself inside its loss",
         "put each label under its own token: labels[t] = input_ids[t]"),
        (lambda ids, spans: _labels_variant(ids, spans, shift_right=True), "the labels are shifted right by one (each label sits under the next token); the model shifts them itself inside its loss",
         "put each label under its own token: labels[t] = input_ids[t]"),
        (lambda ids, spans: _labels_variant(ids, spans, drop_last=True), "the last assistant token is masked (end - 1: off by one); [start, end) already excludes end",
         "labels[start:end] = input_ids[start:end]"),
        (lambda ids, spans: _labels_variant(ids, spans, fill=-1), "the masked positions hold -1, not -100: cross_entropy skips only ignore_index = -100",
         "fill with -100"),
        (lambda ids, spans: _labels_variant(ids, spans, first_span_only=True), "only the first assistant span is kept; every answer of the chat is trained on",
         "loop over all the spans"),
        (lambda ids, spans: _labels_variant(ids, spans).float(), "the labels are float (dtype); token ids and -100 must stay int64 (long)",
         "torch.full_like(input_ids, -100), which keeps the dtype"),
    ],
)


def _dpo_cases() -> Cases:
    g = _gen(131)
    def logps(n):
        return -torch.rand(n, generator=g) * 30 - 1  # sequence log-probs are negative
    return [
        ("8 pairs, beta = 0.1", (logps(8), logps(8), logps(8), logps(8), 0.1)),
        ("5 pairs, beta = 0.5", (logps(5), logps(5), logps(5), logps(5), 0.5)),
        ("one pair the policy gets badly wrong, beta = 1 (z = -200)",
         (torch.tensor([-250.0]), torch.tensor([-50.0]), torch.tensor([-50.0]), torch.tensor([-50.0]), 1.0)),
    ]


def _dpo_logits(pc, pr, rc, rr):
    return (pc - rc) - (pr - rr)


register(
    "dpo_loss", "13_instruction_tuning_and_dpo",
    "(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta)",
    "the DPO loss (Rafailov et al. 2023, eq. 7): mean of -log sigmoid(beta((pi_c - ref_c) - (pi_r - ref_r)))",
    reference=dpo_loss,
    cases=_dpo_cases,
    mistakes=[
        (lambda pc, pr, rc, rr, beta: -F.logsigmoid(-beta * _dpo_logits(pc, pr, rc, rr)).mean(),
         "the sign is flipped (-beta, or ref - pi instead of pi - ref): this loss rewards the rejected answers", "the argument of log sigmoid is +beta * (chosen log-ratio - rejected log-ratio)"),
        (lambda pc, pr, rc, rr, beta: -F.logsigmoid(beta * (pc - pr)).mean(),
         "the reference model is missing: without it the loss only widens the policy's own gap, with nothing holding it near the reference",
         "use the log-ratios pi - ref for both answers"),
        (lambda pc, pr, rc, rr, beta: -F.logsigmoid(_dpo_logits(pc, pr, rc, rr)).mean(),
         "beta is missing", "multiply the difference of log-ratios by beta before the log sigmoid"),
        (lambda pc, pr, rc, rr, beta: -F.logsigmoid(beta * ((pc - rc) + (pr - rr))).mean(),
         "the two log-ratios are added; DPO takes chosen minus rejected", "(pi_c - ref_c) - (pi_r - ref_r)"),
        (lambda pc, pr, rc, rr, beta: -F.logsigmoid(beta * _dpo_logits(pc, pr, rc, rr)).sum(),
         "the losses are summed, not averaged", "take the mean over the pairs"),
        (lambda pc, pr, rc, rr, beta: -F.logsigmoid(beta * _dpo_logits(pc, pr, rc, rr)),
         "returns one loss per pair instead of their mean", "end with .mean()"),
        (lambda pc, pr, rc, rr, beta: -torch.log(torch.sigmoid(beta * _dpo_logits(pc, pr, rc, rr))).mean(),
         "log(sigmoid(z)) overflows: sigmoid(-200) is 0 in float32 and log(0) = -inf (log(1 + exp(-z)) overflows the same way: exp(200) = inf)",
         "use F.logsigmoid(z) (or -F.softplus(-z)), which never forms the tiny probability"),
        (lambda pc, pr, rc, rr, beta: -F.logsigmoid(beta * (pc - rc) - (pr - rr)).mean(),
         "beta multiplies only the chosen log-ratio: the parentheses are missing around the difference", "beta * ((pi_c - ref_c) - (pi_r - ref_r))"),
        (lambda pc, pr, rc, rr, beta: F.logsigmoid(beta * _dpo_logits(pc, pr, rc, rr)).mean(),
         "the minus sign is missing: the loss is -log sigmoid(z), a positive number to minimise", "-F.logsigmoid(z).mean()"),
        (lambda pc, pr, rc, rr, beta: -torch.sigmoid(beta * _dpo_logits(pc, pr, rc, rr)).mean(),
         "sigmoid instead of log sigmoid: the log is missing", "-F.logsigmoid(z).mean()"),
        (lambda pc, pr, rc, rr, beta: -F.logsigmoid(_dpo_logits(pc, pr, rc, rr) / beta).mean(),
         "the log-ratios are divided by beta; beta multiplies them", "beta * ((pi_c - ref_c) - (pi_r - ref_r))"),
    ],
)
