"""CPU instructions per decoded token, llama_edu against transformers, counted by valgrind.

    python benchmarks/instructions_per_token.py                     # stories260K, static cache
    python benchmarks/instructions_per_token.py --cache dynamic --tokens 64

On a tiny model (stories260K: 64 wide, 5 layers) a decoded token is all overhead: Python,
nn.Module calls, operator dispatch. Wall-clock tok/s of such a model swings by 30% on a shared
machine; the number of instructions executed does not. Each library runs in its own process
under ``valgrind --tool=callgrind`` with counting switched on (``callgrind_control``) only around
two greedy generates, of 1 and of 1 + --tokens new tokens, after a warm-up: the difference over
--tokens is the cost of one decoded token, set-up and prefill excluded. Batch 1, 1 thread,
float32, eos as the model's config says (both libraries check it every token). Instructions are
not time (cache misses and vector widths differ), but on this model they track it: fewer
instructions per token is the per-token overhead that was removed.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

def default_model() -> Path:
    """stories260K's Hugging Face folder in $LLAMA_EDU_DATA or ../shared/data (as the data files)."""
    bases = [Path(os.environ["LLAMA_EDU_DATA"])] if os.environ.get("LLAMA_EDU_DATA") else []
    bases.append(ROOT.parent / "shared" / "data")
    return next((b / "stories260K" / "hf" for b in bases if (b / "stories260K" / "hf").is_dir()), bases[-1] / "stories260K" / "hf")


def child(which: str, model_dir: str, cache: str, tokens: int) -> None:
    """Inside valgrind: load, warm up, then count two generates (dumped as parts 1 and 2)."""
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    if which == "llama_edu":
        sys.path.insert(0, str(ROOT))
        from llama_edu import LlamaForCausalLM

        model, kw = LlamaForCausalLM.from_pretrained(model_dir).eval(), {"cache_implementation": cache}
    else:
        import transformers

        model = transformers.LlamaForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa").eval()
        kw = {}  # transformers 4.37 generates with its DynamicCache only

    def generate(n: int) -> None:
        with torch.inference_mode():
            model.generate(torch.tensor([[1]]), max_new_tokens=n, do_sample=False, pad_token_id=0, **kw)

    generate(4)
    generate(tokens + 1)
    control = lambda *a: subprocess.run(["callgrind_control", *a, str(os.getpid())], capture_output=True, check=True)
    control("-i", "on")
    generate(1)
    control("-d", "one")
    generate(tokens + 1)
    control("-d", "many")
    control("-i", "off")


def count(which: str, args) -> float:
    """Instructions per decoded token of one library (a valgrind run of this script)."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={tmp}/cg.%p",
               sys.executable, __file__, "--child", which, "--model", str(args.model), "--cache", args.cache,
               "--tokens", str(args.tokens)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        subprocess.run(cmd, capture_output=True, check=True, env=env)
        totals = {}
        for part in Path(tmp).glob("cg.*.*"):
            text = part.read_text()
            totals[int(part.suffix[1:])] = int(re.search(r"^totals: (\d+)", text, re.MULTILINE).group(1))
    if sorted(totals) != [1, 2]:
        raise RuntimeError(f"expected two callgrind dumps, got parts {sorted(totals)}")
    return (totals[2] - totals[1]) / args.tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="a Hugging Face Llama folder (default: stories260K/hf)")
    p.add_argument("--cache", choices=["static", "dynamic"], default="static",
                   help="llama_edu's cache_implementation (transformers 4.37 has only its dynamic cache)")
    p.add_argument("--tokens", type=int, default=32, help="decoded tokens counted (beyond the first)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    args.model = args.model or default_model()
    if args.child:
        child(args.child, str(args.model), args.cache, args.tokens)
        return
    if not (args.model / "config.json").exists():
        sys.exit(f"no model at {args.model}: pass --model PATH (a Hugging Face Llama folder)")
    if not shutil.which("valgrind") or not shutil.which("callgrind_control"):
        sys.exit("valgrind (with callgrind_control) is not installed: apt-get install valgrind")
    ours, theirs = count("llama_edu", args), count("transformers", args)
    name = args.model.parent.name if args.model.name == "hf" else args.model.name  # stories260K/hf
    print(f"{name}, batch 1, greedy, 1 thread, {args.cache} cache, {args.tokens} tokens counted")
    print("| library | instructions per decoded token |\n|---|---:|")
    print(f"| llama_edu | {ours / 1e6:.2f} M |\n| transformers 4.37 | {theirs / 1e6:.2f} M |")
    print(f"transformers / llama_edu: {theirs / ours:.2f}x")


if __name__ == "__main__":
    main()
