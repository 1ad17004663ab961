"""``train``, ``sft`` and ``dpo``: pretraining, instruction tuning and preference tuning."""

from __future__ import annotations

import argparse
import sys

from ..config import PRESETS
from ..io.files import PROJECT_DATA_DIR


def _train_command(args: argparse.Namespace) -> int:
    from ..mlp import swiglu_hidden_size
    from ..training import distributed
    from ..training.train import NonFiniteLossError, TrainConfig, TrainingInterrupted, train

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
    except TrainingInterrupted as e:
        where = f"saved {e.checkpoint}; continue with the same command and --resume" if e.checkpoint else "nothing saved"
        print(f"interrupted after step {e.step}: {where}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # before the loop started, or a second Ctrl-C that stops at once
        print(f"interrupted: stopped at once; {args.out}/last/ holds the last complete checkpoint, if any", file=sys.stderr)
        return 130
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
    p.add_argument("--out", required=True, help="output folder: best/ and last/ checkpoints (HF layout), history.json")
    run = p.add_mutually_exclusive_group()
    run.add_argument("--resume", action="store_true", help="continue the run in --out from its last/ checkpoint (same settings)")
    run.add_argument("--overwrite", action="store_true", help="replace a previous run in --out (its best/, last/, history.json)")
    p.add_argument("--tokenizer", default=None, help="SentencePiece .model (default: data/tokenizer.model)")
    p.add_argument("--steps", type=int, default=2000, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=16, help="windows per micro-batch (one forward and backward)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (gradient accumulation)")
    p.add_argument("--block-size", type=int, default=256, help="context length of the training windows")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    p.add_argument("--min-lr", type=float, default=None, help="final learning rate (default: lr / 10)")
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--beta2", type=float, default=0.95, help="AdamW's second-moment decay")
    p.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this; <= 0: no clipping (as transformers' Trainer)")
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
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--max-minutes", type=float, default=None, help="stop (after a final evaluation) when this much wall time is spent")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                   help="auto: bf16 autocast on a GPU that has it, fp16 with a grad scaler on an older GPU, fp32 on CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (slow to start, faster steps on a GPU)")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no progress lines")
    p.add_argument("--parallel", choices=("ddp", "fsdp", "tp", "fsdp+tp"), default=None,
                   help="under torchrun: data parallel (ddp), sharded (fsdp), tensor parallel (tp) or both (fsdp+tp); "
                        "--batch-size stays the global batch")
    p.add_argument("--tp-size", type=int, default=None, help="tensor-parallel group size for --parallel fsdp+tp")
    p.set_defaults(func=_train_command)


def add_lora_arguments(p: argparse.ArgumentParser, default_r: int, r_help: str) -> None:
    """--lora-r, --lora-alpha, --lora-targets (the sft and dpo commands)."""
    p.add_argument("--lora-r", type=int, default=default_r, help=r_help)
    p.add_argument("--lora-alpha", type=float, default=16)
    p.add_argument("--lora-targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")


def _cmd_sft(args: argparse.Namespace) -> int:
    from ..training.lora import LoraConfig, apply_lora, trainable_parameters_report
    from ..training.sft import load_for_finetuning, load_jsonl, save_finetuned, train_sft

    model, tokenizer = load_for_finetuning(args.model, device=args.device, dtype=args.dtype)
    rows = load_jsonl(args.data, split="train")
    if args.lora_r:
        apply_lora(model, LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, target_modules=tuple(args.lora_targets.split(","))))
    print(trainable_parameters_report(model) if args.lora_r else f"full fine-tuning of {sum(p.numel() for p in model.parameters()):,d} parameters")
    train_sft(model, tokenizer, [r["messages"] for r in rows], steps=args.steps, batch_size=args.batch_size, lr=args.lr)
    save_finetuned(model, tokenizer, args.out, adapter_only=bool(args.lora_r))
    return 0


def _add_sft(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("sft", help="instruction-tune a model on chat examples (loss on assistant tokens only)")
    p.add_argument("--model", default=None, help="model folder or hub repo id (default: data/shakespeare-llama)")
    p.add_argument("--data", default=str(PROJECT_DATA_DIR / "sft_instructions.jsonl"), help="JSON Lines of {'messages': [...], 'split': 'train'}")
    p.add_argument("--out", required=True, help="folder for the fine-tuned model (or the LoRA adapter)")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    add_lora_arguments(p, default_r=0, r_help="LoRA rank; 0 = full fine-tuning")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, ... (default: as stored)")
    p.set_defaults(func=_cmd_sft)


def _cmd_dpo(args: argparse.Namespace) -> int:
    import copy

    from ..training.dpo import train_dpo
    from ..training.lora import LoraConfig, apply_lora, trainable_parameters_report
    from ..training.sft import load_for_finetuning, load_jsonl, save_finetuned

    policy, tokenizer = load_for_finetuning(args.model, device=args.device, dtype=args.dtype)
    rows = load_jsonl(args.data, split="train")
    reference = None
    if args.lora_r:
        apply_lora(policy, LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, target_modules=tuple(args.lora_targets.split(","))))
        print(trainable_parameters_report(policy))
    else:
        reference = copy.deepcopy(policy)
    train_dpo(policy, tokenizer, rows, reference=reference, beta=args.beta, steps=args.steps, batch_size=args.batch_size, lr=args.lr)
    save_finetuned(policy, tokenizer, args.out, adapter_only=bool(args.lora_r))
    return 0


def _add_dpo(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("dpo", help="preference-tune a model with DPO against a frozen reference")
    p.add_argument("--model", default=None, help="model folder or hub repo id, usually an SFT model (default: data/shakespeare-llama)")
    p.add_argument("--data", default=str(PROJECT_DATA_DIR / "dpo_preferences.jsonl"), help="JSON Lines of {'prompt': [...], 'chosen': ..., 'rejected': ..., 'split': 'train'}")
    p.add_argument("--out", required=True, help="folder for the tuned model (or the LoRA adapter)")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    add_lora_arguments(p, default_r=8, r_help="LoRA rank (the reference is the model with adapters off); 0 = full fine-tuning against a frozen copy")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.set_defaults(func=_cmd_dpo)


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """``train``, ``sft`` and ``dpo``."""
    _add_train(subparsers)
    _add_sft(subparsers)
    _add_dpo(subparsers)
