"""Encode throughput of the tokenizers on tiny Shakespeare, in one run on one machine.

    python benchmarks/bench_tokenizer.py [--lines 5000] [--repeat 3] [--model PATH]

Measures lines per second for: our LlamaTokenizer (sentencepiece), our LlamaTokenizerFast
(tokenizers), our from-scratch BPE encoder (plain Python), raw sentencepiece, and transformers'
LlamaTokenizer / LlamaTokenizerFast, on Meta's Llama 2 vocabulary. Two ways of calling:
one ``encode`` call per line, and one batched call for all lines. Prints a table with each
speed as a ratio to raw sentencepiece and to the transformers class of the same kind.
Best of ``--repeat`` runs; every tokenizer's ids are checked to agree before timing.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llama_edu.bpe import SentencePieceBPE  # noqa: E402
from llama_edu.files import find_data_file  # noqa: E402
from llama_edu.tokenizer import LlamaTokenizer, LlamaTokenizerFast  # noqa: E402


def best_time(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--model", default=None, help="tokenizer.model (default: Meta's Llama 2)")
    args = parser.parse_args(argv)

    import sentencepiece as spm

    model = args.model or str(find_data_file("llama2-tokenizer.model"))
    text = find_data_file("tinyshakespeare.txt").read_text(encoding="utf-8")
    lines = [line for line in text.split("\n") if line][: args.lines]
    n_chars = sum(map(len, lines))

    sp = spm.SentencePieceProcessor(model_file=model)
    slow = LlamaTokenizer(model, legacy=True)
    fast = LlamaTokenizerFast(model, legacy=True)
    bpe = SentencePieceBPE.from_file(model)
    candidates = {
        "sentencepiece (raw)": (lambda s: [1] + sp.encode(s), lambda ls: [[1] + x for x in sp.encode(ls)]),
        "ours LlamaTokenizer": (slow.encode, lambda ls: slow(ls)["input_ids"]),
        "ours LlamaTokenizerFast": (fast.encode, lambda ls: fast(ls)["input_ids"]),
        "ours bpe.py (pure Python)": (lambda s: [1] + bpe.encode(s), None),
    }
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        hf_slow = transformers.LlamaTokenizer(model, legacy=True)
        candidates["transformers LlamaTokenizer"] = (hf_slow.encode, lambda ls: hf_slow(ls)["input_ids"])
        try:
            hf_fast = transformers.LlamaTokenizerFast(vocab_file=model, legacy=True)
            candidates["transformers LlamaTokenizerFast"] = (hf_fast.encode, lambda ls: hf_fast(ls)["input_ids"])
        except Exception as e:  # the converter needs protobuf
            print(f"(transformers LlamaTokenizerFast unavailable: {type(e).__name__}: {e})")
    except ImportError:
        print("(transformers not installed: its rows are skipped)")

    reference = [[1] + x for x in sp.encode(lines)]
    for name, (one, batch) in candidates.items():
        if [one(s) for s in lines] != reference or (batch is not None and batch(lines) != reference):
            raise SystemExit(f"{name} gives different ids from sentencepiece: not benchmarking it")

    results = {}
    for name, (one, batch) in candidates.items():
        t_one = best_time(lambda: [one(s) for s in lines], args.repeat)
        t_batch = best_time(lambda: batch(lines), args.repeat) if batch is not None else None
        results[name] = (len(lines) / t_one, len(lines) / t_batch if t_batch else None)

    base = results["sentencepiece (raw)"]
    print(f"\nEncode throughput, {len(lines)} lines of tiny Shakespeare ({n_chars} characters), "
          f"vocabulary {Path(model).name} ({sp.vocab_size()} pieces), best of {args.repeat}\n")  # fmt: skip
    header = f"{'tokenizer':34s} {'per-line calls':>15s} {'vs sp':>7s} {'vs HF':>7s} {'one batch call':>15s} {'vs sp':>7s} {'vs HF':>7s}"
    print(header)
    print("-" * len(header))
    for name, (one, batch) in results.items():
        hf_name = {"ours LlamaTokenizer": "transformers LlamaTokenizer",
                   "ours LlamaTokenizerFast": "transformers LlamaTokenizerFast"}.get(name)  # fmt: skip
        hf = results.get(hf_name) if hf_name else None
        vs_hf_one = f"{one / hf[0]:6.2f}x" if hf else "      -"
        vs_hf_batch = f"{batch / hf[1]:6.2f}x" if hf and batch and hf[1] else "      -"
        batch_s = f"{batch:11.0f} l/s {batch / base[1]:6.2f}x" if batch else f"{'-':>15s} {'-':>7s}"
        print(f"{name:34s} {one:11.0f} l/s {one / base[0]:6.2f}x {vs_hf_one} {batch_s} {vs_hf_batch}")


if __name__ == "__main__":
    main()
