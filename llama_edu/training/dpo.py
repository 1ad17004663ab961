"""Direct Preference Optimization (DPO, Rafailov et al. 2023, "Direct Preference Optimization:
Your Language Model is Secretly a Reward Model").

Given a prompt x, a preferred answer y_w ("chosen") and a dispreferred one y_l ("rejected"),
DPO trains the policy π_θ directly, with no reward model and no sampling, against a frozen
reference π_ref (usually the SFT model it starts from). Paper, eq. 7:

    L_DPO = -E[ log σ( β log π_θ(y_w|x)/π_ref(y_w|x)  -  β log π_θ(y_l|x)/π_ref(y_l|x) ) ]

Each term ``β log π_θ(y|x)/π_ref(y|x)`` is the *implicit reward* of an answer (section 5): how
much more likely the policy makes it than the reference did, in units of 1/β. The loss pushes
the chosen answer's reward above the rejected one's; β sets how far the policy may drift from
the reference (small β: a weak leash, large β: a strong one).

log π(y|x) is a *sequence* log-probability: the sum of the log-probabilities of the answer's
tokens, given the prompt and the answer's earlier tokens. The answer's tokens are found the way
SFT finds them (:func:`llama_edu.sft.tokenize_chat`), so the template's ``</s>`` counts too.

The reference can be a frozen copy of the model, or, when the policy trains LoRA adapters, the
same model with its adapters switched off (:func:`llama_edu.lora.set_lora_enabled`): no second
copy of the weights. Either way its log-probabilities never change, so they are computed once.

Data format (JSON Lines)::

    {"prompt": [{"role": "user", "content": "..."}], "chosen": "...", "rejected": "...", "split": "train"}
"""

from __future__ import annotations

import random
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..io.files import PROJECT_DATA_DIR
from .lora import lora_layers, set_lora_enabled
from .sft import IGNORE_INDEX, collate, pad_id, tokenize_chat
from .train import lr_at

DPO_DATA = PROJECT_DATA_DIR / "dpo_preferences.jsonl"


# -- the loss ----------------------------------------------------------------------------------


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """The DPO loss (eq. 7), averaged over the batch: mean of
    ``-log σ(β((π_c - ref_c) - (π_r - ref_r)))``. All inputs (batch,) sequence log-probs -> scalar.

    ``-log σ(z)`` is ``softplus(-z)``, computed that way for stability at large |z|.
    """
    logits = (policy_chosen_logps - reference_chosen_logps) - (policy_rejected_logps - reference_rejected_logps)
    return F.softplus(-beta * logits).mean()


def implicit_reward(policy_logps: torch.Tensor, reference_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """The reward DPO's policy implies for an answer (section 5): β (log π_θ(y|x) - log π_ref(y|x))."""
    return beta * (policy_logps - reference_logps)


def sequence_logps(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of log π(token | everything before it) over the answer tokens (labels != -100).

    batch: ``input_ids``, ``attention_mask``, ``labels`` (batch, seq) as :func:`llama_edu.sft.collate`
    makes them -> (batch,) float32. Position t's logits predict token t + 1, hence the shift.
    """
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]  # (b, s-1, V)
    labels = batch["labels"][:, 1:]  # (b, s-1)
    keep = labels != IGNORE_INDEX
    token_logps = torch.gather(logits.float().log_softmax(-1), 2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (token_logps * keep).sum(-1)


# -- data --------------------------------------------------------------------------------------


def tokenize_pair(tokenizer: Any, row: dict[str, Any], max_length: int | None = None) -> tuple[dict, dict]:
    """The chosen and the rejected conversation of a preference row, each as
    :func:`llama_edu.sft.tokenize_chat` returns it (labels on the answer only)."""
    for key in ("prompt", "chosen", "rejected"):
        if key not in row:
            raise ValueError(f"a preference row needs 'prompt', 'chosen' and 'rejected'; this one lacks {key!r}: {row!r}"[:300])
    prompt = row["prompt"]
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if not isinstance(row["chosen"], str) or not isinstance(row["rejected"], str):
        raise ValueError("'chosen' and 'rejected' must be the assistant's answers as strings")
    chosen = tokenize_chat(tokenizer, list(prompt) + [{"role": "assistant", "content": row["chosen"]}], max_length)
    rejected = tokenize_chat(tokenizer, list(prompt) + [{"role": "assistant", "content": row["rejected"]}], max_length)
    return chosen, rejected


@contextmanager
def _reference_mode(policy: nn.Module, reference: nn.Module | None) -> Iterator[nn.Module]:
    """The model to score the reference with: ``reference``, or the policy with adapters off."""
    if reference is not None:
        yield reference
        return
    if not lora_layers(policy):
        raise ValueError("no reference model: pass reference=..., or give the policy LoRA adapters (their base is the reference)")
    set_lora_enabled(policy, False)
    try:
        yield policy
    finally:
        set_lora_enabled(policy, True)


@torch.no_grad()
def _logps(model: nn.Module, examples: Sequence[dict], pad: int, batch_size: int = 64) -> torch.Tensor:
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[start : start + batch_size], pad).items()}
        out.append(sequence_logps(model, batch).cpu())
    return torch.cat(out)


def preference_logps(
    policy: nn.Module, tokenizer: Any, rows: Sequence[dict[str, Any]], reference: nn.Module | None = None
) -> dict[str, torch.Tensor]:
    """Sequence log-probs of every row's chosen and rejected answer under the policy and the
    reference: ``{"policy_chosen", "policy_rejected", "reference_chosen", "reference_rejected"}``, each (rows,)."""
    pairs = [tokenize_pair(tokenizer, r) for r in rows]
    chosen, rejected = [c for c, _ in pairs], [r for _, r in pairs]
    pad, was_training = pad_id(tokenizer), policy.training
    policy.eval()
    out = {"policy_chosen": _logps(policy, chosen, pad), "policy_rejected": _logps(policy, rejected, pad)}
    with _reference_mode(policy, reference) as ref:
        out["reference_chosen"], out["reference_rejected"] = _logps(ref, chosen, pad), _logps(ref, rejected, pad)
    policy.train(was_training)
    return out


def evaluate_preferences(
    policy: nn.Module, tokenizer: Any, rows: Sequence[dict[str, Any]], reference: nn.Module | None = None, beta: float = 0.1
) -> dict[str, float]:
    """On held-out preference ``rows``: ``reward_accuracy`` (fraction whose chosen answer gets the
    higher implicit reward), ``logp_accuracy`` (fraction where the policy gives the chosen answer
    the higher log-probability), the mean ``margin`` (chosen minus rejected reward), the mean
    ``chosen_logp``/``rejected_logp`` and the ``loss``."""
    lp = preference_logps(policy, tokenizer, rows, reference)
    rc = implicit_reward(lp["policy_chosen"], lp["reference_chosen"], beta)
    rr = implicit_reward(lp["policy_rejected"], lp["reference_rejected"], beta)
    return {
        "reward_accuracy": (rc > rr).float().mean().item(),
        "logp_accuracy": (lp["policy_chosen"] > lp["policy_rejected"]).float().mean().item(),
        "margin": (rc - rr).mean().item(),
        "chosen_logp": lp["policy_chosen"].mean().item(),
        "rejected_logp": lp["policy_rejected"].mean().item(),
        "loss": dpo_loss(lp["policy_chosen"], lp["policy_rejected"], lp["reference_chosen"], lp["reference_rejected"], beta).item(),
    }


# -- training ----------------------------------------------------------------------------------


def train_dpo(
    policy: nn.Module,
    tokenizer: Any,
    rows: Sequence[dict[str, Any]],
    reference: nn.Module | None = None,
    beta: float = 0.1,
    sft_weight: float = 0.0,
    steps: int = 50,
    batch_size: int = 16,
    lr: float = 1e-3,
    warmup_steps: int = 5,
    seed: int = 0,
    log_every: int = 10,
    log: Callable[[str], None] | None = print,
) -> dict[str, list[float]]:
    """Train ``policy``'s trainable parameters with the DPO loss on preference ``rows``.

    ``reference``: a frozen model to compare with; ``None`` uses the policy with its LoRA
    adapters switched off. ``sft_weight`` > 0 adds that times the chosen answers' mean
    token NLL to the loss (Pang et al. 2024, "RPO"): plain DPO can lower the chosen answers'
    likelihood too, as long as the rejected ones fall faster; the extra term keeps the chosen
    ones likely. 0 is the paper's DPO. Returns per-step histories: ``loss``, ``margin`` (mean chosen minus
    rejected implicit reward), ``chosen_reward``, ``rejected_reward``, ``chosen_logp``,
    ``rejected_logp``, ``accuracy`` (fraction of the batch with chosen reward > rejected).
    """
    if beta <= 0:
        raise ValueError(f"beta must be positive (0.1 is usual), got {beta}")
    if steps <= 0 or batch_size <= 0:
        raise ValueError(f"steps and batch_size must be positive, got {steps} and {batch_size}")
    params = [p for p in policy.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the policy has no trainable parameters")
    if reference is not None:
        if reference is policy:
            raise ValueError("the reference must be a separate frozen model (copy.deepcopy(policy) before training), not the policy itself")
        reference.eval().requires_grad_(False)
    pairs = [tokenize_pair(tokenizer, r) for r in rows]
    pad, device = pad_id(tokenizer), next(policy.parameters()).device
    # The reference is frozen: score every pair once, before the policy moves.
    with _reference_mode(policy, reference) as ref:
        was_training = ref.training
        ref.eval()
        ref_chosen = _logps(ref, [c for c, _ in pairs], pad)
        ref_rejected = _logps(ref, [r for _, r in pairs], pad)
        ref.train(was_training)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    history: dict[str, list[float]] = {k: [] for k in ("loss", "margin", "chosen_reward", "rejected_reward", "chosen_logp", "rejected_logp", "accuracy")}
    rng, order = random.Random(seed), []
    policy.train()
    for step in range(steps):
        if len(order) < batch_size:
            fresh = list(range(len(pairs)))
            rng.shuffle(fresh)
            order += fresh
        picked, order = order[:batch_size], order[batch_size:]
        # One forward for chosen and rejected together: rows [0, n) chosen, [n, 2n) rejected.
        batch = collate([pairs[i][0] for i in picked] + [pairs[i][1] for i in picked], pad)
        logps = sequence_logps(policy, {k: v.to(device) for k, v in batch.items()})
        n = len(picked)
        pc, pr = logps[:n], logps[n:]
        rc_ref, rr_ref = ref_chosen[picked].to(device), ref_rejected[picked].to(device)
        loss = dpo_loss(pc, pr, rc_ref, rr_ref, beta)
        if sft_weight:  # RPO: keep the chosen answers likely (mean NLL per chosen token)
            n_tokens = (batch["labels"][:n, 1:] != IGNORE_INDEX).sum().to(device)
            loss = loss + sft_weight * (-pc.sum() / n_tokens)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, lr, warmup_steps, steps, lr / 10)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        with torch.no_grad():
            rc, rr = implicit_reward(pc, rc_ref, beta), implicit_reward(pr, rr_ref, beta)
            for key, value in (("loss", loss), ("margin", (rc - rr).mean()), ("chosen_reward", rc.mean()),
                               ("rejected_reward", rr.mean()), ("chosen_logp", pc.mean()), ("rejected_logp", pr.mean()),
                               ("accuracy", (rc > rr).float().mean())):  # fmt: skip
                history[key].append(value.item())
        if log and (step % log_every == 0 or step == steps - 1):
            log(f"step {step:4d}  loss {loss.item():.4f}  margin {history['margin'][-1]:+.3f}  "
                f"logp chosen {history['chosen_logp'][-1]:.2f} rejected {history['rejected_logp'][-1]:.2f}")  # fmt: skip
    policy.eval()
    return history


# -- the command line --------------------------------------------------------------------------
