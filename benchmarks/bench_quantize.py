"""Size, quality and CPU decode speed of every quantization scheme, on two real models.

    python benchmarks/bench_quantize.py                       # both models, the full table
    python benchmarks/bench_quantize.py --models shakespeare --group-size 16
    python benchmarks/bench_quantize.py --quick               # fewer tokens, one speed repeat
    python benchmarks/bench_quantize.py --layer-7b            # only: one Llama-2-7B-shaped projection

Models and data:
  shakespeare  the project's default model (data/shakespeare-llama). Loss on the validation split
               of tiny Shakespeare (its last 10%, as llama_edu.train.TokenDataset splits it), in
               nats/token and nats/char. GPTQ calibrates on 32 windows of 256 tokens of the
               training split.
  stories260K  llama2.c's pretrained model. Its tokenizer is not shipped, so there is no text:
               we sample token streams from the float32 model itself (temperature 1, no top-k;
               seed 0 for the 32 x 256 calibration tokens, seed 1 for the 32 x 256 held-out
               tokens). The fp32 loss is then the model's own entropy on those tokens, and a
               scheme's excess loss measures how far it moved from the fp32 model. No nats/char.

Columns: bytes of all weights (embeddings, norms and the LM head included, a tied matrix
once), bytes of the quantized linear layers alone, held-out loss, and decode tokens/s (batch 1,
greedy, --new-tokens after an 8-token prompt, the median of --repeats interleaved runs, one thread,
per second of CPU time: the development machine is shared, and wall time there measures the
neighbours; with one thread, CPU time is what a quiet machine would take).
The quantized layers dequantize their weights in PyTorch on every forward: this measures the
formats, not a fused low-bit kernel, so on a CPU they decode *slower* than fp32. The one
exception: int8 with bfloat16 inputs on a CPU, where Int8Linear calls PyTorch's fused
``_weight_int8pack_mm``. ``--layer-7b`` times that against the rest on one Llama 2 7B gate_proj
(11008 x 4096) at batch 1: the bandwidth argument, measured.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llama_edu import LlamaForCausalLM  # noqa: E402
from llama_edu.files import DEFAULT_MODEL_DIR, PROJECT_DATA_DIR, find_data_file  # noqa: E402
from llama_edu.gptq import gptq  # noqa: E402
from llama_edu.quantize import QuantizedLinear, quantize, weight_bytes  # noqa: E402
from llama_edu.train import TokenDataset, evaluate  # noqa: E402


def linear_bytes(model) -> int:
    """Bytes of the decoder's linear layers (quantized or not)."""
    total = 0
    for name, m in model.named_modules():
        if isinstance(m, QuantizedLinear) or (isinstance(m, torch.nn.Linear) and ".layers." in name):
            total += sum(t.numel() * t.element_size() for t in m.state_dict().values())
    return total


def load_data(name: str, quick: bool):
    """(model_dir, calibration ids (n, 256), held-out stream, char_lengths or None)."""
    if name == "shakespeare":
        ds = TokenDataset(find_data_file("tinyshakespeare.txt"), PROJECT_DATA_DIR / "tokenizer.model")
        starts = torch.randint(len(ds.train) - 256, (32,), generator=torch.Generator().manual_seed(0))
        calib = torch.stack([ds.train[s : s + 256] for s in starts.tolist()])
        val = ds.val[: 8 * 1024 + 1] if quick else ds.val
        return DEFAULT_MODEL_DIR, calib, val, ds.char_lengths
    model_dir = find_data_file("stories260K/hf")
    model = LlamaForCausalLM.from_pretrained(model_dir)
    bos = torch.ones(32, 1, dtype=torch.long)

    def sample(seed):
        return model.generate(bos, max_new_tokens=255, do_sample=True, top_k=0, seed=seed, eos_token_id=[])

    calib = sample(0)
    val = sample(1).reshape(-1)
    return model_dir, calib, val[: 8 * 256 + 1] if quick else val, None


def build(model_dir, scheme: str, calib, group_size: int) -> LlamaForCausalLM:
    model = LlamaForCausalLM.from_pretrained(model_dir)
    if scheme == "bf16":
        return model.to(torch.bfloat16)
    if scheme == "int8":
        return quantize(model, "int8")
    if scheme == "nf4":
        return quantize(model, "nf4")
    if scheme.startswith("int"):  # int4, int3: round-to-nearest
        return quantize(model, "int4", group_size, bits=int(scheme[3]))
    if scheme.startswith("gptq"):
        return gptq(model, calib, bits=int(scheme[-1]), group_size=group_size)
    return model


@torch.no_grad()
def decode_seconds(model, new_tokens: int) -> float:
    prompt = torch.tensor([[1, 50, 60, 70, 80, 90, 100, 110]])
    t = time.process_time()  # CPU time of this process: one thread, so other load on the machine does not count
    model.generate(prompt, max_new_tokens=new_tokens, do_sample=False, eos_token_id=[])
    return time.process_time() - t


def decode_speeds(models: dict, new_tokens: int, repeats: int) -> dict[str, float]:
    """tokens/s per model: the median of ``repeats`` rounds, every model once per round
    (interleaved, so that other load on the machine hits all schemes alike)."""
    for m in models.values():
        m.generate(torch.tensor([[1, 50]]), max_new_tokens=4, eos_token_id=[])  # warm-up
    times: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(repeats):
        for k, m in models.items():
            times[k].append(decode_seconds(m, new_tokens))
    return {k: new_tokens / statistics.median(v) for k, v in times.items()}


def layer_7b(repeats: int) -> None:
    """CPU milliseconds per batch-1 product with one 7B-shaped projection, per format."""
    from llama_edu.quantize import Int8Linear, IntLinear, NF4Linear

    torch.manual_seed(0)
    lin = torch.nn.Linear(4096, 11008, bias=False)
    with torch.no_grad():
        lin.weight.normal_(0, 0.02)
    x = torch.randn(1, 4096)
    bf16 = torch.nn.Linear(4096, 11008, bias=False, dtype=torch.bfloat16)
    bf16.weight.data = lin.weight.data.bfloat16()
    cases = [("fp32 nn.Linear", lin, x), ("bf16 nn.Linear", bf16, x.bfloat16()),
             ("int8, bf16 input (fused _weight_int8pack_mm)", Int8Linear.from_linear(lin), x.bfloat16()),
             ("int8, fp32 input (dequantize, then multiply)", Int8Linear.from_linear(lin), x),
             ("int4 g128 (dequantize, then multiply)", IntLinear.from_linear(lin, 4, 128), x),
             ("NF4 (dequantize, then multiply)", NF4Linear.from_linear(lin), x)]
    print("\n### one Llama 2 7B gate_proj (11008 x 4096), batch 1, CPU ms per product (1 thread)\n")
    print("| format | weight bytes | ms | x bf16 speed |")
    print("|---|---:|---:|---:|")
    times = {}
    with torch.no_grad():
        for name, layer, inp in cases:
            layer(inp)
            t = time.process_time()
            for _ in range(repeats):
                layer(inp)
            times[name] = (time.process_time() - t) / repeats * 1e3
    for name, layer, _ in cases:
        size = sum(t.numel() * t.element_size() for t in layer.state_dict().values())
        print(f"| {name} | {size / 1e6:.1f} MB | {times[name]:.2f} | {times['bf16 nn.Linear'] / times[name]:.2f}x |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["shakespeare", "stories260K"], choices=["shakespeare", "stories260K"])
    p.add_argument("--schemes", nargs="+", default=["fp32", "bf16", "int8", "int4", "nf4", "gptq4", "int3", "gptq3"])
    p.add_argument("--group-size", type=int, default=-1, help="int4/int3/gptq: input columns per scale (-1: one per row)")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--layer-7b", action="store_true", help="only time one 7B-shaped projection per format")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.layer_7b:
        layer_7b(10 if args.quick else 30)
        return
    if args.quick:
        args.repeats, args.new_tokens = 1, 32

    names = {"fp32": "fp32", "bf16": "bf16", "int8": "int8 (absmax/row)", "int4": "int4 RTN", "int3": "int3 RTN",
             "nf4": "NF4 (+double quant)", "gptq4": "GPTQ-4", "gptq3": "GPTQ-3"}
    for model_name in args.models:
        model_dir, calib, val, char_lengths = load_data(model_name, args.quick)
        print(f"\n### {model_name}: held-out {len(val) - 1} tokens, group size {args.group_size} for int4/int3/GPTQ, "
              f"{args.threads} thread(s)\n")
        print("| scheme | all weights | linear layers | loss nats/token | nats/char | decode tok/s |")
        print("|---|---:|---:|---:|---:|---:|")
        models, results = {}, {}
        for scheme in args.schemes:
            models[scheme] = build(model_dir, scheme, calib, args.group_size)
            ones = torch.ones(models[scheme].config.vocab_size, dtype=torch.long)
            results[scheme] = evaluate(models[scheme], val, char_lengths if char_lengths is not None else ones, block_size=256, batch_size=16)
        speeds = decode_speeds(models, args.new_tokens, args.repeats)
        base = weight_bytes(models[args.schemes[0]]), speeds[args.schemes[0]]
        for scheme, model in models.items():
            res, size, speed = results[scheme], weight_bytes(model), speeds[scheme]
            npc = f"{res['nats_per_char']:.4f}" if char_lengths is not None else "–"
            print(f"| {names.get(scheme, scheme)} | {size / 1e6:.2f} MB ({size / base[0]:.2f}x) | {linear_bytes(model) / 1e6:.3f} MB "
                  f"| {res['loss']:.4f} | {npc} | {speed:.0f} ({speed / base[1]:.2f}x) |", flush=True)

if __name__ == "__main__":
    main()
