"""Encode throughput of Llama3Tokenizer (plain Python) against tiktoken and Hugging Face tokenizers.

    python benchmarks/bench_llama3_tokenizer.py [--chars 300000] [--repeat 3]

All three encode the same text (the start of tiny Shakespeare) with Meta's Llama 3 vocabulary; their
ids are checked to agree first. Printed: characters per second of each and their ratios, measured in
this run. Our tokenizer is timed twice: with an empty word cache (a fresh tokenizer each run) and
warm (the cache filled by an earlier call), since the cache is what makes plain Python usable.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llama_edu.files import find_data_file  # noqa: E402
from llama_edu.text.llama3 import PAT_STR, SPECIAL_TOKENS, Llama3Tokenizer, pretokenize_regex  # noqa: E402


def best_time(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chars", type=int, default=300_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    text = find_data_file("tinyshakespeare.txt").read_text(encoding="utf-8")[: args.chars]
    model = find_data_file("llama3/tokenizer.model")
    tok = Llama3Tokenizer(model)
    pretokenize_regex()  # built once per process: not part of the timing
    expected = tok.encode_ordinary(text)
    runs: dict[str, float] = {}

    def cold() -> None:
        tok._cache.clear()
        tok.encode_ordinary(text)

    runs["Llama3Tokenizer (empty cache)"] = best_time(cold, args.repeat)
    tok.encode_ordinary(text)
    runs["Llama3Tokenizer (warm cache)"] = best_time(lambda: tok.encode_ordinary(text), args.repeat)
    try:
        import tiktoken

        enc = tiktoken.Encoding("llama3", pat_str=PAT_STR, mergeable_ranks=tok.ranks,
                                special_tokens={t: 128000 + i for i, t in enumerate(SPECIAL_TOKENS)})  # fmt: skip
        assert enc.encode_ordinary(text) == expected, "tiktoken disagrees"
        runs["tiktoken (Rust)"] = best_time(lambda: enc.encode_ordinary(text), args.repeat)
    except ImportError:
        print("tiktoken is not installed: skipped")
    try:
        import tokenizers

        hf = tokenizers.Tokenizer.from_file(str(find_data_file("llama3/tokenizer.json")))
        assert hf.encode(text, add_special_tokens=False).ids == expected, "tokenizers disagrees"
        runs["tokenizers (Rust)"] = best_time(lambda: hf.encode(text, add_special_tokens=False), args.repeat)
    except ImportError:
        print("tokenizers is not installed: skipped")
    base = runs["Llama3Tokenizer (warm cache)"]
    print(f"{len(text):,} characters, {len(expected):,} tokens; best of {args.repeat}")
    print(f"{'tokenizer':32s} {'chars/s':>12s} {'speed vs ours (warm)':>22s}")
    for name, t in runs.items():
        print(f"{name:32s} {len(text) / t:>12,.0f} {base / t:>21.2f}x")


if __name__ == "__main__":
    main()
