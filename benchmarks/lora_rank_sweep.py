"""LoRA rank sweep on SMS spam: accuracy and F1 on the full test split against trainable
parameters, with full fine-tuning beside it, all from the project's Shakespeare model with the
same number of steps. Prints a Markdown table (the README's LoRA table comes from this script).

    OMP_NUM_THREADS=1 python benchmarks/lora_rank_sweep.py --steps 60 --ranks 1 2 4 8 16 32
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings

import torch

from llama_edu import LlamaForSequenceClassification, LlamaTokenizer
from llama_edu.classification import evaluate_classifier, fine_tune, load_spam_splits, majority_baseline, set_pad_token
from llama_edu.files import DEFAULT_MODEL_DIR
from llama_edu.lora import LoraConfig, apply_lora, count_parameters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--targets", default="q_proj,v_proj")
    parser.add_argument("--lora-lr", type=float, default=3e-3)
    parser.add_argument("--full-lr", type=float, default=1e-3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message=".*newly initialized.*")
    data = load_spam_splits()
    tok = LlamaTokenizer.from_pretrained(DEFAULT_MODEL_DIR)
    base = LlamaForSequenceClassification.from_pretrained(DEFAULT_MODEL_DIR, num_labels=2)
    set_pad_token(tok, base)
    base_head = base.score.weight.detach().clone()  # every run starts from the same head
    rows = []

    def run(name: str, config: LoraConfig | None, lr: float) -> None:
        torch.manual_seed(0)
        model = copy.deepcopy(base)
        model.score.weight.data.copy_(base_head)
        if config is not None:
            apply_lora(model, config)
        trainable, total = count_parameters(model)
        start = time.process_time()
        fine_tune(model, tok, data.train_texts, data.train_labels, steps=args.steps, lr=lr)
        cpu = time.process_time() - start
        m = evaluate_classifier(model, tok, data.test_texts, data.test_labels)
        rows.append((name, trainable, m["accuracy"], m["f1"], cpu))
        print(f"{name}: trainable {trainable:,} accuracy {m['accuracy']:.4f} F1 {m['f1']:.3f} ({cpu:.1f} s CPU)", flush=True)

    run("full fine-tuning", None, args.full_lr)
    targets = tuple(args.targets.split(","))
    for r in args.ranks:
        run(f"LoRA r={r}", LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, modules_to_save=("score",)), args.lora_lr)
    baseline = majority_baseline(data.train_labels, data.test_labels)
    print(f"\n{args.steps} steps of 16 messages; LoRA on {', '.join(targets)} (+ the score head), alpha = 2r, lr {args.lora_lr}; "
          f"full fine-tuning lr {args.full_lr}. Test split: {len(data.test_texts)} messages.\n")
    print("| model | trainable parameters | test accuracy | spam F1 | training CPU s |")
    print("|---|---:|---:|---:|---:|")
    print(f"| majority baseline (always ham) | 0 | {baseline['accuracy']:.2%} | {baseline['f1']:.3f} | 0 |")
    for name, trainable, acc, f1, cpu in rows:
        print(f"| {name} | {trainable:,} | {acc:.2%} | {f1:.3f} | {cpu:.0f} |")


if __name__ == "__main__":
    main()
