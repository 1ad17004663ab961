"""Exercises of notebook 08_generation."""

from __future__ import annotations

import functools
import torch
from ...config import LlamaConfig
from ...generation.decode import generate
from ...modeling import LlamaForCausalLM
from ...generation.sampling import RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from .checking import Cases, register, _gen, _clone


@functools.lru_cache(maxsize=1)
def _decode_model() -> LlamaForCausalLM:
    """A small random model with decisive logits (large init) and no end-of-sequence token, so
    greedy decoding always runs max_new_tokens steps."""
    torch.manual_seed(0)
    config = LlamaConfig.from_preset("tiny", eos_token_id=None, initializer_range=0.3)
    return LlamaForCausalLM(config).eval()


def _greedy_reference(model, input_ids, max_new_tokens):
    return generate(model, input_ids, max_new_tokens=max_new_tokens, do_sample=False)


def _greedy_cases() -> Cases:
    m = _decode_model()
    g = _gen(10)
    return [("a prompt of 5 tokens, 6 new", (m, torch.randint(0, 128, (1, 5), generator=g), 6)),
            ("batch of 2 prompts, 4 new", (m, torch.randint(0, 128, (2, 3), generator=g), 4)),
            ("one new token", (m, torch.randint(0, 128, (1, 7), generator=g), 1))]


def _greedy_no_cache(model, ids, n):
    for _ in range(n):
        ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], -1)
    return ids


def _greedy_variant(model, ids, n, argmax_dim=-1, cat_dim=-1, position=-1):
    for _ in range(n):
        logits = model(ids).logits[:, position if ids.shape[1] > 1 else -1]
        nxt = logits.argmax(argmax_dim, keepdim=True)
        nxt = nxt.T if argmax_dim == 0 else nxt
        ids = torch.cat([ids, nxt if cat_dim == -1 else nxt.T], cat_dim)
    return ids


def _greedy_flat_argmax(model, ids, n):
    for _ in range(n):
        nxt = model(ids).logits[:, -1].argmax()
        ids = torch.cat([ids, nxt.view(1, 1).expand(ids.shape[0], 1)], -1)
    return ids


def _greedy_first_position(model, ids, n):
    for _ in range(n):
        ids = torch.cat([ids, model(ids).logits[:, 0].argmax(-1, keepdim=True)], -1)
    return ids


def _tokens_through(model, fn, args) -> int:
    """How many token positions went through the model while ``fn(*args)`` ran."""
    seen = []
    hook = model.get_input_embeddings().register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape[-1]))
    try:
        fn(*_clone(args))
    finally:
        hook.remove()
    return sum(seen)


def _greedy_uses_cache(fn) -> str | None:
    model, ids, n = _greedy_cases()[0][1]
    got = _tokens_through(model, fn, (model, ids, n))
    needed = ids.shape[1] + n - 1
    if got > needed:
        return (f"the model read {got} token positions where {needed} are enough: each step recomputes the whole sequence. "
                "Keep out.past_key_values from the previous call and feed only the new token: "
                "model(next_token, past_key_values=past, use_cache=True)")
    return None


register(
    "greedy_decode", "08_generation", "(model, input_ids, max_new_tokens)",
    "prompt + max_new_tokens greedy tokens, using the KV cache, equal to generate(do_sample=False)",
    reference=_greedy_reference,
    cases=_greedy_cases,
    also=_greedy_uses_cache,
    mistakes=[
        (lambda m, ids, n: _greedy_no_cache(m, ids, n)[:, ids.shape[1]:],
         "only the new tokens are returned; generate returns the prompt followed by them", "torch.cat([input_ids, new_tokens], dim=-1)"),
        (lambda m, ids, n: _greedy_no_cache(m, ids, n - 1) if n > 1 else ids,
         "one token short", "the loop must produce max_new_tokens tokens: the prefill's logits already give the first one"),
        (lambda m, ids, n: _greedy_no_cache(m, ids, n + 1), "one token too many", "stop after max_new_tokens tokens"),
        (_greedy_first_position, "the next token is read from the logits of the first position",
         "the prediction for the next token is at the last position: logits[:, -1]"),
        (lambda m, ids, n: _greedy_variant(m, ids, n, position=-2),
         "the next token is read from the second-to-last position (off by one)", "the prediction for the next token is at the last position: logits[:, -1]"),
        (lambda m, ids, n: _greedy_variant(m, ids, n, argmax_dim=0),
         "argmax runs over the wrong dimension (the batch); the next token is the argmax over the vocabulary, the last dimension",
         "logits[:, -1].argmax(dim=-1, keepdim=True)"),
        (_greedy_flat_argmax, "argmax without dim= takes the argmax of the flattened (batch, vocab) logits",
         "logits[:, -1].argmax(dim=-1, keepdim=True): one token per row"),
        (lambda m, ids, n: _greedy_variant(m, ids, n, cat_dim=0),
         "the new token is concatenated along dim 0 (a new row) instead of the sequence dimension", "torch.cat([ids, next_token], dim=-1)"),
    ],
)


def _top_p_reference(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    return TopPLogitsWarper(top_p)(None, logits.clone())


def _top_p_cases() -> Cases:
    g = _gen(11)
    exact = torch.tensor([[0.5, 0.3, 0.2]]).log()
    return [("random, top_p 0.9", (torch.randn(3, 40, generator=g), 0.9)),
            ("peaked, top_p 0.5", (torch.randn(3, 40, generator=g) * 4, 0.5)),
            ("probabilities 0.5, 0.3, 0.2, top_p 0.75", (exact, 0.75)),
            ("probabilities 0.5, 0.3, 0.2 shuffled, top_p 0.6", (exact[:, [2, 0, 1]], 0.6)),
            ("top_p 0 (keep one token)", (torch.randn(2, 10, generator=g), 0.0)),
            ("top_p 1 (keep everything)", (torch.randn(2, 10, generator=g), 1.0))]


def _top_p_drop_crossing(logits, top_p):
    probs, order = logits.softmax(-1).sort(-1, descending=True)
    remove = probs.cumsum(-1) > top_p  # drops the token whose probability crosses top_p
    return logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))


def _top_p_no_minimum(logits, top_p):
    sorted_logits, order = logits.sort(-1)
    remove = sorted_logits.softmax(-1).cumsum(-1) <= 1 - top_p
    return logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))


def _top_p_on_logits(logits, top_p):
    sorted_logits, order = logits.sort(-1, descending=True)
    drop = sorted_logits.cumsum(-1) - sorted_logits >= top_p
    drop[..., 0] = False
    return logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


def _top_p_sorted_mask(logits, top_p):
    probs, _ = logits.softmax(-1).sort(-1, descending=True)
    drop = probs.cumsum(-1) - probs >= top_p
    drop[..., 0] = False
    return logits.masked_fill(drop, float("-inf"))


def _top_p_ascending(logits, top_p):
    probs, order = logits.softmax(-1).sort(-1)
    drop = probs.cumsum(-1) - probs >= top_p
    drop[..., 0] = False
    return logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


def _top_p_zero_fill(logits, top_p):
    out = _top_p_reference(logits, top_p)
    return out.masked_fill(out == float("-inf"), 0.0)


register(
    "top_p_filter", "08_generation", "(logits, top_p)",
    "set logits outside the nucleus to -inf: keep the smallest set of most likely tokens whose probability reaches top_p (at least one)",
    reference=_top_p_reference,
    cases=_top_p_cases,
    mistakes=[
        (_top_p_drop_crossing,
         "the token whose probability crosses top_p is dropped: with 0.5, 0.3, 0.2 and top_p 0.75, the nucleus is {0.5, 0.3} (0.5 alone does not reach 0.75)",
         "keep a token when the probability of the tokens before it is still below top_p (cumsum - p < top_p), or sort ascending and remove where cumsum <= 1 - top_p"),
        (_top_p_no_minimum, "with a tiny top_p every token is removed", "always keep the most likely token"),
        (_top_p_zero_fill, "removed tokens are set to 0; a logit of 0 is still a likely token", "use float('-inf')"),
        (_top_p_on_logits, "the cumulative sum runs over sorted logits, not over probabilities: logits do not add up to 1",
         "take softmax(logits) first, then sort and accumulate the probabilities"),
        (_top_p_sorted_mask, "the mask is computed in sorted order but applied to the unsorted logits",
         "scatter the mask back to the vocabulary order: remove.scatter(-1, sorted_indices, remove)"),
        (lambda x, top_p: x.masked_fill(x.softmax(-1) < top_p, float("-inf")) if top_p > 0 else x.masked_fill(x < x.max(-1, keepdim=True).values, float("-inf")),
         "each token's own probability is compared with top_p; top_p bounds the cumulative sum of the sorted probabilities",
         "sort the probabilities, accumulate them with cumsum, and keep the tokens whose preceding mass is below top_p"),
        (lambda x, top_p: _top_p_reference(x.T, top_p).T if x.shape[0] > 1 else _top_p_reference(x, top_p),
         "the softmax and the sort run over dim 0 (the batch); they run over the vocabulary, the last dimension", "softmax(logits, dim=-1), sort(dim=-1)"),
        (_top_p_ascending, "the probabilities are sorted ascending, so the 'nucleus' collects the least likely tokens",
         "sort(descending=True) and keep tokens while the mass before them is below top_p"),
        (lambda x, top_p: _top_p_reference(x, top_p).softmax(-1), "returns probabilities; the filter returns the logits with -inf outside the nucleus",
         "masked_fill the removed logits with float('-inf') and return the logits"),
    ],
)


def _top_k_reference(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    return TopKLogitsWarper(top_k)(None, logits.clone())


def _top_k_exactly_k(logits, k):
    k = min(k, logits.shape[-1])
    keep = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, logits.topk(k).indices, True)
    return logits.masked_fill(~keep, float("-inf"))


register(
    "top_k_filter", "08_generation", "(logits, top_k)",
    "set every logit below the k-th largest (of its row) to -inf; ties with the k-th stay",
    reference=_top_k_reference,
    cases=lambda: [("random, k 5", (torch.randn(3, 20, generator=_gen(12)), 5)),
                   ("ties at the k-th value", (torch.tensor([[3.0, 1.0, 2.0, 2.0, 0.0]]), 2)),
                   ("k larger than the vocabulary", (torch.randn(2, 4, generator=_gen(13)), 10)),
                   ("k 1", (torch.randn(2, 6, generator=_gen(14)), 1))],
    mistakes=[
        (_top_k_exactly_k, "ties with the k-th logit are removed (topk picks one of them arbitrarily)",
         "compare values: remove logits < the k-th largest value"),
        (lambda x, k: x.masked_fill(x <= x.topk(min(k, x.shape[-1])).values[..., -1:], float("-inf")),
         "the k-th token itself is removed (<= instead of <)", "keep logits >= the k-th largest"),
        (lambda x, k: x.masked_fill(x < x.topk(k).values[..., -1:], float("-inf")),
         "topk fails when k is larger than the vocabulary", "use min(top_k, logits.shape[-1])"),
        (lambda x, k: x.masked_fill(x < x.sort(-1).values[..., min(k, x.shape[-1]) - 1:min(k, x.shape[-1])], float("-inf")),
         "the sort is ascending, so the k-th value is the k-th smallest", "sort(descending=True), or topk, which returns the largest"),
        (lambda x, k: x.masked_fill(x < x.topk(min(k, x.shape[0]), dim=0).values[-1:], float("-inf")),
         "topk runs along dim 0 (the batch); the k largest are taken in each row, along the vocabulary (the last dimension)",
         "x.topk(k, dim=-1).values[..., -1:]"),
        (lambda x, k: x.masked_fill(x > x.topk(min(k, x.shape[-1]), largest=False).values[..., -1:], float("-inf")),
         "the k smallest logits are kept (largest=False); top-k keeps the k largest", "x.topk(k).values[..., -1:] is the k-th largest"),
        (lambda x, k: x.masked_fill(x < x.topk(min(k, x.shape[-1])).values[..., -1:], 0.0),
         "removed tokens are set to 0; a logit of 0 is still a likely token", "use float('-inf')"),
        (lambda x, k: x.masked_fill(x < x.topk(min(k + 1, x.shape[-1])).values[..., -1:], float("-inf")),
         "off by one: k + 1 tokens are kept", "the threshold is the k-th largest value: topk(k).values[..., -1:]"),
        (lambda x, k: x.masked_fill(x < x.topk(max(1, min(k - 1, x.shape[-1]))).values[..., -1:], float("-inf")),
         "off by one: k - 1 tokens are kept", "the threshold is the k-th largest value: topk(k).values[..., -1:]"),
        (lambda x, k: x.masked_fill(x < x.topk(min(k, x.shape[-1])).values[..., -1:], -1e9),
         "removed tokens get a large negative number; use float('-inf'), which softmax turns into exactly 0", "masked_fill(..., float('-inf'))"),
    ],
)


register(
    "repetition_penalty", "08_generation", "(input_ids, logits, penalty)",
    "for tokens already in input_ids, divide positive logits by penalty and multiply negative ones (once per token)",
    reference=lambda ids, logits, p: RepetitionPenaltyLogitsProcessor(p)(ids, logits.clone()),
    cases=lambda: [("random, penalty 1.3", (torch.tensor([[1, 4, 7]]), torch.randn(1, 10, generator=_gen(15)), 1.3)),
                   ("negative logits", (torch.tensor([[0, 2]]), torch.tensor([[-2.0, 1.0, -1.0, 0.5]]), 2.0)),
                   ("a token repeated 3 times", (torch.tensor([[3, 3, 3, 1]]), torch.tensor([[0.5, 2.0, -1.0, 4.0, -3.0]]), 2.0)),
                   ("batch of 2", (torch.tensor([[0, 1], [2, 2]]), torch.randn(2, 5, generator=_gen(16)), 1.5))],
    mistakes=[
        (lambda ids, x, p: x.scatter(1, ids, x.gather(1, ids) / p),
         "negative logits are divided too, which makes a seen token with a negative logit MORE likely",
         "torch.where(score < 0, score * penalty, score / penalty)"),
        (lambda ids, x, p: _penalise_each_occurrence(ids, x, p),
         "a token seen 3 times is penalised 3 times; the rule penalises each seen token once", "gather, transform once, scatter back"),
        (lambda ids, x, p: x.scatter(1, ids, torch.where(x.gather(1, ids) > 0, x.gather(1, ids) * p, x.gather(1, ids) / p)),
         "the penalty is inverted: positive logits are multiplied and negative ones divided, which makes seen tokens MORE likely",
         "torch.where(score < 0, score * penalty, score / penalty)"),
        (lambda ids, x, p: x.scatter(1, ids, x.gather(1, ids) * p), "every seen logit is multiplied by the penalty: a positive logit grows, so the token becomes MORE likely",
         "divide positive logits and multiply negative ones: torch.where(score < 0, score * penalty, score / penalty)"),
        (lambda ids, x, p: torch.where(x < 0, x * p, x / p), "every logit is penalised, not only the tokens in input_ids",
         "gather the scores of the seen tokens, change those, scatter them back"),
        (lambda ids, x, p: x.scatter(1, ids, x.gather(1, ids) - p), "the penalty is subtracted; it divides positive logits and multiplies negative ones",
         "torch.where(score < 0, score * penalty, score / penalty)"),
        (lambda ids, x, p: x.scatter(1, ids[:1].expand_as(ids), torch.where(x.gather(1, ids[:1].expand_as(ids)) < 0, x.gather(1, ids[:1].expand_as(ids)) * p, x.gather(1, ids[:1].expand_as(ids)) / p)),
         "the first row's tokens are penalised in every row: each row has its own input_ids", "gather and scatter with the whole input_ids (batch, seq)"),
        (lambda ids, x, p: torch.where(torch.zeros_like(x, dtype=torch.bool).scatter(1, ids, True), x, torch.where(x < 0, x * p, x / p)),
         "the mask is inverted: the tokens NOT in input_ids are penalised", "penalise exactly the tokens that occur in input_ids"),
    ],
)


def _penalise_each_occurrence(ids, x, p):
    x = x.clone()
    for b in range(ids.shape[0]):
        for t in ids[b].tolist():
            x[b, t] = x[b, t] * p if x[b, t] < 0 else x[b, t] / p
    return x


register(
    "temperature", "08_generation", "(logits, temperature)", "logits scaled for sampling at the given temperature",
    reference=lambda logits, t: TemperatureLogitsWarper(float(t))(None, logits.clone()),
    cases=lambda: [("T = 0.5", (torch.randn(2, 8, generator=_gen(17)), 0.5)), ("T = 2", (torch.randn(2, 8, generator=_gen(18)), 2.0))],
    mistakes=[(lambda x, t: x * t, "multiplied by the temperature; a low temperature must sharpen the distribution", "divide: logits / temperature"),
              (lambda x, t: (x.softmax(-1) / t), "returns scaled probabilities, not logits", "divide the logits, before any softmax"),
              (lambda x, t: (x / t).softmax(-1), "returns probabilities (softmax of the scaled logits); the warper returns logits", "return logits / temperature"),
              (lambda x, t: x / int(t), "the temperature is cast to int: int(0.5) = 0, and a division by 0 gives inf", "logits / float(temperature)"),
              (lambda x, t: x // t, "integer (floor) division // rounds the scaled logits down to whole numbers", "true division: logits / temperature"),
              (lambda x, t: x / t ** 2, "the logits are divided by the temperature squared", "logits / temperature"),
              (lambda x, t: x - t, "the temperature is subtracted; it divides the logits", "logits / temperature")],
)
