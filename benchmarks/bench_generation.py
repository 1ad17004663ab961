"""Generation speed and memory: llama_edu against transformers, same weights, same run.

    python benchmarks/bench_generation.py                    # CPU, float32, the default cases
    python benchmarks/bench_generation.py --quick            # fewer repeats and tokens
    python benchmarks/bench_generation.py --compile          # also generate(compile=True)
    python benchmarks/bench_generation.py --device cuda --dtype bfloat16 --shape 7b --layers 4

Cases (random weights: speed does not depend on what the weights say):
  decode   tokens/s generating --new-tokens tokens greedily after an 8-token prompt, batch 1
           (and batch 8 for "decode b8"), the KV cache on; both libraries stop only at the length
  prefill  tokens/s for a 512-token prompt (the forward pass generate runs before decoding)
  memory   peak memory while generating, in a fresh subprocess per library: the growth of the
           resident set (RSS high-water mark minus RSS before generating) on CPU,
           torch.cuda.max_memory_allocated on CUDA

  aten ops the number of PyTorch operators dispatched per decoded token (a TorchDispatchMode
           counter: generate 21 tokens minus generate 11, divided by 10), greedy, batch 1. On a
           small model each operator costs about the same (dispatch, not arithmetic), so this is
           the deterministic measure of per-token overhead, on CPU and GPU alike.
  compile  with --compile: generate(compile=True) tokens/s, and the seconds its first call took
           (compiling the decode step)
  bandwidth on CUDA: weight bytes read per decoded token x tok/s / the GPU's peak memory
           bandwidth (--peak-gbps, else a table of known GPUs): how close decoding gets to the
           memory-bound limit (gpt-fast reports about 82% on an A100)

Each number is the median of --repeats runs after a warm-up, with ours and theirs interleaved
so that other load on the machine hits both alike. Ratios > 1 mean llama_edu is faster/smaller.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SHAPES = {
    # name: (preset, overrides)
    "tiny": ("stories260k", dict(max_position_embeddings=1024)),
    "15m": ("stories15m", dict(max_position_embeddings=1024)),
    "7b": ("llama2-7b", dict()),
    # the project's shipped model (data/shakespeare-llama): its shape, random weights, a longer context
    "shipped": (Path(__file__).resolve().parent.parent / "data" / "shakespeare-llama", dict(max_position_embeddings=1024)),
}


def make_config(shape: str, layers: int | None):
    """The LlamaConfig of a named shape (a preset, or a model folder's config.json)."""
    from llama_edu import LlamaConfig

    preset, overrides = SHAPES[shape]
    if layers:
        overrides = {**overrides, "num_hidden_layers": layers}
    if isinstance(preset, Path):
        return LlamaConfig.from_pretrained(preset, **overrides)
    return LlamaConfig.from_preset(preset, **overrides)


def build_pair(shape: str, device: str, dtype: torch.dtype, layers: int | None):
    """transformers' LlamaForCausalLM and ours with identical random weights, in eval mode."""
    import transformers

    from llama_edu import LlamaForCausalLM

    cfg = make_config(shape, layers)
    hf_kwargs = {k: v for k, v in cfg.to_dict().items() if k != "attn_implementation"}
    hf_cfg = transformers.LlamaConfig(**hf_kwargs)
    hf_cfg._attn_implementation = "sdpa"  # the fastest transformers 4.37 offers; ours uses sdpa too
    torch.manual_seed(0)
    with torch.device(device):
        old = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # build in the target dtype: no float32 copy of a big model
        try:
            theirs = transformers.LlamaForCausalLM(hf_cfg).eval()
            ours = LlamaForCausalLM(cfg).eval()
        finally:
            torch.set_default_dtype(old)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return theirs, ours


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_generate(model, ids: torch.Tensor, new_tokens: int, device: str, **kw) -> float:
    """Seconds for one greedy generate of exactly ``new_tokens`` tokens."""
    sync(device)
    t = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0, **kw)
    sync(device)
    elapsed = time.perf_counter() - t
    assert out.shape == (ids.shape[0], ids.shape[1] + new_tokens), out.shape
    return elapsed


def time_case(variants: dict, ids, new_tokens, repeats, device) -> dict:
    """Median tokens/s of each variant {name: (model, generate kwargs)}: one warm-up each (it
    also compiles, for compile=True), then ``repeats`` rounds running the variants in turn."""
    for model, kw in variants.values():
        run_generate(model, ids, new_tokens, device, **kw)
    times = {name: [] for name in variants}
    for _ in range(repeats):
        for name, (model, kw) in variants.items():
            times[name].append(run_generate(model, ids, new_tokens, device, **kw))
    tokens = ids.shape[0] * (ids.shape[1] if new_tokens == 1 else new_tokens)
    return {name: tokens / statistics.median(t) for name, t in times.items()}


class OpCounter(TorchDispatchMode):
    """Counts every aten operator dispatched while active."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def ops_per_token(model, ids: torch.Tensor, device: str) -> float:
    """aten ops per decoded token: generate 21 tokens minus generate 11, over 10."""
    counts = []
    for n in (11, 21):
        with OpCounter() as counter:
            run_generate(model, ids, n, device)
        counts.append(counter.count)
    return (counts[1] - counts[0]) / 10


#: Peak memory bandwidth in GB/s of GPUs, by a substring of torch.cuda.get_device_name().
PEAK_GBPS = {"H200": 4800, "H100 SXM": 3350, "H100 PCIe": 2000, "H100": 3350, "A100-SXM4-80GB": 2039,
             "A100-SXM4-40GB": 1555, "A100": 1555, "L4": 300, "T4": 320, "A10G": 600, "4090": 1008}


def peak_gbps(override: float | None) -> float | None:
    if override:
        return override
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_GBPS.items() if k in name), None)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def memory_child(which: str, shape: str, batch: int, new_tokens: int, device: str, dtype: str, layers: int | None) -> None:
    """Run in a fresh process: print the peak memory growth of one generate as JSON.

    Only the measured library's model is built (weights are random either way). On CPU the
    resident-set high-water mark (VmHWM) is reset through /proc/self/clear_refs just before
    generating, so the peak is that of generation alone, not of imports or model building.
    """
    import transformers

    from llama_edu import LlamaForCausalLM

    warnings.filterwarnings("ignore")
    cfg = make_config(shape, layers)
    torch.manual_seed(0)
    torch.set_default_dtype(getattr(torch, dtype))
    with torch.device(device):
        if which == "ours":
            model = LlamaForCausalLM(cfg).eval()
        else:
            hf_cfg = transformers.LlamaConfig(**{k: v for k, v in cfg.to_dict().items() if k != "attn_implementation"})
            hf_cfg._attn_implementation = "sdpa"
            model = transformers.LlamaForCausalLM(hf_cfg).eval()
    torch.set_default_dtype(torch.float32)
    ids = torch.randint(3, cfg.vocab_size, (batch, 8), generator=torch.Generator().manual_seed(0)).to(device)
    run_generate(model, ids, 4, device)  # warm-up: one-time allocations are not generation's cost
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run_generate(model, ids, new_tokens, device)
        peak = torch.cuda.max_memory_allocated() - base
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        base = _status_kib("VmRSS") * 1024
        run_generate(model, ids, new_tokens, device)
        peak = _status_kib("VmHWM") * 1024 - base
    print(json.dumps({"peak": peak}))


def measure_memory(which: str, args, shape: str, batch: int) -> float:
    cmd = [sys.executable, __file__, "--memory-child", which, "--shape", shape, "--batch", str(batch),
           "--new-tokens", str(args.new_tokens), "--device", args.device, "--dtype", args.dtype,
           "--threads", str(args.threads)]
    if args.layers:
        cmd += ["--layers", str(args.layers)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak"] / 2**20


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    p.add_argument("--shape", default=None, choices=[*SHAPES, "all"], help="default: tiny and 15m on CPU, 7b on CUDA")
    p.add_argument("--layers", type=int, default=None, help="fewer layers (e.g. 4 for a 7B-shaped slice)")
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--prefill-tokens", type=int, default=512)
    p.add_argument("--batch", type=int, default=8, help="batch size of the batched-decode case")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    p.add_argument("--compile", action="store_true", help="also time generate(compile=True) (compiles first: slow warm-up)")
    p.add_argument("--quick", action="store_true", help="3 repeats, 64 new tokens")
    p.add_argument("--peak-gbps", type=float, default=None, help="the GPU's peak memory bandwidth in GB/s")
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    if args.memory_child:
        memory_child(args.memory_child, args.shape, args.batch, args.new_tokens, args.device, args.dtype, args.layers)
        return
    if args.quick:
        args.repeats, args.new_tokens = 3, 64
    if args.shape in (None, "all"):
        shapes = ["tiny", "15m"] if args.device == "cpu" else ["7b"]
        if args.shape == "all":
            shapes = list(SHAPES)
    else:
        shapes = [args.shape]
    if args.shape == "7b" and args.layers is None and args.device == "cpu":
        args.layers = 2  # a full 7B in float32 needs 28 GB: time a 2-layer slice instead
    dtype = getattr(torch, args.dtype)

    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, device {args.device}, "
          f"dtype {args.dtype}, threads {args.threads}, median of {args.repeats}")
    rows = []
    for shape in shapes:
        theirs, ours = build_pair(shape, args.device, dtype, args.layers)
        vocab = ours.config.vocab_size
        g = torch.Generator().manual_seed(0)
        label = shape + (f" ({args.layers} layers)" if args.layers and shape == "7b" else "")
        ids1 = torch.randint(3, vocab, (1, 8), generator=g).to(args.device)
        idsb = torch.randint(3, vocab, (args.batch, 8), generator=g).to(args.device)
        idsp = torch.randint(3, vocab, (1, args.prefill_tokens), generator=g).to(args.device)
        cases = [
            (f"decode b1, {args.new_tokens} tok", ids1, args.new_tokens, "tok/s"),
            (f"decode b{args.batch}, {args.new_tokens} tok", idsb, args.new_tokens, "tok/s"),
            (f"prefill {args.prefill_tokens} tok", idsp, 1, "tok/s"),
        ]
        o_ops, t_ops = ops_per_token(ours, ids1, args.device), ops_per_token(theirs, ids1, args.device)
        rows.append((label, "aten ops per decoded token, b1", o_ops, t_ops, "ops"))
        print(f"  {label:>6} aten ops per token      ours {o_ops:10.1f}  transformers {t_ops:10.1f}", flush=True)
        for name, ids, n, unit in cases:
            variants = {"ours": (ours, {}), "theirs": (theirs, {})}
            if args.compile and n > 1:
                variants["ours compiled"] = (ours, {"compile": True})
                t0 = time.perf_counter()
                run_generate(ours, ids, n, args.device, compile=True)
                first = time.perf_counter() - t0
                print(f"  {label:>6} {name:<24} compile=True: first call (compiling) {first:.1f} s", flush=True)
                rows.append((label, f"{name}: first compile=True call", first, float("nan"), "s"))
            speed = time_case(variants, ids, n, args.repeats, args.device)
            t = speed["theirs"]
            for variant in [v for v in variants if v != "theirs"]:
                o = speed[variant]
                label_v = label + (" (compile=True)" if variant == "ours compiled" else "")
                rows.append((label_v, name, o, t, unit))
                print(f"  {label_v:>6} {name:<24} ours {o:10.1f}  transformers {t:10.1f}  ratio {o / t:5.2f}x", flush=True)
                gbps = peak_gbps(args.peak_gbps) if args.device.startswith("cuda") and n > 1 else None
                if gbps:  # every decoded token reads every weight once (batch rows share the read)
                    weight_bytes = sum(p.numel() * p.element_size() for p in ours.parameters())
                    for who, tps in (("ours", o), ("transformers", t)):
                        frac = weight_bytes * tps / ids.shape[0] / (gbps * 1e9)
                        print(f"  {label_v:>6} {name:<24} {who}: {weight_bytes / 1e9:.2f} GB of weights x "
                              f"{tps / ids.shape[0]:.1f} steps/s = {frac:.0%} of {gbps:.0f} GB/s", flush=True)
                        rows.append((label_v, f"{name}: {who} bandwidth used", frac * 100, float("nan"), "%"))
        del theirs, ours
        if not args.no_memory:
            for batch in (1, args.batch):
                o, t = measure_memory("ours", args, shape, batch), measure_memory("theirs", args, shape, batch)
                rows.append((label, f"peak mem b{batch}, {args.new_tokens} tok", o, t, "MiB"))
                print(f"  {label:>6} peak mem b{batch:<15} ours {o:8.1f} MiB  transformers {t:8.1f} MiB", flush=True)

    print()
    print("| model | case | llama_edu | transformers 4.37 | ratio |")
    print("|---|---|---:|---:|---:|")
    for label, name, o, t, unit in rows:
        # speed: ours / theirs (higher is better); memory: theirs / ours (higher is better)
        if unit in ("s", "%"):
            print(f"| {label} | {name} | {o:.1f} {unit} | | |")
            continue
        if unit == "ops":  # fewer is better
            ratio = f"{t / o:.2f}x fewer"
        elif unit == "tok/s":
            ratio = f"{o / t:.2f}x"
        else:  # below 0.1 MiB the growth is within the allocator's slack: no meaningful ratio
            ratio = f"{t / o:.2f}x" if o >= 0.1 else "n/a"
        print(f"| {label} | {name} | {o:.1f} {unit} | {t:.1f} {unit} | {ratio} |")


if __name__ == "__main__":
    main()
