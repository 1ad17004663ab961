"""Peak memory of loading a ~1 GB float32 checkpoint: llama_edu vs transformers' from_pretrained.

Each load runs in a fresh subprocess that reports its RSS just before ``from_pretrained`` and
its RSS high-water mark after it (``VmHWM`` from /proc/self/status, which starts afresh at
``exec``; ``ru_maxrss`` would not: it keeps the parent's RSS inherited at ``fork``), so the
numbers are the memory the load itself needed. Linux only. The checkpoint (a stories15M-like shape made
bigger: hidden 1024, 16 layers, 32000-token vocabulary, untied head; ~271M parameters) is
written to a temporary folder with random weights.

    python benchmarks/bench_load_memory.py            # ~1 GB checkpoint
    python benchmarks/bench_load_memory.py --small    # ~60 MB, a quick smoke run

llama_edu builds the model on the meta device and, when the file holds the dtype asked for,
makes every parameter a view of the memory-mapped file (copy-on-write): the load itself needs
almost nothing, and pages are read on first use. With ``mmap=False`` it reads one tensor at a
time into its own memory (about one copy). transformers 4.37 without ``low_cpu_mem_usage`` first
builds a randomly initialised model and then loads the state dict beside it (about two); with
it (accelerate installed), its tensors also stay views of the mapped file.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

CHILD = textwrap.dedent(
    """
    import json, sys, time
    import torch
    torch.set_num_threads(1)
    which, path = sys.argv[1], sys.argv[2]
    if which.startswith("llama_edu"):
        sys.path.insert(0, sys.argv[3])
        import llama_edu
        mmap = which == "llama_edu"  # "llama_edu mmap=False" reads every tensor into its own memory
        load = lambda: llama_edu.LlamaForCausalLM.from_pretrained(path, progress=False, mmap=mmap)
    else:
        import transformers
        transformers.logging.set_verbosity_error()
        kw = {"low_cpu_mem_usage": True} if which.endswith("low_cpu_mem_usage") else {}
        load = lambda: transformers.LlamaForCausalLM.from_pretrained(path, **kw)

    def status_mb(field):  # VmRSS: resident now; VmHWM: its high-water mark since exec
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024

    before = status_mb("VmRSS")
    t0 = time.perf_counter()
    model = load()
    seconds = time.perf_counter() - t0
    n = sum(p.numel() for p in model.parameters())
    print(json.dumps({"before_mb": before, "peak_mb": status_mb("VmHWM"), "after_mb": status_mb("VmRSS"),
                      "seconds": seconds, "params": n}))
    """
)


def make_checkpoint(folder: Path, small: bool) -> float:
    """Write a random float32 checkpoint with llama_edu's save_pretrained; returns its size in MB."""
    sys.path.insert(0, str(REPO))
    import torch

    import llama_edu

    shape = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=16, num_attention_heads=16)
    if small:
        shape = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4)
    config = llama_edu.LlamaConfig(vocab_size=32000, max_position_embeddings=1024, rms_norm_eps=1e-5, **shape)
    with torch.device("meta"):
        model = llama_edu.LlamaForCausalLM(config)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    model.save_pretrained(folder)
    return sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 1e6


def measure(which: str, folder: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, which, str(folder), str(REPO)],
                         capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"{which} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="a ~60 MB checkpoint for a quick run")
    args = parser.parse_args()
    contenders = ["llama_edu", "llama_edu mmap=False", "transformers"]
    try:
        import accelerate  # noqa: F401  transformers' low_cpu_mem_usage needs it

        contenders.append("transformers low_cpu_mem_usage")
    except ImportError:
        print("(accelerate is not installed: transformers' low_cpu_mem_usage=True is not measured)")

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        size = make_checkpoint(folder, args.small)
        print(f"checkpoint: {size:.0f} MB ({size * 1e6 / 2**20:.0f} MiB; RSS below is in MiB) of float32 safetensors")
        results = {}
        for which in contenders:
            r = results[which] = measure(which, folder)
            print(f"{which:34s} peak RSS {r['peak_mb']:7.0f} MB, of which the load {r['peak_mb'] - r['before_mb']:7.0f} MB "
                  f"(x{(r['peak_mb'] - r['before_mb']) / (size * 1e6 / 2**20):.2f} the file), {r['seconds']:.1f} s")
        ours, theirs = results["llama_edu"], results["transformers"]
        ratio = (theirs["peak_mb"] - theirs["before_mb"]) / (ours["peak_mb"] - ours["before_mb"])
        print(f"memory needed by the load, transformers / llama_edu: {ratio:.2f}x "
              f"(peak RSS {theirs['peak_mb']:.0f} MB vs {ours['peak_mb']:.0f} MB)")


if __name__ == "__main__":
    main()
