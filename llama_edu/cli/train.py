"""``train``, ``sft`` and ``dpo``: pretraining, instruction tuning and preference tuning, all run by
the one training loop (:mod:`llama_edu.training.loop`). The flags the three share mean the same thing
in each (:func:`add_training_arguments`)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from ..config import PRESETS
from ..io.files import DEFAULT_MODEL_DIR, PROJECT_DATA_DIR

STRATEGIES = ("ddp", "fsdp", "tp", "fsdp+tp")  # llama_edu.training.distributed.STRATEGIES (tested equal)


def add_training_arguments(p: argparse.ArgumentParser, *, steps: int, lr: float, seed: int, out_help: str,
                           grad_clip: float = 1.0) -> None:
    """The flags every training command shares, each meaning the same thing in each: ``--out``,
    ``--resume`` / ``--overwrite``, ``--steps``, ``--lr``, ``--grad-clip``, ``--precision``, ``--seed``."""
    p.add_argument("--out", required=True, help=out_help)
    run = p.add_mutually_exclusive_group()
    run.add_argument("--resume", action="store_true", help="continue the run in --out from its last/ checkpoint (same settings)")
    run.add_argument("--overwrite", action="store_true", help="replace a previous run in --out (what a run writes there, nothing else)")
    p.add_argument("--steps", type=int, default=steps, help="optimizer steps")
    p.add_argument("--lr", type=float, default=lr, help="peak learning rate (after the linear warm-up)")
    p.add_argument("--grad-clip", type=float, default=grad_clip,
                   help="clip the gradient norm to this; <= 0: no clipping (as transformers' Trainer)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                   help="autocast: auto is bf16 on a GPU that has it, fp16 with a grad scaler on an older GPU, none on a CPU; "
                        "the weights keep their dtype")
    p.add_argument("--seed", type=int, default=seed, help="seeds the data order (and a fresh model's weights)")


def interrupted_exit(e: KeyboardInterrupt, out: str | os.PathLike) -> int:
    """What a command prints and returns when Ctrl-C stopped training (exit status 130)."""
    from ..training.loop import TrainingInterrupted

    if isinstance(e, TrainingInterrupted):
        where = f"saved {e.checkpoint}; continue with the same command and --resume" if e.checkpoint else "nothing saved"
        print(f"interrupted after step {e.step}: {where}", file=sys.stderr)
    else:  # before the loop started, or a second Ctrl-C that stops at once
        print(f"interrupted: stopped at once; {out}/last/ holds the last complete checkpoint, if any", file=sys.stderr)
    return 130


def _train_command(args: argparse.Namespace) -> int:
    from ..mlp import swiglu_hidden_size
    from ..training import distributed
    from ..training.loop import NonFiniteLossError
    from ..training.train import TrainConfig, train

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
    if args.eval_interval is not None and args.eval_interval < 0:
        raise ValueError(f"--eval-interval must be >= 0 (0: evaluate only at the end), got {args.eval_interval}")
    config = TrainConfig(
        data=args.data, out_dir=args.out, tokenizer=args.tokenizer, model=model, steps=args.steps,
        batch_size=args.batch_size, grad_accum=args.grad_accum, block_size=args.block_size, lr=args.lr, min_lr=args.min_lr,
        warmup_steps=min(args.warmup_steps, args.steps), weight_decay=args.weight_decay, beta2=args.beta2,
        grad_clip=args.grad_clip, eval_interval=args.eval_interval or max(1, args.steps), eval_batches=args.eval_batches,
        log_interval=args.log_interval, seed=args.seed, threads=args.threads, max_minutes=args.max_minutes,
        device=args.device, precision=args.precision, compile=args.compile, progress=False if args.quiet else None,
        parallel=args.parallel, tp_size=args.tp_size,
    )
    log = (lambda s: None) if args.quiet else (lambda s: print(s, flush=True))
    try:
        history = train(config, log=log, resume=args.resume, overwrite=args.overwrite)
        if config.parallel and not distributed.is_main():
            return 0  # rank 0 prints the summary
    except KeyboardInterrupt as e:  # TrainingInterrupted (last/ saved), or a Ctrl-C before the loop or a second one
        return interrupted_exit(e, args.out)
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        distributed.shutdown()
    best = history["best"]
    print(f"best val {best['val_loss']:.4f} nats/token {best['val_nats_per_char']:.4f} nats/char at step {best['step']}; "
          f"{history['steps']} steps in {history['seconds']:.0f}s; saved to {args.out}/best")
    return 0


def _add_train(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train", help="train a small Llama on a text file",
        description="Train a Llama from scratch on a UTF-8 text file (nanoGPT's loop), keeping the best and a resumable "
                    "last checkpoint in --out. Ctrl-C saves last/ and exits with status 130; --resume continues it.")
    p.add_argument("--data", required=True, help="UTF-8 text file; its last 10%% is the validation split")
    add_training_arguments(p, steps=2000, lr=1e-3, seed=1337,
                           out_help="output folder: best/ and last/ checkpoints (HF layout), history.json")
    p.add_argument("--tokenizer", default=None, help="SentencePiece .model (default: data/tokenizer.model)")
    p.add_argument("--batch-size", type=int, default=16, help="windows per micro-batch (one forward and backward)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (gradient accumulation)")
    p.add_argument("--block-size", type=int, default=256, help="context length of the training windows")
    p.add_argument("--min-lr", type=float, default=None, help="final learning rate (default: lr / 10)")
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--beta2", type=float, default=0.95, help="AdamW's second-moment decay")
    p.add_argument("--eval-interval", type=int, default=100, help="steps between validation runs (0: only at the end)")
    p.add_argument("--eval-batches", type=int, default=None, help="limit validation to this many batches")
    p.add_argument("--log-interval", type=int, default=10, help="steps between progress lines")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="start from a named model shape")
    p.add_argument("--hidden-size", type=int, default=None)
    p.add_argument("--intermediate-size", type=int, default=None)
    p.add_argument("--num-hidden-layers", type=int, default=None)
    p.add_argument("--num-attention-heads", type=int, default=None)
    p.add_argument("--num-key-value-heads", type=int, default=None)
    p.add_argument("--attention-dropout", type=float, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--max-minutes", type=float, default=None, help="stop (after a final evaluation) when this much wall time is spent")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (slow to start, faster steps on a GPU)")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no progress lines")
    p.add_argument("--parallel", choices=STRATEGIES, default=None,
                   help="under torchrun: data parallel (ddp), sharded (fsdp), tensor parallel (tp) or both (fsdp+tp); "
                        "--batch-size stays the global batch")
    p.add_argument("--tp-size", type=int, default=None, help="tensor-parallel group size for --parallel fsdp+tp")
    p.set_defaults(func=_train_command)


def add_lora_arguments(p: argparse.ArgumentParser, default_r: int, r_help: str) -> None:
    """--lora-r, --lora-alpha, --lora-targets (the sft and dpo commands)."""
    p.add_argument("--lora-r", type=int, default=default_r, help=r_help)
    p.add_argument("--lora-alpha", type=float, default=16)
    p.add_argument("--lora-targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")


def add_finetuning_arguments(p: argparse.ArgumentParser, *, steps: int, lr: float, default_r: int, r_help: str, model_help: str) -> None:
    """The arguments the sft and dpo commands share: the common training flags
    (:func:`llama_edu.training.loop.add_training_arguments`), the model, batch, LoRA and device."""
    p.add_argument("--model", default=None, help=model_help)
    add_training_arguments(p, steps=steps, lr=lr, seed=0,
                           out_help="output folder: the tuned model with its tokenizer (or the LoRA adapter), and last/, "
                                    "the resumable checkpoint")
    p.add_argument("--batch-size", type=int, default=16)
    add_lora_arguments(p, default_r=default_r, r_help=r_help)
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: as stored; float16 weights do not train)")
    p.add_argument("--log-interval", type=int, default=10, help="steps between progress lines")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no progress lines")


def finetuning_record(args: argparse.Namespace, command: str, **extra: Any) -> dict[str, Any]:
    """The settings of an sft or dpo run, saved as OUT/train_config.json and checked on --resume."""
    return {"command": command, "model": str(args.model or DEFAULT_MODEL_DIR), "data": str(args.data), "steps": args.steps,
            "batch_size": args.batch_size, "lr": args.lr, "warmup_steps": min(args.warmup_steps, args.steps),
            "grad_clip": args.grad_clip, "precision": args.precision, "seed": args.seed, "lora_r": args.lora_r,
            "lora_alpha": args.lora_alpha, "lora_targets": args.lora_targets, "dtype": args.dtype, **extra}


def prepare_finetuning(args: argparse.Namespace):
    """(model, tokenizer, rows, inputs) for the sft and dpo commands: the model loaded, its LoRA
    adapters applied when ``--lora-r`` > 0, the training rows of ``--data``."""
    from ..training.lora import LoraConfig, apply_lora, trainable_parameters_report
    from ..training.sft import load_for_finetuning, load_jsonl

    model, tokenizer = load_for_finetuning(args.model, device=args.device, dtype=args.dtype)
    rows = load_jsonl(args.data, split="train")
    if args.lora_r:
        apply_lora(model, LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, target_modules=tuple(args.lora_targets.split(","))))
    if not args.quiet:
        print(trainable_parameters_report(model) if args.lora_r else f"full fine-tuning of {sum(p.numel() for p in model.parameters()):,d} parameters")
    return model, tokenizer, rows, (args.model or DEFAULT_MODEL_DIR, args.data)


def run_finetuning(args: argparse.Namespace, task: Any, tokenizer: Any) -> int:
    """Run an sft or dpo command's task through the one loop with the shared flags, then write
    the result into OUT. Ctrl-C: last/ saved, exit status 130. A non-finite loss or weights:
    one line, exit status 1, nothing of them saved."""
    from ..training.loop import LoopConfig, NonFiniteLossError, fit
    from ..training.sft import save_finetuned

    config = LoopConfig(steps=args.steps, lr=args.lr, warmup_steps=min(args.warmup_steps, max(args.steps, 0)), grad_clip=args.grad_clip,
                        precision=args.precision, seed=args.seed, log_interval=args.log_interval, out_dir=args.out,
                        progress=False if args.quiet else None)
    log = None if args.quiet else (lambda line: print(line, flush=True))
    try:
        fit(task, config, log=log, resume=args.resume, overwrite=args.overwrite)
    except KeyboardInterrupt as e:
        return interrupted_exit(e, args.out)
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    save_finetuned(task.model, tokenizer, args.out, adapter_only=bool(args.lora_r))
    return 0


def _cmd_sft(args: argparse.Namespace) -> int:
    from ..training.sft import SFTTask

    model, tokenizer, rows, inputs = prepare_finetuning(args)
    task = SFTTask(model, tokenizer, [r["messages"] for r in rows], args.batch_size,
                   record=finetuning_record(args, "sft"), inputs=inputs)
    return run_finetuning(args, task, tokenizer)


def _add_sft(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("sft", help="instruction-tune a model on chat examples (loss on assistant tokens only)",
                              description="Instruction-tune a model (or LoRA adapters) on chat examples with the one training loop. "
                                          "Ctrl-C saves OUT/last/ and exits with status 130; --resume continues it.")
    add_finetuning_arguments(p, steps=150, lr=1e-3, default_r=0, r_help="LoRA rank; 0 = full fine-tuning",
                             model_help="model folder or hub repo id (default: data/shakespeare-llama)")
    p.add_argument("--data", default=str(PROJECT_DATA_DIR / "sft_instructions.jsonl"), help="JSON Lines of {'messages': [...], 'split': 'train'}")
    p.add_argument("--warmup-steps", type=int, default=10)
    p.set_defaults(func=_cmd_sft)


def _cmd_dpo(args: argparse.Namespace) -> int:
    import copy

    from ..training.dpo import DPOTask

    policy, tokenizer, rows, inputs = prepare_finetuning(args)
    reference = None if args.lora_r else copy.deepcopy(policy)  # with LoRA: the policy with its adapters off
    task = DPOTask(policy, tokenizer, rows, reference, args.beta, args.sft_weight, args.batch_size,
                   record=finetuning_record(args, "dpo", beta=args.beta, sft_weight=args.sft_weight), inputs=inputs)
    return run_finetuning(args, task, tokenizer)


def _add_dpo(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("dpo", help="preference-tune a model with DPO against a frozen reference",
                              description="Preference-tune a model (or LoRA adapters) with DPO with the one training loop. "
                                          "Ctrl-C saves OUT/last/ and exits with status 130; --resume continues it.")
    add_finetuning_arguments(p, steps=50, lr=1e-3, default_r=8,
                             r_help="LoRA rank (the reference is the model with adapters off); 0 = full fine-tuning against a frozen copy",
                             model_help="model folder or hub repo id, usually an SFT model (default: data/shakespeare-llama)")
    p.add_argument("--data", default=str(PROJECT_DATA_DIR / "dpo_preferences.jsonl"), help="JSON Lines of {'prompt': [...], 'chosen': ..., 'rejected': ..., 'split': 'train'}")
    p.add_argument("--beta", type=float, default=0.1, help="how far the policy may drift from the reference (DPO's beta, > 0)")
    p.add_argument("--sft-weight", type=float, default=0.0, help="add this x the chosen answers' NLL to the loss (RPO); 0: the paper's DPO")
    p.add_argument("--warmup-steps", type=int, default=5)
    p.set_defaults(func=_cmd_dpo)


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """``train``, ``sft`` and ``dpo``."""
    _add_train(subparsers)
    _add_sft(subparsers)
    _add_dpo(subparsers)
