"""Train the project's chat model, data/shakespeare-chat: a LoRA adapter on the Shakespeare model,
fine-tuned (SFT, loss on the assistant's tokens only) on the project's own instruction set
data/sft_instructions.jsonl, in Llama 2's chat format. It answers the four taught requests
(greet, bid farewell, thank, call for NAME) in the taught shape, names it never saw included;
anything else gets Shakespeare-flavoured noise, and the notebook says so.

    python scripts/train_chat_model.py          # about a CPU-minute; writes data/shakespeare-chat/

The adapter (PEFT layout: adapter_config.json + adapter_model.safetensors, well under 1 MB) names its
base, ``shakespeare-llama``, which ``llama_edu.generation.chat.load_model_and_tokenizer`` finds beside it.
TRAINING.md records the settings and the held-out result.
"""

from __future__ import annotations

import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from llama_edu.io.files import DEFAULT_MODEL_DIR, PROJECT_DATA_DIR, atomic_write_bytes  # noqa: E402
from llama_edu.generation.chat import load_model_and_tokenizer  # noqa: E402
from llama_edu.training.lora import LoraConfig, apply_lora, save_lora_adapter  # noqa: E402
from llama_edu.training.sft import SFT_DATA, evaluate_format, load_jsonl, train_sft  # noqa: E402

OUT = PROJECT_DATA_DIR / "shakespeare-chat"
RUN = dict(steps=200, batch_size=16, lr=2e-3, seed=0, r=8, alpha=16,
           targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))


def main() -> int:
    torch.manual_seed(RUN["seed"])
    torch.set_num_threads(1)
    model, tok = load_model_and_tokenizer(DEFAULT_MODEL_DIR, device="cpu")
    train_rows, test_rows = load_jsonl(SFT_DATA, split="train"), load_jsonl(SFT_DATA, split="test")
    before, _ = evaluate_format(model, tok, test_rows)
    apply_lora(model, LoraConfig(r=RUN["r"], lora_alpha=RUN["alpha"], target_modules=RUN["targets"],
                                 base_model_name_or_path=DEFAULT_MODEL_DIR.name))
    t0 = time.process_time()
    losses = train_sft(model, tok, [r["messages"] for r in train_rows], steps=RUN["steps"], batch_size=RUN["batch_size"],
                       lr=RUN["lr"], seed=RUN["seed"], log_every=50)
    cpu = time.process_time() - t0
    after, answers = evaluate_format(model, tok, test_rows)
    save_lora_adapter(model, OUT)
    examples = "\n".join(f"    {r['messages'][0]['content']!r:40} -> {a!r}" for r, a in list(zip(test_rows, answers))[:4])
    atomic_write_bytes(OUT / "TRAINING.md", f"""# data/shakespeare-chat

A LoRA adapter (r={RUN['r']}, alpha={RUN['alpha']}, on {', '.join(RUN['targets'])}) on `data/shakespeare-llama`,
made by `python scripts/train_chat_model.py`: supervised fine-tuning on the {len(train_rows)} training conversations
of `data/sft_instructions.jsonl` in Llama 2's chat format, loss on the assistant's tokens only; {RUN['steps']} steps
of {RUN['batch_size']}, AdamW lr {RUN['lr']} (warm-up, cosine), seed {RUN['seed']}, one CPU thread, {cpu:.0f} CPU-seconds
on {platform.processor() or platform.machine()} (torch {torch.__version__}).

Held-out prompts ({len(test_rows)}, names never seen in training), greedy answers in the taught shape:
before {before['format']:.0%}, after {after['format']:.0%}. With the name from the prompt (exactly the reference answer):
{after['exact']:.0%}: it answers with a name it saw in training; copying an unseen name is an in-context skill this
3.4M-parameter model does not learn from 252 examples (notebook 13 shows the same split).
Final training loss {losses[-1]:.3f}. On another machine the last digits differ.

It knows four requests (greet, bid farewell, thank, call for NAME); anything else gets Shakespeare-flavoured
text, since that is all its base model learned. Some held-out answers:

{examples}
""".encode())
    print(f"format on held-out prompts: {before['format']:.0%} -> {after['format']:.0%}; saved {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
