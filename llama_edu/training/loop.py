"""The one training loop. Pretraining, classification, LoRA, QLoRA, SFT and DPO each hand it a
:class:`Task` (a loss and a batch source, optionally an evaluation and what to save) and it does
the rest, the same way for all of them:

1. set the learning rate (linear warm-up, then a half cosine, or a straight line, to ``min_lr``);
2. draw ``grad_accum`` micro-batches from the task's batch source and, for each, add the
   gradient of its loss divided by ``grad_accum`` (gradient accumulation: the update of one
   batch that many times larger), under bf16/fp16 autocast when asked (fp16 with a
   ``GradScaler``);
3. stop with :class:`NonFiniteLossError` if the loss is not finite; clip the gradient norm
   (``grad_clip <= 0``: no clipping, as transformers' Trainer); step AdamW;
4. every ``eval_interval`` steps evaluate (when the task can), keep the best weights in
   ``OUT/best/`` and everything needed to continue in ``OUT/last/``;
5. Ctrl-C finishes the step, saves ``OUT/last/`` and raises :class:`TrainingInterrupted` (exit
   status 130 on the command line); a second Ctrl-C stops at once.

:func:`train_step` is the one place in the package that runs ``backward()``: the loop calls it,
and a distributed wrapper (DDP, FSDP2, tensor parallel; :mod:`llama_edu.distributed`) only hands
it a wrapped model. Nothing non-finite is ever saved: a checkpoint is written only after its
weights were checked, and a run whose weights became NaN or infinite stops with an error.

``OUT/last/`` holds the task's weights (the Hugging Face layout, or a PEFT-layout LoRA adapter),
``optimizer.pt``, ``rng.pt`` (torch's and Python's random states) and ``train_state.json`` (the
step, the history, the run's settings). ``resume=True`` continues from it: the batch source is
rebuilt from the seed and fast-forwarded past the micro-batches already used, so a resumed run
sees the same data as one never stopped (on a CPU, bit-identical weights). Each checkpoint folder
is written beside its final place and swapped in whole (:mod:`llama_edu.atomic_save`).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn
from tqdm import tqdm

from . import distributed
from ..io.atomic_save import recover_folder, replace_folder_files
from ..io.files import atomic_write_bytes
from .lora import load_lora_adapter, lora_layers, save_lora_adapter

#: What a run writes into OUT (besides a task's own outputs); ``--overwrite`` removes these only.
RUN_OUTPUTS = ("best", "last", "history.json", "train_config.json")

Batch = Any


# ----------------------------------------------------------------------------- faults
class NonFiniteLossError(FloatingPointError):
    """The loss (or the weights) became NaN or infinite: training stopped, and nothing of it was saved."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped training after a whole step; ``checkpoint`` is the resumable OUT/last/
    (None when the run had no output folder) and ``step`` the last finished step."""

    def __init__(self, step: int, checkpoint: Path | None):
        super().__init__(f"interrupted after step {step}")
        self.step, self.checkpoint = step, checkpoint


class _StopOnSigint:
    """While active (in the main thread), the first Ctrl-C only sets ``requested`` so the loop
    can stop after the current step and save; a second Ctrl-C raises KeyboardInterrupt at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> "_StopOnSigint":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


# ----------------------------------------------------------------------------- devices and precision
def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_device(name: str) -> torch.device:
    """The torch.device to train on, or a ValueError saying why ``name`` cannot train."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {name!r} is not a device; use cpu, cuda, cuda:N or mps") from None
    if device.type == "meta":
        raise ValueError("--device meta holds shapes but no numbers, so nothing can train there; use cpu or cuda")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: no CUDA GPU is available here; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s); use cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    elif device.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise ValueError(f"--device {name}: Apple's MPS is not available here; use --device cpu")
    elif device.type != "cpu":
        raise ValueError(f"--device {name!r}: training runs on cpu, cuda or mps, not {device.type}")
    return device


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device`` (None: no autocast).

    ``auto``: bfloat16 on a CUDA GPU that supports it, float16 (with a grad scaler) on an older
    one, none elsewhere. ``bf16`` needs a GPU with bfloat16 or a CPU; ``fp16`` needs CUDA.
    """
    if precision not in ("auto", "fp32", "bf16", "fp16"):
        raise ValueError(f"--precision must be auto, fp32, bf16 or fp16, got {precision!r}")
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if precision == "fp32":
        return None
    if precision == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError("--precision bf16: this GPU has no bfloat16; use --precision fp16 (with its grad scaler) or auto")
        if device.type not in ("cuda", "cpu"):
            raise ValueError(f"--precision bf16 runs on cuda or cpu, not {device.type}; use fp32")
        return torch.bfloat16
    if device.type != "cuda":
        raise ValueError(f"--precision fp16 needs a CUDA GPU (its grad scaler runs there); on {device.type} use fp32 or bf16")
    return torch.float16


def check_trainable(model: nn.Module) -> list[nn.Parameter]:
    """The parameters to train (``requires_grad``, each once), or a ValueError when there are
    none or when they cannot train safely in their dtype.

    float16 *weights* are refused: AdamW's moments and small updates underflow in float16 (a
    step of lr x 1e-4 on a weight of 1 rounds to nothing), and on a CPU the float16 forward
    overflows to inf, so such runs end in NaN. Train float32 (or bfloat16) weights, with
    ``--precision fp16`` on a GPU for float16 speed. A frozen float16 base under float32 LoRA
    adapters is fine on a GPU; on a CPU its float16 matmuls are refused too.
    """
    params = list({id(p): p for p in model.parameters() if p.requires_grad}.values())
    if not params:
        raise ValueError("the model has no trainable parameters (requires_grad is False everywhere; did you freeze everything?)")
    on_cpu = next(model.parameters()).device.type == "cpu"
    if any(p.dtype == torch.float16 for p in (model.parameters() if on_cpu else params)):
        raise ValueError("the model has float16 weights, which do not train: on a CPU float16 overflows to NaN and AdamW's "
                         "updates underflow in float16; load it with --dtype float32 or --dtype bfloat16 "
                         "(on a GPU, float32 weights with --precision fp16 give float16 speed)")
    return params


# ----------------------------------------------------------------------------- optimisation
def lr_at(step: int, max_lr: float, warmup_steps: int, total_steps: int, min_lr: float, shape: str = "cosine") -> float:
    """Linear warm-up from ~0 to ``max_lr`` over ``warmup_steps``, then down to ``min_lr`` at
    ``total_steps`` (and ``min_lr`` after) along a half cosine (``shape="cosine"``) or a
    straight line (``"linear"``). ``step`` counts from 0."""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= total_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)  # 0 -> 1
    if shape == "linear":
        return min_lr + (total_steps - step) / max(1, total_steps - warmup_steps) * (max_lr - min_lr)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.95)) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, with weight decay on the matrices (embeddings,
    projections) only: decaying the RMSNorm gains would pull them towards 0 and shrink every
    activation for no benefit."""
    params = {id(p): p for p in model.parameters() if p.requires_grad}.values()  # a tied head once
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


# ----------------------------------------------------------------------------- one step
def next_token_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Pretraining's loss: ``batch = (x, y)``, (b, block) token ids with ``y`` the next tokens
    -> the mean cross-entropy, computed in float32."""
    x, y = batch
    logits = model(input_ids=x, use_cache=False).logits  # (b, block, vocab)
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))


def _batch_device(batch: Any) -> torch.device:
    if isinstance(batch, torch.Tensor):
        return batch.device
    values = batch.values() if isinstance(batch, dict) else batch
    for v in values:
        if isinstance(v, torch.Tensor):
            return v.device
    return torch.device("cpu")


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: Sequence[Batch],
    *,
    loss_fn: Callable[[nn.Module, Batch], Any] = next_token_loss,
    autocast_dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
    grad_clip: float = 1.0,
    parallel: distributed.Parallel | None = None,
    return_metrics: bool = False,
) -> float | tuple[float, dict[str, float]]:
    """One optimizer step over ``micro_batches``; returns the mean of their losses (and, with
    ``return_metrics``, the mean of the extra numbers ``loss_fn`` reported).

    ``loss_fn(model, batch)`` returns the micro-batch's mean loss, a scalar tensor, or
    ``(loss, {name: scalar tensor})``; the default is pretraining's next-token loss on
    ``(x, y)`` pairs. This is the one place in the package that runs backward and steps, so a
    distributed wrapper only has to hand in a wrapped ``model``: for a DDP model, gradients are
    all-reduced once, after the last micro-batch (``no_sync`` before it). Each micro-batch's
    loss is divided by their number, so the summed gradient is the gradient of the mean loss
    over all of them: the same update as one batch that many times larger. ``grad_clip <= 0``
    means no clipping. With ``parallel`` (each rank holding its rows of the micro-batches) the
    returned loss is the mean over ranks, the loss of the global batch, and the gradient norm is
    taken over the sharded gradients. A non-finite loss raises :class:`NonFiniteLossError`
    before the optimizer moves. The gradients stay on the parameters until the next step.
    """
    n = len(micro_batches)
    device = _batch_device(micro_batches[0])
    total = torch.zeros((), device=device)
    metrics: dict[str, torch.Tensor] = {}
    optimizer.zero_grad(set_to_none=True)
    for i, batch in enumerate(micro_batches):
        with distributed.no_sync(model, sync=i == n - 1):
            with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
                out = loss_fn(model, batch)
            loss, extra = out if isinstance(out, tuple) else (out, {})
            scaled = loss.float() / n
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        total += loss.detach().float()
        for k, v in extra.items():
            metrics[k] = metrics.get(k, 0) + v.detach().float() / n
    mean_loss = distributed.mean_over_ranks(total, parallel) / n  # one host sync a step
    if not math.isfinite(mean_loss):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLossError(f"the training loss is {mean_loss}")
    if grad_clip > 0:
        if scaler is not None:
            scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
        if parallel is None:
            norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip))
        else:
            norm = distributed.clip_grad_norm_(model.parameters(), grad_clip)  # sharded gradients
        # A finite loss can still have NaN gradients (the norm of a zero vector, say); float16's
        # scaler expects overflows and skips those steps itself.
        if scaler is None and not math.isfinite(norm):
            optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(f"the gradient norm is {norm} (the loss was {mean_loss:.4g})")
    if scaler is not None:
        scaler.step(optimizer)  # skips the step when a gradient overflowed in float16
        scaler.update()
    else:
        try:
            optimizer.step()
        except RuntimeError as e:  # an update too large for the parameters' dtype, e.g. --lr 1e300
            if "overflow" not in str(e):
                raise
            raise NonFiniteLossError(f"the optimizer's update overflows {params_dtype(optimizer)} ({e})") from None
    if return_metrics:
        return mean_loss, {k: float(v) for k, v in metrics.items()}
    return mean_loss


def params_dtype(optimizer: torch.optim.Optimizer) -> str:
    dtypes = {p.dtype for group in optimizer.param_groups for p in group["params"]}
    return "/".join(sorted(str(d).replace("torch.", "") for d in dtypes))


def weights_finite(params: Sequence[torch.Tensor], parallel: distributed.Parallel | None = None) -> bool:
    """True when every parameter is finite (on every rank: sharded parameters check their shards)."""
    bad = False
    with torch.no_grad():
        for p in params:
            local = p.to_local() if hasattr(p, "to_local") else p
            if not bool(torch.isfinite(local).all()):
                bad = True
                break
    return not distributed.any_rank(bad, parallel)


# ----------------------------------------------------------------------------- what a task supplies
def save_model(model: nn.Module, folder: Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """A task's weights into ``folder`` (a staging folder): the LoRA adapter alone (PEFT layout)
    when the model has adapters, else the whole model in the Hugging Face layout."""
    if lora_layers(model):
        save_lora_adapter(model, folder)
    else:
        model.save_pretrained(folder, state_dict=state_dict, atomic=False)  # the folder is staged already


def load_model(model: nn.Module, folder: Path) -> None:
    """Put the weights :func:`save_model` wrote in ``folder`` back into ``model`` (resume)."""
    if lora_layers(model):
        load_lora_adapter(model, folder)
    else:
        model.load_state_dict(type(model).from_pretrained(folder).state_dict())


class Task:
    """What one kind of training hands to :func:`fit`.

    Required: ``model`` (the module whose trainable parameters are trained; unwrapped),
    ``loss(model, batch)`` (a scalar tensor, or ``(loss, {name: scalar})`` to log more per step)
    and ``batches(generator)`` (an endless iterator of micro-batches on the model's device,
    drawn with ``generator``, or deterministically from its ``initial_seed()``).
    Optional: ``evaluate(model)`` -> ``{"loss": ..., ...}`` (lower is better: the best weights
    go to ``OUT/best/``), ``save``/``load`` (default: :func:`save_model` / :func:`load_model`),
    ``record()`` (the run's settings, saved as ``train_config.json``), ``resume_keys`` (the
    record's entries a resumed run must share), ``fingerprint()`` (the data, which must not
    change on resume), ``owns(name)`` (the entries of OUT a run writes; ``--overwrite``
    removes these only), ``inputs`` (paths the run reads, which ``--out`` must not be) and
    ``tokens(batch)`` (tokens in a micro-batch, for tokens/s on the progress bar).
    """

    model: nn.Module
    resume_keys: tuple[str, ...] = ()
    inputs: tuple[str | os.PathLike, ...] = ()

    def loss(self, model: nn.Module, batch: Batch) -> Any:
        raise NotImplementedError

    def batches(self, generator: torch.Generator) -> Iterator[Batch]:
        raise NotImplementedError

    evaluate: Callable[[nn.Module], dict[str, float]] | None = None

    def describe(self, result: dict[str, float]) -> str:
        """One evaluation as text for the progress lines."""
        return "val " + " ".join(f"{k} {v:.4f}" for k, v in result.items())

    def save(self, model: nn.Module, folder: Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        save_model(model, folder, state_dict)

    def load(self, model: nn.Module, folder: Path) -> None:
        load_model(model, folder)

    def record(self) -> dict[str, Any]:
        return {}

    def fingerprint(self) -> dict[str, Any] | None:
        return None

    def owns(self, name: str) -> bool:
        return name in RUN_OUTPUTS

    def tokens(self, batch: Batch) -> int:
        return 0

    def extra_history(self, step: int) -> dict[str, Any]:
        """Numbers to keep in the history (and history.json) after ``step`` steps."""
        return {}


# ----------------------------------------------------------------------------- settings
@dataclass
class LoopConfig:
    """How :func:`fit` trains (what the task does not decide)."""

    steps: int
    lr: float
    min_lr: float | None = None  # None: lr / 10
    warmup_steps: int = 0
    schedule: str = "cosine"  # cosine | linear (after the warm-up, down to min_lr)
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0  # <= 0: no clipping
    grad_accum: int = 1
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    compile: bool = False
    seed: int = 0
    eval_interval: int | None = None  # evaluate (and save last/) every this many steps; None: at the end
    log_interval: int = 10
    max_minutes: float | None = None
    progress: bool | None = None  # a tqdm bar; None: only when stderr is a terminal
    out_dir: str | None = None  # None: keep nothing on disk


def check_loop_config(config: LoopConfig) -> None:
    """Refuse settings that cannot train, with a message naming the flag and the fix."""
    for name in ("steps", "grad_accum", "log_interval"):
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{_flag(name)} must be a whole number >= 1, got {value!r}")
    if config.eval_interval is not None and (not isinstance(config.eval_interval, int) or config.eval_interval < 1):
        raise ValueError(f"--eval-interval must be a whole number >= 1, got {config.eval_interval!r}")
    if not isinstance(config.warmup_steps, int) or config.warmup_steps < 0:
        raise ValueError(f"--warmup-steps must be a whole number >= 0, got {config.warmup_steps!r}")
    if not (isinstance(config.lr, (int, float)) and math.isfinite(config.lr) and config.lr > 0):
        raise ValueError(f"--lr must be a finite number > 0 (e.g. 1e-3), got {config.lr}")
    for name in ("min_lr", "weight_decay"):
        value = getattr(config, name)
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{_flag(name)} must be a finite number >= 0, got {value}")
    if not all(0.0 <= b < 1.0 for b in config.betas):
        raise ValueError(f"--beta2 must be in [0, 1), got {config.betas[1]}")
    if math.isnan(config.grad_clip):
        raise ValueError("--grad-clip must be a number (<= 0 turns clipping off), got nan")
    if config.max_minutes is not None and not config.max_minutes > 0:
        raise ValueError(f"--max-minutes must be > 0 (or left out), got {config.max_minutes}")
    if config.schedule not in ("cosine", "linear"):
        raise ValueError(f"schedule must be 'cosine' or 'linear', got {config.schedule!r}")


# ----------------------------------------------------------------------------- the output folder
def prepare_out_dir(out_dir: Path, resume: bool, overwrite: bool, owns: Callable[[str], bool] = lambda n: n in RUN_OUTPUTS,
                    inputs: Sequence[str | os.PathLike] = ()) -> None:
    """Refuse to mix two runs in one folder, or to write into an input: an existing non-empty
    ``out_dir`` needs ``resume`` (continue its last/) or ``overwrite`` (remove what a previous
    run wrote there, the entries ``owns`` names, nothing else); ``out_dir`` may never be one of
    ``inputs`` (compared as files, so another spelling of the same folder is caught). Checks
    that the folder can be written before any training starts."""
    if resume and overwrite:
        raise ValueError("--resume continues the run in --out and --overwrite deletes it; pass only one")
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir} exists and is not a folder; choose another --out")
    for src in inputs:
        if not src or not os.path.exists(src):
            continue
        if out_dir.exists() and os.path.samefile(out_dir, src):
            raise ValueError(f"--out {out_dir} is the input {src}: the run would write over what it reads; choose another --out")
        inside, real_out = Path(src).resolve(), out_dir.resolve()
        if overwrite and real_out in inside.parents and owns(inside.relative_to(real_out).parts[0]):
            raise ValueError(f"--overwrite would remove {src}, an input of this run, from --out {out_dir}; choose another --out")
    recover_folder(out_dir / "last")
    recover_folder(out_dir / "best")
    if resume:
        if not (out_dir / "last" / "train_state.json").is_file():
            raise ValueError(f"--resume: {out_dir} holds no resumable checkpoint (last/train_state.json); "
                             f"drop --resume to start a new run there")
    elif out_dir.is_dir() and any(not e.name.startswith(".") for e in out_dir.iterdir()):
        if not overwrite:
            raise ValueError(f"--out {out_dir} already holds files (a previous run?); pass --resume to continue "
                             f"it, --overwrite to replace it, or choose another --out")
        for path in out_dir.iterdir():
            if owns(path.name):
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write-test.{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"--out {out_dir} cannot be written ({e.strerror or e}); choose a writable folder") from None


def _rng_state() -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),  # dropout, if the model has any
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])


def save_folder(task: Task, model: nn.Module, folder: Path, state: dict[str, Any] | None = None, extra: dict[str, Any] | None = None,
                *, state_dict: dict[str, torch.Tensor] | None = None, folders: dict[str, Path] | None = None) -> Path:
    """Write a checkpoint folder whole or not at all: the task's weights, ``state`` as
    ``train_state.json``, each ``extra`` item with ``torch.save`` (tensors, numbers, lists and
    dicts only, so ``torch.load(weights_only=True)`` reads it), each ``folders`` item moved in."""
    with replace_folder_files(folder, owned=lambda name: True, last=None) as staging:  # the whole folder is the checkpoint
        task.save(model, staging, state_dict)
        if state is not None:
            (staging / "train_state.json").write_text(json.dumps(state, indent=1) + "\n")
        for name, obj in (extra or {}).items():
            torch.save(obj, staging / name)
        for name, src in (folders or {}).items():
            os.replace(src, staging / name)
    return Path(folder)


# ----------------------------------------------------------------------------- the loop
def fit(
    task: Task,
    config: LoopConfig,
    *,
    log: Callable[[str], None] | None = print,
    resume: bool = False,
    overwrite: bool = False,
    on_step: Callable[[int, dict[str, Any], nn.Module], None] | None = None,
    parallel: distributed.Parallel | None = None,
) -> dict[str, Any]:
    """Train ``task.model`` (already on its device) as ``config`` says; return the history:
    ``{"train": [(step, loss), ...], "val": [(step, *evaluation values), ...], "best": {"step",
    "val_<name>": ...} or None, "metrics": {name: [per step]}, "steps", "seconds", "tokens_seen",
    "model"}``. With an evaluation the model ends with its best weights; otherwise its last.

    With ``config.out_dir``: ``OUT/best/`` each time the evaluation improves, a resumable
    ``OUT/last/`` at every ``eval_interval``, at the end and on Ctrl-C (which then raises
    :class:`TrainingInterrupted`), ``history.json`` and ``train_config.json``. An existing
    non-empty OUT needs ``resume`` or ``overwrite``. A non-finite loss or non-finite weights
    raise :class:`NonFiniteLossError` and nothing of them is saved. ``on_step(step, history,
    model)`` runs after every step (and its evaluation). ``parallel``: a joined torchrun group
    (:func:`llama_edu.distributed.init_parallel`); the model is wrapped or sharded here, the
    task's batches hold this rank's rows.
    """
    check_loop_config(config)
    say = log or (lambda line: None)
    par = parallel
    if par is not None and not par.is_main:
        say = lambda line: None  # noqa: E731 - rank 0 alone logs
    model = task.model
    params = check_trainable(model)
    device = params[0].device
    amp_dtype = resolve_precision(config.precision, device)
    out_dir = Path(config.out_dir) if config.out_dir else None
    if out_dir:
        distributed.on_main(lambda: prepare_out_dir(out_dir, resume, overwrite, task.owns, task.inputs), par)
    elif resume:
        raise ValueError("resume=True needs an output folder (--out) holding last/")

    min_lr = config.lr / 10 if config.min_lr is None else config.min_lr
    record, fingerprint = task.record(), task.fingerprint()
    history: dict[str, Any] = {"train": [], "val": [], "best": None, "metrics": {}}
    best_state: dict[str, torch.Tensor] | None = None
    best_on_disk = False  # the best weights are OUT/best/'s (a resumed run), not taken from the model
    start_step, seconds_before = 0, 0.0
    model.train()

    # The weights as the last checkpoint left them, before the model is split up.
    last = out_dir / "last" if out_dir else None
    if resume:
        state = json.loads((last / "train_state.json").read_text())
        saved = state.get("train_config", {})
        problems = [(f"model: {saved.get(k)} in the checkpoint, {record.get(k)} now" if k == "model" else
                     f"{_flag(k)}: {saved.get(k)!r} in the checkpoint, {record.get(k)!r} now") for k in task.resume_keys
                    if saved.get(k) != record.get(k)]
        if state.get("data") != fingerprint:
            problems.append(f"the training data: {state.get('data')} in the checkpoint, {fingerprint} now")
        if problems:
            raise ValueError(f"--resume: {last} is a checkpoint of another configuration; use the settings it was trained "
                             f"with (see {out_dir / 'train_config.json'}) or start a new run. Differences: " + "; ".join(problems))
        task.load(model, last)
    # DDP wraps the model (``wrapped``); FSDP and TP shard it in place: ``model`` is the one to
    # evaluate and save, and its parameters are the ones to optimize.
    wrapped = distributed.parallelize(model, par) if par is not None else model
    optimizer = make_optimizer(model, config.lr, config.weight_decay, tuple(config.betas))
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    gen = torch.Generator().manual_seed(config.seed)
    batches = task.batches(gen)
    if resume:
        if (last / "dcp").is_dir():  # written by a distributed run, on any number of ranks
            distributed.load_sharded(wrapped, optimizer, last / "dcp")
        else:
            saved_opt = torch.load(last / "optimizer.pt", weights_only=True, map_location=device)
            if par is None:
                optimizer.load_state_dict(saved_opt["optimizer"])
                if scaler is not None and saved_opt.get("scaler"):
                    scaler.load_state_dict(saved_opt["scaler"])
            else:
                distributed.load_one_process_optimizer_state(wrapped, optimizer, saved_opt["optimizer"])
        if scaler is not None and (last / "scaler.pt").is_file():
            scaler.load_state_dict(torch.load(last / "scaler.pt", weights_only=True))
        start_step, seconds_before = state["step"], state["seconds"]
        for _ in range(start_step * config.grad_accum):  # the same data as a run never stopped
            next(batches)
        _set_rng_state(torch.load(last / "rng.pt", weights_only=True))
        history.update(state["history"])
        history["train"] = [tuple(t) for t in history["train"]]
        history["val"] = [tuple(v) for v in history["val"]]
        if task.evaluate is not None and (out_dir / "best").is_dir():
            best_on_disk = True
        say(f"resuming {out_dir} at step {start_step} of {config.steps}")
        changed = [f"{k} {record[k]} (was {saved.get(k)})" for k in ("steps", "warmup_steps") if k in record and saved.get(k) != record[k]]
        if changed:
            say("the learning-rate schedule follows the new " + ", ".join(changed))

    step_model: nn.Module = torch.compile(wrapped) if config.compile else wrapped
    show_bar = (sys.stderr.isatty() if config.progress is None else config.progress) and (par is None or par.is_main)
    bar = tqdm(total=config.steps, initial=start_step, disable=not show_bar, unit="step", dynamic_ncols=True)
    if show_bar and log is print:
        say = bar.write
    t0 = time.time() - seconds_before

    def snapshot(step: int) -> dict[str, Any]:
        kept = {k: v for k, v in history.items() if k not in ("model", "seconds", "steps")}
        kept.update(steps=step, seconds=time.time() - t0, **task.extra_history(step))
        return {"step": step, "seconds": time.time() - t0, "history": kept, "train_config": record, "data": fingerprint}

    def kept() -> str:
        held = [f"{name}/" for name in ("best", "last") if out_dir and (out_dir / name).is_dir()]
        return f": {' and '.join(held)} {'hold' if len(held) > 1 else 'holds'} the last good checkpoint" if held else ""

    def check_weights(step: int, what: str) -> None:
        if not weights_finite(params, par):
            raise NonFiniteLossError(f"the weights became NaN or infinite by step {step}; training stopped and {what}. "
                                     f"Lower --lr, or check the data and the settings (--lora-alpha, --beta, --dtype)")

    def write_run_files(hist_bytes: bytes) -> None:
        atomic_write_bytes(out_dir / "history.json", hist_bytes)
        atomic_write_bytes(out_dir / "train_config.json", (json.dumps(record, indent=2) + "\n").encode())

    def save_last(step: int) -> Path | None:
        if not out_dir:
            return None
        check_weights(step, "they were not saved" + kept())
        hist_bytes = (json.dumps(snapshot(step)["history"], indent=1) + "\n").encode()
        if par is None:
            extra = {"optimizer.pt": {"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler else None},
                     "rng.pt": _rng_state()}
            save_folder(task, model, last, snapshot(step), extra)
            write_run_files(hist_bytes)
            return last
        # Distributed: every rank writes its shards of the model and optimizer (DCP) into a
        # folder beside OUT, the weights are gathered to rank 0, and rank 0 swaps in a last/
        # with both: the HF-layout model one process would write, and dcp/ inside it.
        shards = out_dir / f".last-dcp.{distributed.broadcast_object(uuid.uuid4().hex[:8], par)}.tmp"
        distributed.save_sharded(wrapped, optimizer, shards)
        weights = distributed.full_state_dict(model)
        extra = {"rng.pt": _rng_state(), **({"scaler.pt": scaler.state_dict()} if scaler else {})}

        def write() -> None:
            for stale in out_dir.glob(".last-dcp.*.tmp"):  # left by a run that died while saving
                if stale != shards:
                    shutil.rmtree(stale, ignore_errors=True)
            save_folder(task, distributed.hf_shell(model), last, snapshot(step), extra, state_dict=weights, folders={"dcp": shards})
            write_run_files(hist_bytes)

        distributed.on_main(write, par)
        return last

    def save_best(meta: dict[str, Any]) -> None:
        if par is None:
            save_folder(task, model, out_dir / "best", meta)
            return
        weights = distributed.full_state_dict(model)  # collective: every rank takes part
        distributed.on_main(lambda: save_folder(task, distributed.hf_shell(model), out_dir / "best", meta, state_dict=weights), par)

    def run_eval(step: int) -> None:
        nonlocal best_state, best_on_disk

        def measure() -> dict[str, float]:
            with torch.no_grad():
                model.eval()
                try:
                    return dict(task.evaluate(model))
                finally:
                    model.train()

        if par is not None and par.strategy == "ddp":  # every rank holds the whole model: rank 0 evaluates
            res = distributed.broadcast_object(distributed.on_main(measure, par), par)
        else:  # FSDP/TP: the weights are spread over the ranks, so all of them run the forward
            res = measure()
        if not math.isfinite(res["loss"]):
            raise NonFiniteLossError(f"the validation loss is {res['loss']} at step {step}; training stopped and this model was "
                                     f"not saved{kept()}. Lower --lr, or check the data")
        history["val"].append((step, *res.values()))
        improved = history["best"] is None or res["loss"] < history["best"]["val_loss"]
        if improved:
            history["best"] = {"step": step, **{f"val_{k}": v for k, v in res.items()}}
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}  # this rank's shards
            best_on_disk = False
            if out_dir:
                check_weights(step, "they were not saved" + kept())
                save_best({**history["best"], "seconds": time.time() - t0})
        say(f"step {step:5d} | {task.describe(res)}{' *' if improved else ''} | {time.time() - t0:.0f}s")

    def checkpoint(step: int) -> None:
        if task.evaluate is not None:
            run_eval(step)
        save_last(step)

    step, saved_at = start_step, start_step if resume else None
    try:
        with _StopOnSigint() as stop:
            while step < config.steps:
                lr = lr_at(step, config.lr, config.warmup_steps, config.steps, min_lr, config.schedule)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                t_step = time.time()
                micro = [next(batches) for _ in range(config.grad_accum)]
                try:
                    loss, metrics = train_step(step_model, optimizer, micro, loss_fn=task.loss, autocast_dtype=amp_dtype, scaler=scaler,
                                               grad_clip=config.grad_clip, parallel=par, return_metrics=True)
                except NonFiniteLossError as e:
                    raise NonFiniteLossError(f"{e} at step {step + 1} (lr {lr:.3g}); training stopped and nothing of this step was "
                                             f"saved{kept()}. Lower --lr or --grad-clip, or check the data and the settings") from None
                step += 1
                history["train"].append((step, loss))
                for k, v in metrics.items():
                    history["metrics"].setdefault(k, []).append(v)
                bar.update(1)
                tokens = sum(task.tokens(b) for b in micro)
                postfix = {"loss": f"{loss:.4f}"}
                if tokens:
                    postfix["tok_s"] = f"{tokens / max(time.time() - t_step, 1e-9):,.0f}"
                bar.set_postfix(postfix, refresh=False)
                if step % config.log_interval == 0:
                    say(f"step {step:5d} | loss {loss:.4f} | lr {lr:.2e} | {time.time() - t0:.0f}s")
                # Every rank reads its own clock; they must agree, or one would stop while the others wait for it.
                out_of_time = config.max_minutes is not None and distributed.any_rank(time.time() - t0 > 60 * config.max_minutes, par)
                if (config.eval_interval and step % config.eval_interval == 0) or step == config.steps or out_of_time:
                    checkpoint(step)
                    saved_at = step
                if on_step is not None:
                    on_step(step, history, model)
                if distributed.any_rank(stop.requested, par):  # all ranks stop after the same step
                    raise TrainingInterrupted(step, save_last(step) if saved_at != step else last)
                if out_of_time:
                    say(f"stopping after {step} steps: the {config.max_minutes} minute budget is spent")
                    break
    finally:
        bar.close()
    if saved_at != step:
        checkpoint(step)
    check_weights(step, "the model is not usable")
    history.update(seconds=time.time() - t0, steps=step, **task.extra_history(step))
    if best_state is not None:
        model.load_state_dict(best_state)
    elif best_on_disk:
        if par is not None:
            distributed.load_full_state(model, type(distributed.hf_shell(model)).from_pretrained(out_dir / "best").state_dict())
        else:
            task.load(model, out_dir / "best")
    model.eval()
    history["model"] = model
    return history


# ----------------------------------------------------------------------------- the command line


__all__ = [
    "Task", "LoopConfig", "fit", "train_step", "next_token_loss", "lr_at", "make_optimizer", "check_device", "resolve_precision",
    "check_trainable", "weights_finite", "prepare_out_dir", "save_folder", "save_model", "load_model", "NonFiniteLossError",
    "TrainingInterrupted", "RUN_OUTPUTS",
]
