"""Pretraining a Llama from scratch: a token stream, random windows, the next-token loss,
evaluation in nats per token and per character, and the settings of the run that made the
project's default model. The loop itself (accumulation, precision, clipping, the schedule,
Ctrl-C, resume, checkpoints) is :mod:`llama_edu.training.loop`'s, shared with classification,
LoRA, SFT and DPO: this module hands it a :class:`PretrainingTask`.

Every optimizer step draws ``batch_size * grad_accum`` random windows of ``block_size + 1``
tokens and cuts them into ``grad_accum`` micro-batches (the same update as one batch
``grad_accum`` times larger); the learning rate rises linearly over ``warmup_steps`` and falls
along a half cosine to ``min_lr``; AdamW decays the matrices only. Every ``eval_interval`` steps
the validation loss is measured: the best weights go to ``OUT/best/`` (early stopping: tiny
corpora overfit) and everything needed to continue to ``OUT/last/``.

``OUT/last/`` holds the model (``config.json`` + ``model.safetensors``, the Hugging Face layout),
``optimizer.pt`` (AdamW's moments and the fp16 grad scaler), ``rng.pt`` (torch's CPU/CUDA and
Python's random states) and ``train_state.json`` (step, history, the run's settings).
``--resume`` continues from it (the windows are drawn again from the seed up to the saved step)
and gives, on a CPU, bit-identical weights to a run that was never stopped. Each checkpoint
folder is written beside its final place and swapped in by renames, so a crash or ``kill -9`` at
any moment leaves either the previous folder or the new one, whole. Ctrl-C finishes the current
step, saves ``OUT/last/`` and stops (exit status 130 from the command line); a second Ctrl-C
stops at once.

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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from . import distributed
from ..config import LlamaConfig
from ..io.atomic_save import replace_folder_files
from ..io.files import PROJECT_DATA_DIR, find_input_file
from ..modeling import LlamaForCausalLM
from .loop import LoopConfig, Task, _flag, check_device, fit, next_token_loss, resolve_precision
# Importable from here as before the loop moved to loop.py (notebook 10 imports causal_lm_loss and train_step):
from ..modeling import causal_lm_loss  # noqa: F401
from .loop import NonFiniteLossError, TrainingInterrupted, lr_at, make_optimizer, prepare_out_dir, train_step  # noqa: F401

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


class PretrainingTask(Task):
    """Next-token prediction on a :class:`TokenDataset`, for :func:`llama_edu.training.loop.fit`."""

    resume_keys = RESUME_MUST_MATCH

    def __init__(self, model: LlamaForCausalLM, dataset: TokenDataset, config: TrainConfig, device: torch.device,
                 parallel: distributed.Parallel | None = None):
        self.model, self.dataset, self.config, self.device, self.parallel = model, dataset, config, device, parallel
        self.tokens_per_step = config.batch_size * config.grad_accum * config.block_size
        self.inputs = (config.data, config.tokenizer)

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return next_token_loss(model, batch)

    def batches(self, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield from micro_batches(self.dataset, self.config, generator, self.device, self.parallel)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        c = self.config
        res = evaluate(model, self.dataset.val, self.dataset.char_lengths, c.block_size, c.batch_size, c.eval_batches)
        return {"loss": res["loss"], "nats_per_char": res["nats_per_char"]}

    def describe(self, result: dict[str, float]) -> str:
        return f"val {result['loss']:.4f} nats/token {result['nats_per_char']:.4f} nats/char"

    def record(self) -> dict[str, Any]:
        return asdict(self.config)

    def fingerprint(self) -> dict[str, int]:
        return _data_fingerprint(self.dataset)

    def tokens(self, batch: tuple[torch.Tensor, torch.Tensor]) -> int:
        return batch[0].numel() * (self.parallel.dp_size if self.parallel else 1)

    def extra_history(self, step: int) -> dict[str, Any]:
        return {"params": self.model.num_parameters(), "tokens_seen": step * self.tokens_per_step}


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
    # Several processes (torchrun): join them; rank 0 alone logs and writes.
    par = _join_parallel(config, model_cfg, device, amp_dtype)
    if par is not None:
        device = par.device
    torch.manual_seed(config.seed)  # a fresh model's weights
    if model is None:
        model = LlamaForCausalLM(model_cfg)
    elif model.config.to_dict() != model_cfg.to_dict():
        raise ValueError("the model passed to train() does not have the shape config.model describes; build it from the same settings")
    model.to(device)
    task = PretrainingTask(model, dataset, config, device, par)
    tokens_per_step = task.tokens_per_step
    if par is None or par.is_main:
        log(f"model: {model.num_parameters():,} parameters; train {len(dataset.train):,} tokens, val {len(dataset.val):,} tokens; "
            f"{tokens_per_step:,} tokens a step; {config.device}, {'fp32' if amp_dtype is None else str(amp_dtype).split('.')[-1]}"
            + (f"; --parallel {par.strategy} on {par.world_size} ranks ({par.dp_size} data-parallel x {par.tp_size} tensor-parallel)" if par else ""))
    loop = LoopConfig(
        steps=config.steps, lr=config.lr, min_lr=config.min_lr, warmup_steps=config.warmup_steps, schedule="cosine",
        weight_decay=config.weight_decay, betas=(0.9, config.beta2), grad_clip=config.grad_clip, grad_accum=config.grad_accum,
        precision=config.precision, compile=config.compile, seed=config.seed, eval_interval=config.eval_interval,
        log_interval=config.log_interval, max_minutes=config.max_minutes, progress=config.progress, out_dir=config.out_dir,
    )
    return fit(task, loop, log=log, resume=resume, overwrite=overwrite, on_step=on_step, parallel=par)

# ----------------------------------------------------------------------------- command line
