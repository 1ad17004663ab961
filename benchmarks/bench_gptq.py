"""GPTQ's calibration passes: one pass over the depth (llama_edu.gptq.gptq) against a full model
forward per layer (the previous driver, kept only here, in ``gptq_full_forward_per_layer``).

    python benchmarks/bench_gptq.py                          # 7B-shaped, 2 and 8 layers, CPU
    python benchmarks/bench_gptq.py --layers 2 8 32 --device cuda --dtype bfloat16 --solve gptq

The model is Llama 2 7B's layer shape (hidden 4096, intermediate 11008, 32 heads) with random
weights and --layers decoder layers. Calibration: --batches batches of --batch-size sequences of
--seq-len random tokens. For each depth both drivers quantize a freshly built copy of the same
model, interleaved (old, new); the script prints their seconds (wall, and CPU seconds of the
process, the steadier figure on a shared machine), the ratio, the decoder-layer
forwards per calibration batch (counted with forward hooks: n (n + 1) / 2 for the old driver,
2 n - 1 for the new one: each layer runs with float weights for its Hessians, then quantized for
the next layer's inputs, the last layer only the first time), and whether both gave identical
quantized weights (they should: the layers see the same inputs).

--solve: ``gptq`` runs the real per-matrix GPTQ solve (``gptq_quantize_weight``); ``rtn`` (the
CPU default) replaces it, in both drivers alike, by round-to-nearest with the same signature.
The solve is the same work in both drivers (the same matrices and Hessians) and on a 2-core CPU
it takes about 15 minutes per 7B-shaped layer, which would bury the difference this script
measures: the forward passes and Hessian accumulation that feed it. --time-solve times the real
solve on one 4096 x 4096 matrix once, to add back per layer (7 matrices per layer, 4 of that size).
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import llama_edu.gptq as G  # noqa: E402
from llama_edu import LlamaConfig, LlamaForCausalLM  # noqa: E402
from llama_edu.quantize import IntLinear, group_quantize, set_submodule  # noqa: E402


GPTQ_SOLVE = G.gptq_quantize_weight  # the real per-matrix solve, before --solve rtn replaces it


class _Stop(Exception):
    pass


@torch.no_grad()
def gptq_full_forward_per_layer(model: nn.Module, batches: list[torch.Tensor], bits: int, group_size: int) -> None:
    """The previous driver, for comparison only: for each layer, the whole model's forward runs
    on every batch (its earlier layers already quantized) and is stopped by an exception once the
    layer has run; hooks on the layer's linear layers gather the Hessians."""
    layers = model.get_base_model().layers
    device = next(model.parameters()).device
    for layer in layers:
        linears = {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}
        hessians = {name: torch.zeros(m.in_features, m.in_features, device=device) for name, m in linears.items()}
        counts = dict.fromkeys(linears, 0)

        def record(name):
            def hook(module, args, output):
                x = args[0].detach().reshape(-1, module.in_features).float()
                hessians[name] += 2 * x.T @ x
                counts[name] += x.shape[0]
            return hook

        def stop(module, args, output):
            raise _Stop

        handles = [m.register_forward_hook(record(name)) for name, m in linears.items()]
        handles.append(layer.register_forward_hook(stop))
        try:
            for batch in batches:
                try:
                    model(input_ids=batch.to(device), use_cache=False)
                except _Stop:
                    pass
        finally:
            for h in handles:
                h.remove()
        for name, m in linears.items():
            codes, scales, zeros, _ = G.gptq_quantize_weight(m.weight, hessians[name] / counts[name], bits, group_size)
            set_submodule(layer, name, IntLinear.from_codes(codes, scales, zeros, bits, m.bias).to(device))


def rtn_solve(weight, hessian, bits=4, group_size=128, block_size=128, percdamp=0.01, act_order=False):
    """Round-to-nearest with ``gptq_quantize_weight``'s signature and outputs (the Hessian unused)."""
    codes, scales, zeros = group_quantize(weight, bits, group_size)
    return codes, scales, zeros, torch.zeros(weight.shape[1], device=weight.device)


def build(preset: str, layers: int, device: str, dtype: torch.dtype) -> LlamaForCausalLM:
    cfg = LlamaConfig.from_preset(preset, num_hidden_layers=layers)
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(old)


def run(driver: str, layers: int, batches, args, dtype) -> tuple[float, float, float, dict]:
    """(wall seconds, CPU seconds of this process, layer forwards per batch, quantized state dict)
    of one driver on a fresh model."""
    model = build(args.preset, layers, args.device, dtype)
    runs = []
    for layer in model.get_base_model().layers:  # counts completed forwards of every decoder layer
        layer.register_forward_hook(lambda module, a, out: runs.append(1))
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    t, cpu = time.perf_counter(), time.process_time()
    if driver == "old":
        gptq_full_forward_per_layer(model, batches, args.bits, args.group_size)
    else:
        G.gptq(model, torch.cat(batches), bits=args.bits, group_size=args.group_size, batch_size=args.batch_size)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds, cpu = time.perf_counter() - t, time.process_time() - cpu
    state = {k: v.cpu() for k, v in model.get_base_model().layers.state_dict().items()}
    del model
    gc.collect()
    return seconds, cpu, len(runs) / len(batches), state


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, nargs="+", default=[2, 8])
    p.add_argument("--preset", default="llama2-7b", help="the layer shape (e.g. stories15m for a quick try)")
    p.add_argument("--batches", type=int, default=2, help="calibration batches")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--solve", choices=["gptq", "rtn"], default=None, help="default: gptq on CUDA, rtn on CPU")
    p.add_argument("--time-solve", action="store_true", help="also time the real GPTQ solve on one 4096 x 4096 matrix")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.solve = args.solve or ("gptq" if args.device.startswith("cuda") else "rtn")
    if args.solve == "rtn":
        G.gptq_quantize_weight = rtn_solve  # both drivers look it up in llama_edu.gptq
    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(3, LlamaConfig.from_preset(args.preset).vocab_size, (args.batch_size, args.seq_len), generator=g) for _ in range(args.batches)]
    c = LlamaConfig.from_preset(args.preset)
    print(f"{args.preset} layers (hidden {c.hidden_size}, intermediate {c.intermediate_size}, {c.num_attention_heads} heads), "
          f"random weights, {args.dtype} on {args.device}, "
          f"{args.threads} threads; calibration {args.batches} batches x {args.batch_size} x {args.seq_len} tokens; "
          f"per-matrix solve: {args.solve}", flush=True)
    rows = []
    for n in args.layers:
        t_old, c_old, f_old, s_old = run("old", n, batches, args, dtype)
        t_new, c_new, f_new, s_new = run("new", n, batches, args, dtype)
        same = s_old.keys() == s_new.keys() and all(torch.equal(s_old[k], s_new[k]) for k in s_old)
        del s_old, s_new
        rows.append((n, t_old, t_new, c_old, c_new, f_old, f_new, same))
        print(f"  {n:3d} layers: old {t_old:7.1f} s wall {c_old:7.1f} s CPU ({f_old:.0f} layer forwards per batch)  "
              f"new {t_new:7.1f} s wall {c_new:7.1f} s CPU ({f_new:.0f} per batch)  old/new wall {t_old / t_new:5.2f}x "
              f"CPU {c_old / c_new:5.2f}x  identical weights: {same}", flush=True)
    if len(rows) > 1:
        (n0, _, _, o0, w0, *_), (n1, _, _, o1, w1, *_) = rows[0], rows[-1]
        print(f"  CPU seconds per added layer ({n0} -> {n1} layers): old +{(o1 - o0) / (n1 - n0):.1f} s, "
              f"new +{(w1 - w0) / (n1 - n0):.1f} s")
    if args.time_solve:
        w = torch.randn(4096, 4096, device=args.device) * 0.02
        x = torch.randn(args.batches * args.batch_size * args.seq_len, 4096, device=args.device)
        H = 2 * x.T @ x / len(x)
        t = time.perf_counter()
        GPTQ_SOLVE(w, H, args.bits, args.group_size)
        print(f"  the real GPTQ solve of one 4096 x 4096 matrix: {time.perf_counter() - t:.1f} s (the same in both "
              "drivers; a 7B layer has 4 such matrices and 3 of 4096 x 11008 or 11008 x 4096)", flush=True)
    print()
    print("| layers | old: wall s | CPU s | new: wall s | CPU s | old/new (CPU) | layer forwards per batch: old | new | identical |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for n, t_old, t_new, c_old, c_new, f_old, f_new, same in rows:
        print(f"| {n} | {t_old:.1f} | {c_old:.1f} | {t_new:.1f} | {c_new:.1f} | {c_old / c_new:.2f}x | {f_old:.0f} | {f_new:.0f} | {same} |")


if __name__ == "__main__":
    main()
