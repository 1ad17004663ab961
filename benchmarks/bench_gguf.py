"""Decode speed: our model (PyTorch) against llama.cpp running our GGUF export, same weights, same run.

    python benchmarks/bench_gguf.py                         # the Shakespeare model, 1 thread
    python benchmarks/bench_gguf.py --threads 2 --new-tokens 128 --repeats 7

Greedy decoding of --new-tokens tokens after a short prompt, batch 1, float32 for ours; llama.cpp
(llama-cpp-python, the test extra) on the f32, f16 and q8_0 exports with its default float16 KV
cache (the timed runs), through its Python binding (``Llama.eval`` one token at a time, argmax of the last logits:
the same loop ours runs; ``logits_all=True`` because the binding keeps logits only then, which
for one token at a time costs nothing extra). Each number is the median of --repeats runs after a warm-up, the
contestants interleaved so that other load on the machine hits all alike. Ratios > 1 mean
llama.cpp is faster. Before timing, each export's greedy tokens are compared with ours, with a
float32 and with the default float16 KV cache.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llama_edu import LlamaForCausalLM, LlamaTokenizer  # noqa: E402
from llama_edu.files import DEFAULT_MODEL_DIR  # noqa: E402
from llama_edu.io import gguf as G  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(DEFAULT_MODEL_DIR), help="HF-layout model folder with tokenizer.model")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    import llama_cpp

    torch.set_num_threads(args.threads)
    model = LlamaForCausalLM.from_pretrained(args.model).eval()
    prompt = LlamaTokenizer.from_pretrained(args.model)("ROMEO:")["input_ids"]
    n = args.new_tokens
    n_ctx = len(prompt) + n + 8
    if n_ctx > model.config.max_position_embeddings:
        raise SystemExit(f"--new-tokens {n} goes past the model's context ({model.config.max_position_embeddings})")

    def ours(k: int) -> list[int]:
        out = model.generate(torch.tensor([prompt]), max_new_tokens=k, min_new_tokens=k, do_sample=False, pad_token_id=0)
        return out[0, len(prompt):].tolist()

    def cpp_runner(llm):
        def cpp(k: int) -> list[int]:
            llm.reset()
            llm.eval(prompt)
            out = []
            for _ in range(k):
                out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
                llm.eval([out[-1]])
            return out
        return cpp

    def first_difference(a: list[int], b: list[int]) -> str:
        i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        return "identical" if i is None else f"first differ at new token {i}"

    reference = ours(n)
    runners = {"ours (PyTorch f32)": ours}
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in G.DTYPES:
            path = G.export_gguf(args.model, Path(tmp) / f"m-{dtype}.gguf", dtype=dtype, log=None)
            load = dict(model_path=str(path), n_ctx=n_ctx, n_threads=args.threads, verbose=False, logits_all=True)
            runners[f"llama.cpp {dtype}"] = cpp_runner(llama_cpp.Llama(**load))
            f32_cache = cpp_runner(llama_cpp.Llama(**load, type_k=0, type_v=0))  # GGML_TYPE_F32
            print(f"llama.cpp {dtype:5} greedy tokens vs ours: {first_difference(f32_cache(n), reference)} with a float32 "
                  f"KV cache, {first_difference(runners[f'llama.cpp {dtype}'](n), reference)} with its default float16 one")
        times: dict[str, list[float]] = {name: [] for name in runners}
        for _ in range(args.repeats):
            for name, fn in runners.items():
                t0 = time.perf_counter()
                fn(n)
                times[name].append(time.perf_counter() - t0)
    base = n / statistics.median(times["ours (PyTorch f32)"])
    print(f"\n{n} new tokens, batch 1, {args.threads} thread(s), median of {args.repeats}")
    for name, ts in times.items():
        speed = n / statistics.median(ts)
        print(f"{name:20} {speed:8.0f} tokens/s   x{speed / base:.2f} of ours")


if __name__ == "__main__":
    main()
