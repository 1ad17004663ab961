"""Per-rank memory and bytes communicated per training step for DDP, FSDP and tensor parallelism.

Part 1 (computed): the Llama 2 7B and 70B shapes on 8 GPUs, float32 Adam and bf16 mixed
precision. Part 2 (measured): the project's Shakespeare model on 2 CPU processes (gloo): what
each rank really holds after an optimizer step and what the collectives really carried in one
forward + backward, next to the computed numbers, and the step time against one process.

    OMP_NUM_THREADS=1 python benchmarks/bench_distributed.py [--skip-measure]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from llama_edu import LlamaConfig, LlamaForCausalLM
from llama_edu import distributed as D
from llama_edu.config import PRESETS
from llama_edu.files import DEFAULT_MODEL_DIR
from llama_edu.train import make_optimizer

GB = 1e9
ROWS, BLOCK, STEPS = 8, 128, 3


def computed_tables(n: int = 8) -> None:
    for name in ("llama2-7b", "llama2-70b"):
        cfg = LlamaConfig(**PRESETS[name])
        params = D.count_parameters(cfg)
        print(f"\n{name}: {params / 1e9:.2f}B parameters, per GPU on {n} GPUs (GB; activations not counted)")
        print("| strategy | precision | params | grads | optimizer (Adam moments; + fp32 master weights in mixed) | total |")
        print("|---|---|---:|---:|---:|---:|")
        for prec, kw in (("fp32", {}), ("bf16 mixed", dict(param_bytes=2, grad_bytes=2, optim_bytes=12))):
            for strategy, label in (("ddp", "DDP"), ("fsdp", "FSDP"), ("tp", f"TP {n}"), ("fsdp+tp:4", "FSDP 2 x TP 4")):
                if strategy == "tp" and not (cfg.num_attention_heads % n == 0 and cfg.num_key_value_heads % n == 0):
                    continue
                m = D.per_rank_memory(cfg, strategy, n, **kw)
                print(f"| {label} | {prec} | {m['params'] / GB:.1f} | {m['grads'] / GB:.1f} | {m['optim'] / GB:.1f} | {m['total'] / GB:.1f} |")
        tokens = 4096  # one 4096-token sequence per rank and step
        print(f"\n{name}: bytes per rank and step on {n} GPUs (bf16 gradients and weights, GB; TP: {tokens} tokens per rank)")
        print("| strategy | collectives | payload | ring traffic sent per rank |")
        print("|---|---|---:|---:|")
        for strategy, label in (("ddp", "DDP"), ("fsdp", "FSDP"), ("tp", f"TP {n}")):
            b = D.bytes_per_step(cfg, strategy, n, grad_bytes=2, param_bytes=2, tokens=tokens)
            kinds = " + ".join(k for k in ("all_reduce", "all_gather", "reduce_scatter") if k in b)
            print(f"| {label} | {kinds} | {b['payload'] / GB:.1f} | {b['wire'] / GB:.1f} |")


def _measure(rank: int, world: int, strategy: str, out: Path) -> None:
    config = LlamaForCausalLM.from_pretrained(DEFAULT_MODEL_DIR).config
    par = D.init_parallel(strategy, config)
    model = D.parallelize(LlamaForCausalLM.from_pretrained(DEFAULT_MODEL_DIR), par)
    result = _steps(model, par)
    if rank == 0:
        torch.save(result, out / f"{strategy}.pt")


def _steps(model, par) -> dict:
    opt = make_optimizer(model, 1e-3, 0.1)
    g = torch.Generator().manual_seed(0)
    counter = D.CollectiveCounter()
    times = []
    for step in range(STEPS):
        x = D.local_rows(torch.randint(2048, (ROWS, BLOCK + 1), generator=g), par)
        t0 = time.perf_counter()
        with counter if step == 0 else _Nothing():
            logits = model(input_ids=x[:, :-1], use_cache=False).logits
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
        D.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        times.append(time.perf_counter() - t0)
    return {"memory": D.local_memory(model, opt), "bytes": counter.bytes, "seconds": min(times[1:])}


class _Nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def measured_tables() -> None:
    model = LlamaForCausalLM.from_pretrained(DEFAULT_MODEL_DIR)
    cfg = model.config
    torch.set_num_threads(1)
    single = _steps(model, None)
    tmp = Path(tempfile.mkdtemp())
    print(f"\nmeasured: the Shakespeare model ({D.count_parameters(cfg):,} parameters), global batch {ROWS} x {BLOCK} tokens, "
          f"2 gloo processes, 1 thread each")
    print("| strategy | params (held / computed) | grads | Adam states | collectives in fwd+bwd: counted / computed bytes | step time vs 1 process |")
    print("|---|---|---|---|---|---:|")
    for strategy in ("ddp", "fsdp", "tp"):
        D.spawn(_measure, 2, strategy, tmp)
        r = torch.load(tmp / f"{strategy}.pt")
        want = D.per_rank_memory(cfg, strategy, 2)
        comp = D.bytes_per_step(cfg, strategy, 2, tokens=ROWS * BLOCK)  # TP: every rank sees all rows
        mem = " | ".join(f"{r['memory'][k] / 1e6:.3f} / {want[k] / 1e6:.3f} MB" for k in ("params", "grads", "optim"))
        comm = ", ".join(f"{k} {v:,} / {comp[k]:,.0f}" for k, v in sorted(r["bytes"].items()))
        print(f"| {strategy} | {mem} | {comm} | {r['seconds'] / single['seconds']:.2f}x |")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-measure", action="store_true", help="print only the computed tables")
    args = ap.parse_args()
    computed_tables()
    if not args.skip_measure:
        measured_tables()
    sys.exit(0)
