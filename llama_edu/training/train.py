"""Pretraining a Llama from scratch: a token stream, batches, the LR schedule, AdamW, evaluation,
resumable checkpoints, and the loop that made the project's default model.

The loop is nanoGPT's, for a Llama. Every optimizer step:

1. set the learning rate (linear warm-up, then a half cosine down to ``min_lr``);
2. draw ``batch_size * grad_accum`` random windows of ``block_size + 1`` tokens and cut them
   into ``grad_accum`` micro-batches (gradient accumulation: the same update as one batch
   ``grad_accum`` times larger, in the memory of one micro-batch);
3. forward each micro-batch (under bf16/fp16 autocast on a GPU), add the gradient of its
   next-token loss divided by ``grad_accum``;
4. stop with an error if the loss is not finite; clip the gradient norm; step AdamW;
5. every ``eval_interval`` steps measure the validation loss, keep the best weights in
   ``OUT/best/`` (early stopping: tiny corpora overfit) and everything needed to continue in
   ``OUT/last/``.

``OUT/last/`` holds the model (``config.json`` + ``model.safetensors``, the Hugging Face layout),
``optimizer.pt`` (AdamW's moments and the fp16 grad scaler), ``rng.pt`` (the batch sampler's
generator, which is the position in the data, and torch's CPU/CUDA and Python's random states)
and ``train_state.json`` (step, history, the run's settings). ``--resume`` continues from it and
gives, on a CPU, bit-identical weights to a run that was never stopped. Each checkpoint folder is
written beside its final place and swapped in by renames, so a crash or ``kill -9`` at any moment
leaves either the previous folder or the new one, whole. Ctrl-C finishes the current step,
saves ``OUT/last/`` and stops (exit status 130 from the command line); a second Ctrl-C stops at once.

Losses are reported two ways:

* nats per token, the cross-entropy the model minimises;
* nats per character = total nats / number of characters the predicted tokens spell. This
  does not depend on the tokenizer, so a BPE model compares with a character-level one
  (nanoGPT's char model on tiny Shakespeare: 1.47 nats/char on validation).

Mixed precision follows transformers' performance guide: bfloat16 autocast on a GPU that has it
(weights, optimizer and checkpoints stay float32), float16 autocast only together with a gradient
scaler (float16's small range underflows small gradients otherwise), float32 on a CPU.

Command line::

    python -m llama_edu train --data input.txt --out runs/shakespeare --steps 2000 \\
        --hidden-size 256 --num-hidden-layers 4 --batch-size 16 --block-size 256 --lr 1e-3
    python -m llama_edu train ... --resume        # continue runs/shakespeare/last/
    torchrun --nproc_per_node 2 -m llama_edu train ... --parallel fsdp   # see llama_edu.distributed

With ``--parallel ddp|fsdp|tp|fsdp+tp`` under torchrun, ``--batch-size`` stays the global batch:
every rank draws the same windows and keeps its ``batch_size / N`` rows, so the run follows the
one-process run. Rank 0 logs, evaluates and writes; ``OUT/last/`` then also holds ``dcp/``, the
model and optimizer shards of every rank (``torch.distributed.checkpoint``), from which
``--resume`` continues on any number of ranks, one process included.
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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from tqdm import tqdm

from . import distributed
from ..io.atomic_save import recover_folder, replace_folder_files
from ..config import LlamaConfig
from ..io.files import PROJECT_DATA_DIR, atomic_write_bytes, find_input_file
from ..modeling import LlamaForCausalLM, causal_lm_loss  # noqa: F401 (notebook 10 imports it from here)

DEFAULT_TOKENIZER = PROJECT_DATA_DIR / "tokenizer.model"


# ----------------------------------------------------------------------------- data
class TokenDataset:
    """A text file as two token streams: the first 90% of the text for training, the last
    10% for validation (split at the first line break after the 90% mark, so no word is cut).

    Each part is tokenized as one document with a single BOS in front (no per-line BOS: the
    model sees line breaks as ordinary ``<0x0A>`` tokens, as in the text).

    Attributes: ``train``, ``val`` (1-D int64 tensors of token ids), ``char_lengths``
    (vocab_size,) = how many characters each token spells (0 for control tokens), used to
    convert nats/token into nats/character.
    """

    def __init__(self, path: str | os.PathLike, tokenizer_path: str | os.PathLike | None = None, val_fraction: float = 0.1):
        import sentencepiece as spm

        path = find_input_file(path, "training text")  # a path, or a shared data name like tinyshakespeare.txt
        if not path.is_file():
            raise FileNotFoundError(f"training text {path} is not a file; pass --data with a path to a UTF-8 text file")
        tokenizer_path = Path(tokenizer_path or DEFAULT_TOKENIZER)
        if not tokenizer_path.is_file():
            raise FileNotFoundError(f"tokenizer {tokenizer_path} not found; pass a SentencePiece .model file")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        self.text = path.read_text(encoding="utf-8")
        self.sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
        self.vocab_size = self.sp.vocab_size()

        split = int(len(self.text) * (1.0 - val_fraction))
        newline = self.text.find("\n", split)
        split = newline + 1 if newline != -1 else split
        self.train_text, self.val_text = self.text[:split], self.text[split:]
        if not self.train_text or not self.val_text:
            raise ValueError(f"{path.name} is too short to split into train and validation parts")
        self.train = self._encode(self.train_text)
        self.val = self._encode(self.val_text)
        self.char_lengths = self._char_lengths()

    def _encode(self, text: str) -> torch.Tensor:
        return torch.tensor([self.sp.bos_id()] + self.sp.encode(text), dtype=torch.long)

    def _char_lengths(self) -> torch.Tensor:
        """Characters spelled by each token id: "▁the" -> 4 (" the"), a byte token <0x0A> -> 1,
        <s>, </s>, <unk> -> 0. (A byte token is one character for ASCII text; a multi-byte
        character spelled by byte tokens is over-counted, which lowers nats/char slightly.)"""
        lengths = torch.zeros(self.vocab_size, dtype=torch.long)
        for i in range(self.vocab_size):
            if self.sp.is_control(i) or self.sp.is_unknown(i):
                continue
            lengths[i] = 1 if self.sp.is_byte(i) else len(self.sp.id_to_piece(i))
        return lengths

    def split(self, name: str) -> torch.Tensor:
        if name not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {name!r}")
        return self.train if name == "train" else self.val


def get_batch(
    tokens: torch.Tensor, batch_size: int, block_size: int, generator: torch.Generator | None = None, device: str | torch.device = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch_size`` random contiguous windows of a 1-D token stream.

    Returns ``(x, y)``, both (batch_size, block_size): ``y`` is ``x`` shifted left by one, the
    next token at every position.
    """
    if len(tokens) < block_size + 1:
        raise ValueError(f"the token stream has {len(tokens)} tokens, fewer than block_size + 1 = {block_size + 1}; lower --block-size")
    starts = torch.randint(len(tokens) - block_size, (batch_size,), generator=generator)
    windows = torch.stack([tokens[s : s + block_size + 1] for s in starts.tolist()])  # (b, block+1)
    windows = windows.to(device)
    return windows[:, :-1], windows[:, 1:]


# ----------------------------------------------------------------------------- the loss
# ----------------------------------------------------------------------------- optimisation
def lr_at(step: int, max_lr: float, warmup_steps: int, total_steps: int, min_lr: float) -> float:
    """Linear warm-up from ~0 to ``max_lr`` over ``warmup_steps``, then a half cosine down to
    ``min_lr`` at ``total_steps`` (and ``min_lr`` after). ``step`` counts from 0."""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= total_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)  # 0 -> 1
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.95)) -> torch.optim.AdamW:
    """AdamW with weight decay on the matrices (embeddings, projections) only: decaying the
    RMSNorm gains would pull them towards 0 and shrink every activation for no benefit."""
    params = {id(p): p for p in model.parameters() if p.requires_grad}.values()  # a tied head once
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model: LlamaForCausalLM, tokens: torch.Tensor, char_lengths: torch.Tensor, block_size: int, batch_size: int = 16, max_batches: int | None = None) -> dict[str, float]:
    """Mean loss over a token stream cut into consecutive non-overlapping windows (the whole
    stream unless ``max_batches`` limits it), so the number is deterministic.

    Returns ``{"loss": nats/token, "nats_per_char": total nats / characters the predicted
    tokens spell, "tokens": n, "chars": n}``.
    """
    was_training = model.training
    model.eval()
    device = model.device
    n_windows = (len(tokens) - 1) // block_size
    if n_windows == 0:
        raise ValueError(f"the evaluation stream has {len(tokens)} tokens, fewer than block_size + 1 = {block_size + 1}")
    windows = tokens[: n_windows * block_size + 1]
    total_nats, total_tokens, total_chars = 0.0, 0, 0
    for b, first in enumerate(range(0, n_windows, batch_size)):
        if max_batches is not None and b >= max_batches:
            break
        idx = range(first, min(first + batch_size, n_windows))
        chunk = torch.stack([windows[i * block_size : (i + 1) * block_size + 1] for i in idx]).to(device)
        x, y = chunk[:, :-1], chunk[:, 1:]  # (b, block)
        logits = model(input_ids=x, use_cache=False).logits  # (b, block, vocab) float32
        nats = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum")
        total_nats += nats.item()
        total_tokens += y.numel()
        total_chars += int(char_lengths.to(y.device)[y].sum())
    if was_training:
        model.train()
    return {
        "loss": total_nats / total_tokens,
        "nats_per_char": total_nats / max(1, total_chars),
        "tokens": total_tokens,
        "chars": total_chars,
    }


# ----------------------------------------------------------------------------- checkpoints
def save_checkpoint(model: LlamaForCausalLM, out_dir: str | os.PathLike, state: dict[str, Any] | None = None,
                    extra: dict[str, Any] | None = None, *, state_dict: dict[str, torch.Tensor] | None = None,
                    folders: dict[str, Path] | None = None) -> Path:
    """Write a checkpoint folder ``out_dir`` whole or not at all (:mod:`llama_edu.atomic_save`): the
    model in the Hugging Face layout with ``model.save_pretrained`` (``config.json`` +
    ``model.safetensors``; a tied LM head is stored once, as transformers does), ``state`` as
    ``train_state.json``, and each ``extra`` item (a name -> object) with ``torch.save``
    (tensors, numbers, lists and dicts only, so ``torch.load(weights_only=True)`` reads it).
    ``state_dict`` replaces ``model.state_dict()`` (a distributed run's gathered weights), and
    each ``folders`` item (a name -> an existing folder) is moved inside, e.g. sharded states."""

    # The whole folder is the checkpoint: every entry of the previous one is replaced.
    with replace_folder_files(out_dir, owned=lambda name: True, last=None) as folder:
        model.save_pretrained(folder, state_dict=state_dict, atomic=False)  # this save is staged already
        if state is not None:
            (folder / "train_state.json").write_text(json.dumps(state, indent=1) + "\n")
        for name, obj in (extra or {}).items():
            torch.save(obj, folder / name)
        for name, src in (folders or {}).items():
            os.replace(src, folder / name)
    return Path(out_dir)


def load_checkpoint(out_dir: str | os.PathLike) -> LlamaForCausalLM:
    """Load the model of a checkpoint written by :func:`save_checkpoint` (any HF-layout folder works)."""
    return LlamaForCausalLM.from_pretrained(out_dir)


# ----------------------------------------------------------------------------- settings
@dataclass
class TrainConfig:
    """Everything a run depends on; saved next to the checkpoints as ``train_config.json``."""

    data: str
    out_dir: str | None = None  # None: keep nothing on disk
    tokenizer: str | None = None  # SentencePiece .model; None: the project's data/tokenizer.model
    model: dict[str, Any] = field(default_factory=lambda: dict(
        hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=8, max_position_embeddings=256, tie_word_embeddings=True, rms_norm_eps=1e-5,
    ))  # LlamaConfig fields; vocab_size comes from the tokenizer
    steps: int = 2000
    batch_size: int = 16  # windows per micro-batch (one forward/backward)
    grad_accum: int = 1  # micro-batches per optimizer step: batch_size * grad_accum windows a step
    block_size: int = 256
    lr: float = 1e-3
    min_lr: float | None = None  # None: lr / 10
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta2: float = 0.95
    grad_clip: float = 1.0  # <= 0: no clipping (as transformers' Trainer)
    eval_interval: int = 100
    eval_batches: int | None = None  # None: the whole validation split
    log_interval: int = 10
    seed: int = 1337
    threads: int | None = None
    max_minutes: float | None = None  # stop early (after an evaluation) when the wall time runs out
    device: str = "cpu"
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 (see resolve_precision)
    compile: bool = False  # torch.compile the model for the training steps
    progress: bool | None = None  # a tqdm bar; None: only when stderr is a terminal
    parallel: str | None = None  # ddp | fsdp | tp | fsdp+tp under torchrun (see llama_edu.distributed)
    tp_size: int | None = None  # tensor-parallel group size for fsdp+tp


#: Settings a resumed run must share with the run it continues. Changing one would not continue
#: the same run. The rest may change: intervals, threads, device, precision, and ``steps`` and
#: ``warmup_steps`` (the command line caps the warm-up at the step count), whose new values the
#: learning-rate schedule follows from the resumed step on.
RESUME_MUST_MATCH = ("model", "batch_size", "grad_accum", "block_size", "lr", "min_lr", "weight_decay", "beta2",
                     "grad_clip", "seed")

#: What ``--overwrite`` removes from OUT: what a run writes there, nothing else.
RUN_OUTPUTS = ("best", "last", "history.json", "train_config.json")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_config(config: TrainConfig) -> None:
    """Refuse settings that cannot train, with a message naming the flag and the fix."""
    for name in ("steps", "batch_size", "grad_accum", "eval_interval", "log_interval"):
        value = getattr(config, name)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{_flag(name)} must be a whole number >= 1, got {value!r}")
    if not isinstance(config.block_size, int) or config.block_size < 2:
        raise ValueError(f"--block-size must be a whole number >= 2, got {config.block_size!r}")
    for name in ("threads", "eval_batches"):
        value = getattr(config, name)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{_flag(name)} must be a whole number >= 1 (or left out), got {value!r}")
    if not isinstance(config.warmup_steps, int) or config.warmup_steps < 0:
        raise ValueError(f"--warmup-steps must be a whole number >= 0, got {config.warmup_steps!r}")
    if not (math.isfinite(config.lr) and config.lr > 0):
        raise ValueError(f"--lr must be a finite number > 0 (e.g. 1e-3), got {config.lr}")
    for name in ("min_lr", "weight_decay"):
        value = getattr(config, name)
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{_flag(name)} must be a finite number >= 0, got {value}")
    if not 0.0 <= config.beta2 < 1.0:
        raise ValueError(f"--beta2 must be in [0, 1), got {config.beta2}")
    if math.isnan(config.grad_clip):
        raise ValueError("--grad-clip must be a number (<= 0 turns clipping off), got nan")
    if config.max_minutes is not None and not config.max_minutes > 0:
        raise ValueError(f"--max-minutes must be > 0 (or left out), got {config.max_minutes}")
    resolve_precision(config.precision, check_device(config.device))


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
    """The autocast dtype for ``precision`` on ``device`` (None: plain float32).

    ``auto``: bfloat16 on a CUDA GPU that supports it, float16 (with a grad scaler) on an older
    one, float32 elsewhere. ``bf16`` needs a GPU with bfloat16 or a CPU; ``fp16`` needs CUDA.
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


# ----------------------------------------------------------------------------- faults
class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite: training stopped before the step that would spread it."""


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


# ----------------------------------------------------------------------------- one step
def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: list[tuple[torch.Tensor, torch.Tensor]],
    *,
    autocast_dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
    grad_clip: float = 1.0,
    parallel: distributed.Parallel | None = None,
) -> float:
    """One optimizer step over ``micro_batches`` (each ``(x, y)``, (b, block) token ids, ``y``
    the next tokens); returns the mean next-token loss.

    This is the one place that runs backward and steps, so a distributed wrapper only has to
    hand in a wrapped ``model``: for a DDP model, gradients are all-reduced once, after the last
    micro-batch (``no_sync`` before it). Each micro-batch's loss is divided by their number, so
    the summed gradient is the gradient of the mean loss over all of them: the same update as
    one batch that many times larger. ``grad_clip <= 0`` means no clipping. With ``parallel``
    (each rank holding its rows of the micro-batches) the returned loss is the mean over ranks,
    the loss of the global batch, and the gradient norm is taken over the sharded gradients.
    """
    n = len(micro_batches)
    device_type = micro_batches[0][0].device.type
    total = torch.zeros((), device=micro_batches[0][0].device)
    for i, (x, y) in enumerate(micro_batches):
        last = i == n - 1
        with distributed.no_sync(model, sync=last):
            with torch.autocast(device_type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
                logits = model(input_ids=x, use_cache=False).logits  # (b, block, vocab)
                loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))
            scaled = loss / n
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        total += loss.detach()
    mean_loss = distributed.mean_over_ranks(total, parallel) / n  # one host sync a step
    if not math.isfinite(mean_loss):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLossError(f"the training loss is {mean_loss}")
    if grad_clip > 0:
        if scaler is not None:
            scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
        if parallel is None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        else:
            distributed.clip_grad_norm_(model.parameters(), grad_clip)  # sharded gradients

    if scaler is not None:
        scaler.step(optimizer)  # skips the step when a gradient overflowed in float16
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return mean_loss


def micro_batches(dataset: TokenDataset, config: TrainConfig, generator: torch.Generator, device: torch.device,
                  parallel: distributed.Parallel | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The batch of one optimizer step, ``batch_size * grad_accum`` random windows drawn at
    once (so the data do not depend on how they are split) and cut into ``grad_accum``
    micro-batches of ``batch_size``; with ``parallel``, this rank's rows of each."""
    x, y = get_batch(dataset.train, config.batch_size * config.grad_accum, config.block_size, generator, device)
    return [(distributed.local_rows(xi, parallel), distributed.local_rows(yi, parallel))
            for xi, yi in zip(x.split(config.batch_size), y.split(config.batch_size))]


# ----------------------------------------------------------------------------- the run
def _join_parallel(config: TrainConfig, model_cfg: LlamaConfig, device: torch.device,
                   amp_dtype: torch.dtype | None) -> distributed.Parallel | None:
    """Join the torchrun process group for ``config.parallel`` (None: one process)."""
    if config.parallel is None:
        if config.tp_size is not None:
            raise ValueError("--tp-size needs --parallel tp or fsdp+tp")
        return None
    if amp_dtype == torch.float16 and config.parallel != "ddp":
        raise ValueError(f"--precision fp16 (with its grad scaler) runs with --parallel ddp only; use bf16 with --parallel {config.parallel}")
    if config.compile and config.parallel != "ddp":
        raise ValueError(f"--compile is supported with --parallel ddp only here; drop it for --parallel {config.parallel}")
    par = distributed.init_parallel(config.parallel, model_cfg, device, config.tp_size)
    distributed.check_batch_divides(config.batch_size, par.dp_size)
    return par


def _data_fingerprint(dataset: TokenDataset) -> dict[str, int]:
    """Enough to tell whether a resumed run reads the same token streams."""
    weights = torch.arange(1, len(dataset.train) + 1, dtype=torch.float64)
    return {"train_tokens": len(dataset.train), "val_tokens": len(dataset.val), "vocab_size": dataset.vocab_size,
            "train_checksum": int((dataset.train.double() * weights).sum().item()) % (2**61 - 1)}


def prepare_out_dir(out_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to mix two runs in one folder: an existing non-empty ``out_dir`` needs
    ``resume`` (continue its last/) or ``overwrite`` (remove what a previous run wrote there).
    Checks that the folder can be written before any training starts."""
    if resume and overwrite:
        raise ValueError("--resume continues the run in --out and --overwrite deletes it; pass only one")
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir} exists and is not a folder; choose another --out")
    recover_folder(out_dir / "last")
    recover_folder(out_dir / "best")
    if resume:
        if not (out_dir / "last" / "train_state.json").is_file():
            raise ValueError(f"--resume: {out_dir} holds no resumable checkpoint (last/train_state.json); "
                             f"drop --resume to start a new run there")
    elif out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            raise ValueError(f"--out {out_dir} already holds files (a previous run?); pass --resume to continue "
                             f"it, --overwrite to replace it, or choose another --out")
        for name in RUN_OUTPUTS:
            path = out_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write-test.{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"--out {out_dir} cannot be written ({e.strerror or e}); choose a writable folder") from None


def _rng_state(generator: torch.Generator) -> dict[str, Any]:
    return {
        "batches": generator.get_state(),  # the position in the data: which windows come next
        "torch": torch.get_rng_state(),  # dropout, if the model has any
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
    }


def _set_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    generator.set_state(state["batches"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])


def _resume_mismatches(saved: dict[str, Any], config: TrainConfig) -> list[str]:
    now = asdict(config)
    return [f"{_flag(k)}: {saved.get(k)!r} in the checkpoint, {now[k]!r} now" if k != "model" else
            f"model: {saved.get(k)} in the checkpoint, {now[k]} now" for k in RESUME_MUST_MATCH if saved.get(k) != now[k]]


def train(
    config: TrainConfig,
    dataset: TokenDataset | None = None,
    log: Callable[[str], None] = print,
    *,
    resume: bool = False,
    overwrite: bool = False,
    model: LlamaForCausalLM | None = None,
    on_step: Callable[[int, dict[str, Any], LlamaForCausalLM], None] | None = None,
) -> dict[str, Any]:
    """Train a LlamaForCausalLM as ``config`` says and return the history:
    ``{"train": [(step, loss), ...], "val": [(step, nats/token, nats/char), ...], "best": {...},
    "model": the model with the best validation weights, "params": count, "seconds": wall time,
    "steps": steps done, "tokens_seen": n}``.

    With ``config.out_dir`` the best model goes to ``OUT/best/`` each time validation improves
    and a resumable ``OUT/last/`` is written at every evaluation, at the end and on Ctrl-C
    (which then raises :class:`TrainingInterrupted`). An existing non-empty ``OUT`` needs
    ``resume=True`` (continue from ``OUT/last/``) or ``overwrite=True``.

    ``dataset`` skips re-tokenizing ``config.data``; ``log`` receives the progress lines;
    ``model`` trains that model (its config must match ``config.model``) instead of a fresh one
    (seeded with ``config.seed``); ``on_step(step, history, model)`` is called after every step
    (and its evaluation, if one was due) with the history so far, e.g. to draw a live loss curve.
    A non-finite loss raises :class:`NonFiniteLossError` and saves nothing.
    """
    check_config(config)
    device = check_device(config.device)
    amp_dtype = resolve_precision(config.precision, device)
    if config.threads:
        torch.set_num_threads(config.threads)
    dataset = dataset or TokenDataset(config.data, config.tokenizer)
    model_cfg = LlamaConfig(**{"vocab_size": dataset.vocab_size, "max_position_embeddings": config.block_size, **config.model})
    if model_cfg.max_position_embeddings < config.block_size:
        raise ValueError(f"--block-size {config.block_size} exceeds the model's max_position_embeddings {model_cfg.max_position_embeddings}; lower --block-size")
    # Several processes (torchrun): join them; rank 0 alone logs, evaluates' output and writes.
    par = _join_parallel(config, model_cfg, device, amp_dtype)
    if par is not None:
        device = par.device
        if not par.is_main:
            log = lambda line: None  # noqa: E731
    out_dir = Path(config.out_dir) if config.out_dir else None
    if out_dir:
        distributed.on_main(lambda: prepare_out_dir(out_dir, resume, overwrite), par)
    elif resume:
        raise ValueError("resume=True needs config.out_dir (the folder holding last/)")

    # The model, its optimizer and the batch sampler, fresh ...
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    if model is None:
        model = LlamaForCausalLM(model_cfg)
    elif model.config.to_dict() != model_cfg.to_dict():
        raise ValueError("the model passed to train() does not have the shape config.model describes; build it from the same settings")
    model.to(device).train()
    min_lr = config.lr / 10 if config.min_lr is None else config.min_lr
    fingerprint = _data_fingerprint(dataset)
    history: dict[str, Any] = {"train": [], "val": [], "best": None, "params": model.num_parameters()}
    best_state: dict[str, torch.Tensor] | None = None
    best_from_disk = False  # best_state read from OUT/best/ (whole tensors) rather than taken from the model
    start_step, seconds_before = 0, 0.0

    # ... or as the last checkpoint left them (the weights before the model is split up).
    if resume:
        last = out_dir / "last"
        state = json.loads((last / "train_state.json").read_text())
        problems = _resume_mismatches(state["train_config"], config)
        if state.get("data") != fingerprint:
            problems.append(f"the training data: {state.get('data')} in the checkpoint, {fingerprint} now")
        if problems:
            raise ValueError(f"--resume: {last} is a checkpoint of another configuration; use the settings it was "
                             f"trained with (see {out_dir / 'train_config.json'}) or start a new run. Differences: " + "; ".join(problems))
        model.load_state_dict(LlamaForCausalLM.from_pretrained(last).state_dict())
    # DDP wraps the model (``step_model``); FSDP and TP shard it in place: ``model`` is the one to
    # evaluate and save, and its parameters are the ones to optimize.
    wrapped = distributed.parallelize(model, par) if par is not None else model
    optimizer = make_optimizer(model, config.lr, config.weight_decay, (0.9, config.beta2))
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    if resume:
        if (last / "dcp").is_dir():  # written by a distributed run, on any number of ranks
            distributed.load_sharded(wrapped, optimizer, last / "dcp")
        else:
            saved = torch.load(last / "optimizer.pt", weights_only=True, map_location=device)
            if par is None:
                optimizer.load_state_dict(saved["optimizer"])
            else:
                distributed.load_one_process_optimizer_state(wrapped, optimizer, saved["optimizer"])
        if scaler is not None and (last / "scaler.pt").is_file():
            scaler.load_state_dict(torch.load(last / "scaler.pt", weights_only=True))
        _set_rng_state(torch.load(last / "rng.pt", weights_only=True), gen)
        history.update(state["history"])
        history["train"] = [tuple(t) for t in history["train"]]
        history["val"] = [tuple(v) for v in history["val"]]
        start_step, seconds_before = state["step"], state["seconds"]
        if (out_dir / "best").is_dir():
            best_state = {k: v.to(device) for k, v in LlamaForCausalLM.from_pretrained(out_dir / "best").state_dict().items()}
            best_from_disk = True
        log(f"resuming {out_dir} at step {start_step} of {config.steps}")
        changed = [f"{k} {getattr(config, k)} (was {state['train_config'][k]})" for k in ("steps", "warmup_steps")
                   if state["train_config"].get(k) != getattr(config, k)]
        if changed:
            log("the learning-rate schedule follows the new " + ", ".join(changed))
    if out_dir:
        distributed.on_main(lambda: atomic_write_bytes(out_dir / "train_config.json", (json.dumps(asdict(config), indent=2) + "\n").encode()), par)

    step_model: nn.Module = torch.compile(wrapped) if config.compile else wrapped  # saving and evaluation use `model`
    tokens_per_step = config.batch_size * config.grad_accum * config.block_size
    show_bar = (sys.stderr.isatty() if config.progress is None else config.progress) and (par is None or par.is_main)
    bar = tqdm(total=config.steps, initial=start_step, disable=not show_bar, unit="step", dynamic_ncols=True)
    say = bar.write if show_bar and log is print else log
    say(f"model: {history['params']:,} parameters; train {len(dataset.train):,} tokens, val {len(dataset.val):,} tokens; "
        f"{tokens_per_step:,} tokens a step; {config.device}, {'fp32' if amp_dtype is None else str(amp_dtype).split('.')[-1]}"
        + (f"; --parallel {par.strategy} on {par.world_size} ranks ({par.dp_size} data-parallel x {par.tp_size} tensor-parallel)" if par else ""))
    t0 = time.time() - seconds_before

    def snapshot(step: int) -> dict[str, Any]:
        kept = {k: v for k, v in history.items() if k in ("train", "val", "best", "params")}
        kept.update(steps=step, seconds=time.time() - t0, tokens_seen=step * tokens_per_step)
        return {"step": step, "seconds": time.time() - t0, "history": kept, "train_config": asdict(config), "data": fingerprint}

    def save_last(step: int) -> Path | None:
        if not out_dir:
            return None
        if par is None:
            extra = {"optimizer.pt": {"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler else None},
                     "rng.pt": _rng_state(gen)}
            save_checkpoint(model, out_dir / "last", snapshot(step), extra)
            atomic_write_bytes(out_dir / "history.json", (json.dumps(snapshot(step)["history"], indent=1) + "\n").encode())
            return out_dir / "last"
        # Distributed: every rank writes its shards of the model and optimizer (DCP) into a
        # folder beside OUT, the weights are gathered to rank 0, and rank 0 swaps in a last/
        # with both: the HF-layout model one process would write, and dcp/ inside it.
        shards = out_dir / f".last-dcp.{distributed.broadcast_object(uuid.uuid4().hex[:8], par)}.tmp"
        distributed.save_sharded(wrapped, optimizer, shards)
        weights = distributed.full_state_dict(model)
        extra = {"rng.pt": _rng_state(gen), **({"scaler.pt": scaler.state_dict()} if scaler else {})}

        def write() -> None:
            for stale in out_dir.glob(".last-dcp.*.tmp"):  # left by a run that died while saving
                if stale != shards:
                    shutil.rmtree(stale, ignore_errors=True)
            save_checkpoint(distributed.hf_shell(model), out_dir / "last", snapshot(step), extra,
                            state_dict=weights, folders={"dcp": shards})
            atomic_write_bytes(out_dir / "history.json", (json.dumps(snapshot(step)["history"], indent=1) + "\n").encode())

        distributed.on_main(write, par)
        return out_dir / "last"

    def save_best(meta: dict[str, Any]) -> None:
        if par is None:
            save_checkpoint(model, out_dir / "best", meta)
            return
        weights = distributed.full_state_dict(model)  # collective: every rank takes part
        distributed.on_main(lambda: save_checkpoint(distributed.hf_shell(model), out_dir / "best", meta, state_dict=weights), par)

    def run_eval(step: int) -> None:
        nonlocal best_state, best_from_disk

        def measure() -> dict[str, float]:
            return evaluate(model, dataset.val, dataset.char_lengths, config.block_size, config.batch_size, config.eval_batches)

        if par is not None and par.strategy == "ddp":  # every rank holds the whole model: rank 0 evaluates
            res = distributed.broadcast_object(distributed.on_main(measure, par), par)
        else:  # FSDP/TP: the weights are spread over the ranks, so all of them run the forward
            res = measure()
        if not math.isfinite(res["loss"]):
            raise NonFiniteLossError(f"the validation loss is {res['loss']} at step {step}; training stopped and this model was "
                                     f"not saved: best/ and last/ hold the last good checkpoints. Lower --lr, or check the data")
        history["val"].append((step, res["loss"], res["nats_per_char"]))
        improved = history["best"] is None or res["loss"] < history["best"]["val_loss"]
        if improved:
            history["best"] = {"step": step, "val_loss": res["loss"], "val_nats_per_char": res["nats_per_char"]}
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}  # this rank's shards
            best_from_disk = False
            if out_dir:
                save_best({**history["best"], "seconds": time.time() - t0})
        say(f"step {step:5d} | val {res['loss']:.4f} nats/token {res['nats_per_char']:.4f} nats/char"
            f"{' *' if improved else ''} | {time.time() - t0:.0f}s")
        save_last(step)

    step = start_step
    try:
        with _StopOnSigint() as stop:
            while step < config.steps:
                lr = lr_at(step, config.lr, config.warmup_steps, config.steps, min_lr)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                t_step = time.time()
                try:
                    loss = train_step(step_model, optimizer, micro_batches(dataset, config, gen, device, par),
                                      autocast_dtype=amp_dtype, scaler=scaler, grad_clip=config.grad_clip, parallel=par)
                except NonFiniteLossError as e:
                    raise NonFiniteLossError(f"{e} at step {step + 1} (lr {lr:.3g}); training stopped and nothing of this "
                                             f"step was saved: best/ and last/ hold the last good checkpoints. Lower --lr "
                                             f"or --grad-clip, or check the data") from None
                step += 1
                history["train"].append((step, loss))
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_step / max(time.time() - t_step, 1e-9):,.0f}", refresh=False)
                if step % config.log_interval == 0:
                    say(f"step {step:5d} | loss {loss:.4f} | lr {lr:.2e} | {time.time() - t0:.0f}s")
                out_of_time = config.max_minutes is not None and time.time() - t0 > 60 * config.max_minutes
                if step % config.eval_interval == 0 or step == config.steps or out_of_time:
                    run_eval(step)
                if on_step is not None:
                    on_step(step, history, model)
                if distributed.any_rank(stop.requested, par):  # all ranks stop after the same step
                    raise TrainingInterrupted(step, save_last(step))
                if out_of_time:
                    say(f"stopping after {step} steps: the {config.max_minutes} minute budget is spent")
                    break
    finally:
        bar.close()
    if not history["val"] or history["val"][-1][0] != step:
        run_eval(step)
    history["seconds"] = time.time() - t0
    history["steps"] = step
    history["tokens_seen"] = step * tokens_per_step
    if best_state is not None:
        if par is not None and best_from_disk:
            distributed.load_full_state(model, best_state)  # best/ read back on resume: whole tensors
        else:
            model.load_state_dict(best_state)
    model.eval()
    history["model"] = model
    return history


# ----------------------------------------------------------------------------- command line
