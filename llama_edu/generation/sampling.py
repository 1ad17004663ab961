"""Reshaping and sampling the next-token distribution.

A causal LM gives, for a prefix x_1..x_t, the logits of p(x_{t+1} | x_1..x_t). Before a token
is picked, logits processors reshape them: penalties (repetition, minimum length), then, when
sampling, the warpers (temperature, top-k, top-p). Each is a small callable
``(input_ids (batch, cur_len), scores (batch, vocab)) -> scores`` with the name, order and exact
semantics of transformers 4.37 (``generation/logits_process.py``), so that the same weights pick
the same tokens in both libraries: greedy token for token, sampling draw for draw under one seed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class LogitsProcessor:
    """Base class: reshape the next-token scores given the tokens so far."""

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        raise NotImplementedError


class LogitsProcessorList(list):
    """Apply processors in order (a list, so it prints and indexes like one)."""

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for processor in self:
            scores = processor(input_ids, scores)
        return scores


class RepetitionPenaltyLogitsProcessor(LogitsProcessor):
    """Make every token already in ``input_ids`` less likely (Keskar et al. 2019, CTRL eq. 1):
    a positive score is divided by ``penalty``, a negative one multiplied by it. The prompt
    counts (padding included, as in transformers). ``penalty > 1`` discourages repeats."""

    def __init__(self, penalty: float):
        if not isinstance(penalty, (int, float)) or not penalty > 0:
            raise ValueError(f"repetition_penalty must be a positive float (1.0 = off), got {penalty!r}")
        self.penalty = float(penalty)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        score = torch.gather(scores, 1, input_ids)  # (batch, cur_len): the score of each seen token
        score = torch.where(score < 0, score * self.penalty, score / self.penalty)
        return scores.scatter_(1, input_ids, score)


class MinNewTokensLengthLogitsProcessor(LogitsProcessor):
    """Forbid end-of-sequence until ``min_new_tokens`` tokens have been generated."""

    def __init__(self, prompt_length_to_skip: int, min_new_tokens: int, eos_token_id: int | list[int]):
        if not isinstance(min_new_tokens, int) or min_new_tokens < 0:
            raise ValueError(f"min_new_tokens must be a non-negative integer, got {min_new_tokens!r}")
        self.prompt_length_to_skip = prompt_length_to_skip
        self.min_new_tokens = min_new_tokens
        self.eos_token_id = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if input_ids.shape[-1] - self.prompt_length_to_skip < self.min_new_tokens:
            scores[:, self.eos_token_id] = -float("inf")
        return scores


class TemperatureLogitsWarper(LogitsProcessor):
    """softmax(z / T): T < 1 sharpens the distribution, T > 1 flattens it."""

    def __init__(self, temperature: float):
        if not isinstance(temperature, float) or not temperature > 0:
            hint = " For greedy decoding use do_sample=False." if temperature == 0 else ""
            raise ValueError(f"temperature must be a strictly positive float, got {temperature!r}.{hint}")
        self.temperature = temperature

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        return scores / self.temperature


class TopKLogitsWarper(LogitsProcessor):
    """Keep the ``top_k`` highest scores (ties with the k-th included), set the rest to
    ``filter_value`` (Fan et al. 2018)."""

    def __init__(self, top_k: int, filter_value: float = -float("inf"), min_tokens_to_keep: int = 1):
        if not isinstance(top_k, int) or top_k <= 0:
            raise ValueError(f"top_k must be a strictly positive integer (0 = off in generate), got {top_k!r}")
        self.top_k = max(top_k, min_tokens_to_keep)
        self.filter_value = filter_value

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        top_k = min(self.top_k, scores.size(-1))
        kth_best = torch.topk(scores, top_k)[0][..., -1, None]  # (batch, 1)
        return scores.masked_fill(scores < kth_best, self.filter_value)


class TopPLogitsWarper(LogitsProcessor):
    """Nucleus sampling (Holtzman et al. 2020): keep the smallest set of most likely tokens
    whose probabilities add up to at least ``top_p``; at least ``min_tokens_to_keep`` stay."""

    def __init__(self, top_p: float, filter_value: float = -float("inf"), min_tokens_to_keep: int = 1):
        top_p = float(top_p)
        if not 0.0 <= top_p <= 1.0:
            raise ValueError(f"top_p must be a float in [0, 1] (1.0 = off), got {top_p!r}")
        if not isinstance(min_tokens_to_keep, int) or min_tokens_to_keep < 1:
            raise ValueError(f"min_tokens_to_keep must be a positive integer, got {min_tokens_to_keep!r}")
        self.top_p = top_p
        self.filter_value = filter_value
        self.min_tokens_to_keep = min_tokens_to_keep

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        # Ascending sort: the tokens whose cumulative mass stays <= 1 - top_p are the unlikely tail.
        sorted_logits, sorted_indices = torch.sort(scores, descending=False)
        cumulative_probs = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        sorted_to_remove = cumulative_probs <= (1 - self.top_p)
        sorted_to_remove[..., -self.min_tokens_to_keep :] = False  # the most likely always stay
        to_remove = sorted_to_remove.scatter(1, sorted_indices, sorted_to_remove)
        return scores.masked_fill(to_remove, self.filter_value)


def build_logits_processors(
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = 50,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    min_new_tokens: int = 0,
    prompt_length: int = 0,
    eos_token_id: list[int] | None = None,
) -> LogitsProcessorList:
    """The processors ``generate`` applies, in transformers' order: the penalties first
    (repetition, then min-new-tokens), then, only when sampling, the warpers temperature,
    top-k, top-p. A setting at its neutral value adds nothing."""
    processors = LogitsProcessorList()
    if repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(repetition_penalty))
    if min_new_tokens and eos_token_id:
        processors.append(MinNewTokensLengthLogitsProcessor(prompt_length, min_new_tokens, eos_token_id))
    if do_sample:
        if temperature != 1.0:
            processors.append(TemperatureLogitsWarper(float(temperature)))
        if top_k:
            processors.append(TopKLogitsWarper(int(top_k)))
        if top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p))
    return processors


def next_tokens(scores: torch.Tensor, do_sample: bool, generator: torch.Generator | None = None) -> torch.LongTensor:
    """Pick one token per row from processed scores (batch, vocab): the argmax (greedy), or a
    draw from softmax(scores) with ``generator`` (sampling)."""
    if do_sample:
        return torch.multinomial(F.softmax(scores, dim=-1), num_samples=1, generator=generator).squeeze(1)
    return torch.argmax(scores, dim=-1)
