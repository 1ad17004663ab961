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

import math
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..io.files import PROJECT_DATA_DIR
from .lora import lora_layers, set_lora_enabled
from .sft import IGNORE_INDEX, ChatDataTask, _epochs, _rows_fingerprint, collate, pad_id, step_logger, tokenize_chat
from .loop import LoopConfig, check_trainable, fit

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


class DPOTask(ChatDataTask):
    """DPO for :func:`llama_edu.training.loop.fit`: the loss of eq. 7 (plus ``sft_weight`` x the
    chosen answers' NLL) on batches of preference pairs, each chosen and rejected answer scored
    in one forward; the reference's log-probabilities are computed once, here, before the
    policy moves. Each step also logs the margin, the rewards, the log-probs and the accuracy."""

    resume_keys = ("command", "model", "data", "batch_size", "lr", "grad_clip", "seed",
                   "lora_r", "lora_alpha", "lora_targets", "beta", "sft_weight")

    def __init__(self, policy: nn.Module, tokenizer: Any, rows: Sequence[dict[str, Any]], reference: nn.Module | None = None,
                 beta: float = 0.1, sft_weight: float = 0.0, batch_size: int = 16, record: dict[str, Any] | None = None,
                 inputs: Sequence[Any] = ()):
        if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
            raise ValueError(f"beta must be positive and finite (0.1 is usual; --beta), got {beta}")
        if not (isinstance(sft_weight, (int, float)) and math.isfinite(sft_weight) and sft_weight >= 0):
            raise ValueError(f"sft_weight must be a finite number >= 0 (0 is the paper's DPO), got {sft_weight}")
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"--batch-size must be a whole number >= 1, got {batch_size!r}")
        check_trainable(policy)
        if reference is not None:
            if reference is policy:
                raise ValueError("the reference must be a separate frozen model (copy.deepcopy(policy) before training), not the policy itself")
            reference.eval().requires_grad_(False)
        self.model, self.beta, self.sft_weight, self.batch_size = policy, beta, sft_weight, batch_size
        self.pairs = [tokenize_pair(tokenizer, r) for r in rows]
        if not self.pairs:
            raise ValueError("there are no preference pairs to train on")
        self.pad = pad_id(tokenizer)
        # The reference is frozen: score every pair once, before the policy moves.
        with _reference_mode(policy, reference) as ref:
            was_training = ref.training
            ref.eval()
            self.ref_chosen = _logps(ref, [c for c, _ in self.pairs], self.pad)
            self.ref_rejected = _logps(ref, [r for _, r in self.pairs], self.pad)
            ref.train(was_training)
        self._record, self.inputs = dict(record or {}), tuple(inputs)
        self._fingerprint = _rows_fingerprint([dict(r) for r in rows])

    def batches(self, generator: torch.Generator) -> Iterator[dict[str, torch.Tensor]]:
        device = next(self.model.parameters()).device
        for picked in _epochs(len(self.pairs), self.batch_size, generator.initial_seed()):
            # One forward for chosen and rejected together: rows [0, n) chosen, [n, 2n) rejected.
            batch = collate([self.pairs[i][0] for i in picked] + [self.pairs[i][1] for i in picked], self.pad)
            batch.update(ref_chosen=self.ref_chosen[picked], ref_rejected=self.ref_rejected[picked])
            yield {k: v.to(device) for k, v in batch.items()}

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logps = sequence_logps(model, batch)
        n = len(batch["ref_chosen"])
        pc, pr = logps[:n], logps[n:]
        rc_ref, rr_ref = batch["ref_chosen"], batch["ref_rejected"]
        loss = dpo_loss(pc, pr, rc_ref, rr_ref, self.beta)
        if self.sft_weight:  # RPO: keep the chosen answers likely (mean NLL per chosen token)
            n_tokens = (batch["labels"][:n, 1:] != IGNORE_INDEX).sum()
            loss = loss + self.sft_weight * (-pc.sum() / n_tokens)
        with torch.no_grad():
            rc, rr = implicit_reward(pc, rc_ref, self.beta), implicit_reward(pr, rr_ref, self.beta)
            metrics = {"margin": (rc - rr).mean(), "chosen_reward": rc.mean(), "rejected_reward": rr.mean(),
                       "chosen_logp": pc.mean(), "rejected_logp": pr.mean(), "accuracy": (rc > rr).float().mean()}
        return loss, metrics



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
    *,
    grad_clip: float = 1.0,
    precision: str = "auto",
) -> dict[str, list[float]]:
    """Train ``policy``'s trainable parameters with the DPO loss on preference ``rows``.

    :class:`DPOTask` run by the one training loop (AdamW without weight decay, warm-up + cosine
    LR to lr/10, gradient norm clipped at ``grad_clip``).

    ``reference``: a frozen model to compare with; ``None`` uses the policy with its LoRA
    adapters switched off. ``sft_weight`` > 0 adds that times the chosen answers' mean
    token NLL to the loss (Pang et al. 2024, "RPO"): plain DPO can lower the chosen answers'
    likelihood too, as long as the rejected ones fall faster; the extra term keeps the chosen
    ones likely. 0 is the paper's DPO. Returns per-step histories: ``loss``, ``margin`` (mean chosen minus
    rejected implicit reward), ``chosen_reward``, ``rejected_reward``, ``chosen_logp``,
    ``rejected_logp``, ``accuracy`` (fraction of the batch with chosen reward > rejected).
    A non-finite loss or non-finite weights stop with :class:`llama_edu.training.loop.NonFiniteLossError`.
    """
    if not (isinstance(beta, (int, float)) and beta > 0):
        raise ValueError(f"beta must be positive (0.1 is usual), got {beta}")
    if not isinstance(steps, int) or steps <= 0 or batch_size <= 0:
        raise ValueError(f"steps and batch_size must be positive, got {steps} and {batch_size}")
    task = DPOTask(policy, tokenizer, rows, reference, beta, sft_weight, batch_size)
    config = LoopConfig(steps=steps, lr=lr, warmup_steps=warmup_steps, grad_clip=grad_clip, precision=precision, seed=seed,
                        log_interval=steps, progress=False)

    def line(s: int, h: dict[str, Any]) -> str:
        m = h["metrics"]
        return (f"step {s:4d}  loss {h['train'][-1][1]:.4f}  margin {m['margin'][-1]:+.3f}  "
                f"logp chosen {m['chosen_logp'][-1]:.2f} rejected {m['rejected_logp'][-1]:.2f}")

    history = fit(task, config, log=None, on_step=step_logger(log, log_every, steps, line))
    return {"loss": [loss for _, loss in history["train"]], **history["metrics"]}


# -- the command line --------------------------------------------------------------------------
