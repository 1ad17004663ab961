"""Training-loop pieces: a token stream, batches, the LR schedule, AdamW, evaluation, checkpoints.

The loop is nanoGPT's, for a Llama: sample random windows of ``block_size + 1`` tokens from the
training stream, predict each next token, step AdamW with a warm-up + cosine learning rate and
clipped gradients, and every ``eval_interval`` steps measure the validation loss and keep the
best checkpoint (early stopping by validation loss, since tiny corpora overfit quickly).

Losses are reported two ways:

* nats per token, the cross-entropy the model minimises;
* nats per character = total nats / number of characters the predicted tokens spell. This
  does not depend on the tokenizer, so a BPE model compares with a character-level one
  (nanoGPT's char model on tiny Shakespeare: 1.47 nats/char on validation).

Command line::

    python -m llama_edu train --data input.txt --out runs/shakespeare --steps 2000 \\
        --hidden-size 256 --num-hidden-layers 4 --batch-size 16 --block-size 256 --lr 1e-3
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import PRESETS, LlamaConfig
from .files import PROJECT_DATA_DIR, atomic_write_bytes
from .mlp import swiglu_hidden_size
from .modeling import LlamaForCausalLM

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

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"training text {path} not found; pass --data with a path to a UTF-8 text file")
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
def save_checkpoint(model: LlamaForCausalLM, out_dir: str | os.PathLike, state: dict[str, Any] | None = None) -> Path:
    """Write the model to ``out_dir`` in the Hugging Face layout with ``model.save_pretrained``
    (``config.json`` + ``model.safetensors``; a tied LM head is stored once, as transformers
    does) and, if given, the training ``state`` to ``train_state.json``. Every file is written
    under a temporary name and renamed into place, so a save that dies midway leaves the
    previous checkpoint whole."""
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    if state is not None:
        atomic_write_bytes(out_dir / "train_state.json", (json.dumps(state, indent=2) + "\n").encode())
    return out_dir


def load_checkpoint(out_dir: str | os.PathLike) -> LlamaForCausalLM:
    """Load a checkpoint written by :func:`save_checkpoint` (any HF-layout folder works)."""
    return LlamaForCausalLM.from_pretrained(out_dir)


# ----------------------------------------------------------------------------- the loop
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
    batch_size: int = 16
    block_size: int = 256
    lr: float = 1e-3
    min_lr: float | None = None  # None: lr / 10
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_interval: int = 100
    eval_batches: int | None = None  # None: the whole validation split
    log_interval: int = 10
    seed: int = 1337
    threads: int | None = None
    max_minutes: float | None = None  # stop early (after an evaluation) when the wall time runs out
    device: str = "cpu"


def train(config: TrainConfig, dataset: TokenDataset | None = None, log=print) -> dict[str, Any]:
    """Train a fresh LlamaForCausalLM as ``config`` says and return the history:
    ``{"train": [(step, loss), ...], "val": [(step, nats/token, nats/char), ...], "best": {...},
    "model": the model with the best validation weights, "params": count, "seconds": wall time,
    "tokens_seen": n}``. With ``out_dir``, the best model is saved to ``out_dir/best`` each
    time validation improves, and the last one to ``out_dir/last`` at the end. ``dataset``
    skips re-tokenizing ``config.data``; ``log`` receives the progress lines."""
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    dataset = dataset or TokenDataset(config.data, config.tokenizer)
    for name in ("steps", "batch_size", "block_size", "eval_interval"):
        if getattr(config, name) < 1:
            raise ValueError(f"{name} must be at least 1, got {getattr(config, name)}")

    model_cfg = LlamaConfig(**{"vocab_size": dataset.vocab_size, "max_position_embeddings": config.block_size, **config.model})
    if model_cfg.max_position_embeddings < config.block_size:
        raise ValueError(f"block_size {config.block_size} exceeds the model's max_position_embeddings {model_cfg.max_position_embeddings}")
    model = LlamaForCausalLM(model_cfg).to(config.device)
    model.train()
    optimizer = make_optimizer(model, config.lr, config.weight_decay, (0.9, config.beta2))
    min_lr = config.lr / 10 if config.min_lr is None else config.min_lr
    out_dir = Path(config.out_dir) if config.out_dir else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out_dir / "train_config.json", (json.dumps(asdict(config), indent=2) + "\n").encode())

    n_params = model.num_parameters()
    log(f"model: {n_params:,} parameters; train {len(dataset.train):,} tokens, val {len(dataset.val):,} tokens")
    history: dict[str, Any] = {"train": [], "val": [], "best": None, "params": n_params}
    best_state = None
    t0 = time.time()

    def run_eval(step: int) -> bool:
        nonlocal best_state
        res = evaluate(model, dataset.val, dataset.char_lengths, config.block_size, config.batch_size, config.eval_batches)
        history["val"].append((step, res["loss"], res["nats_per_char"]))
        improved = history["best"] is None or res["loss"] < history["best"]["val_loss"]
        if improved:
            history["best"] = {"step": step, "val_loss": res["loss"], "val_nats_per_char": res["nats_per_char"]}
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            if out_dir:
                save_checkpoint(model, out_dir / "best", {**history["best"], "seconds": time.time() - t0})
        log(f"step {step:5d} | val {res['loss']:.4f} nats/token {res['nats_per_char']:.4f} nats/char"
            f"{' *' if improved else ''} | {time.time() - t0:.0f}s")
        return improved

    for step in range(config.steps):
        lr = lr_at(step, config.lr, config.warmup_steps, config.steps, min_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = get_batch(dataset.train, config.batch_size, config.block_size, gen, config.device)
        logits = model(input_ids=x, use_cache=False).logits  # (b, block, vocab)
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        history["train"].append((step + 1, loss.item()))
        if (step + 1) % config.log_interval == 0:
            log(f"step {step + 1:5d} | loss {loss.item():.4f} | lr {lr:.2e} | {time.time() - t0:.0f}s")
        out_of_time = config.max_minutes is not None and time.time() - t0 > 60 * config.max_minutes
        if (step + 1) % config.eval_interval == 0 or step + 1 == config.steps or out_of_time:
            run_eval(step + 1)
        if out_of_time:
            log(f"stopping after {step + 1} steps: the {config.max_minutes} minute budget is spent")
            break
    steps_done = len(history["train"])
    if not history["val"] or history["val"][-1][0] != steps_done:
        run_eval(steps_done)
    history["seconds"] = time.time() - t0
    history["steps"] = steps_done
    history["tokens_seen"] = steps_done * config.batch_size * config.block_size
    if out_dir:
        save_checkpoint(model, out_dir / "last", {"step": steps_done, "seconds": history["seconds"]})
        atomic_write_bytes(out_dir / "history.json", (json.dumps(history, indent=1) + "\n").encode())
    model.load_state_dict(best_state)
    model.eval()
    history["model"] = model
    return history


# ----------------------------------------------------------------------------- command line
def _train_command(args: argparse.Namespace) -> int:
    model = dict(PRESETS[args.preset]) if args.preset else dict(TrainConfig.__dataclass_fields__["model"].default_factory())
    model.pop("vocab_size", None)  # the tokenizer decides
    for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "attention_dropout"):
        value = getattr(args, name)
        if value is not None:
            model[name] = value
    if args.num_attention_heads is not None and args.num_key_value_heads is None:
        model["num_key_value_heads"] = args.num_attention_heads  # multi-head attention unless told otherwise
    if args.hidden_size is not None and args.intermediate_size is None and not args.preset:
        model["intermediate_size"] = swiglu_hidden_size(args.hidden_size, multiple_of=16)
    model["max_position_embeddings"] = max(args.block_size, model.get("max_position_embeddings", 0))
    config = TrainConfig(
        data=args.data, out_dir=args.out, tokenizer=args.tokenizer, model=model, steps=args.steps,
        batch_size=args.batch_size, block_size=args.block_size, lr=args.lr, min_lr=args.min_lr,
        warmup_steps=min(args.warmup_steps, args.steps), weight_decay=args.weight_decay, grad_clip=args.grad_clip,
        eval_interval=args.eval_interval or args.steps, eval_batches=args.eval_batches, log_interval=args.log_interval,
        seed=args.seed, threads=args.threads, max_minutes=args.max_minutes, device=args.device,
    )
    history = train(config)
    best = history["best"]
    print(f"best val {best['val_loss']:.4f} nats/token {best['val_nats_per_char']:.4f} nats/char at step {best['step']}; "
          f"{history['steps']} steps in {history['seconds']:.0f}s; saved to {args.out}/best")
    return 0


def add_cli_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``train`` to ``python -m llama_edu``."""
    p = subparsers.add_parser("train", help="train a small Llama on a text file", description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="UTF-8 text file; its last 10%% is the validation split")
    p.add_argument("--out", required=True, help="output folder: best/ and last/ checkpoints (HF layout), history.json")
    p.add_argument("--tokenizer", default=None, help="SentencePiece .model (default: data/tokenizer.model)")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--block-size", type=int, default=256, help="context length of the training windows")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    p.add_argument("--min-lr", type=float, default=None, help="final learning rate (default: lr / 10)")
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--eval-interval", type=int, default=100, help="steps between validation runs (0: only at the end)")
    p.add_argument("--eval-batches", type=int, default=None, help="limit validation to this many batches")
    p.add_argument("--log-interval", type=int, default=10)
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="start from a named model shape")
    p.add_argument("--hidden-size", type=int, default=None)
    p.add_argument("--intermediate-size", type=int, default=None)
    p.add_argument("--num-hidden-layers", type=int, default=None)
    p.add_argument("--num-attention-heads", type=int, default=None)
    p.add_argument("--num-key-value-heads", type=int, default=None)
    p.add_argument("--attention-dropout", type=float, default=None)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--max-minutes", type=float, default=None, help="stop (after a final evaluation) when this much wall time is spent")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_train_command)
