"""Train the project's tokenizer: a 2048-piece Llama-2-style SentencePiece BPE model on tiny Shakespeare.

This is the exact command that produced ``data/tokenizer.model``::

    python scripts/train_tokenizer.py                 # writes data/tokenizer.model
    python scripts/train_tokenizer.py --output /tmp/t.model --vocab-size 4096

The trainer settings are Llama 2's (see ``llama_edu.bpe.LLAMA2_TRAINER_SETTINGS``): BPE, byte
fallback, digits split, identity normalisation, a dummy ``▁`` prefix, one thread (deterministic).
The file is written atomically (temporary name, then rename). When the output is named
``tokenizer.model``, ``tokenizer_config.json`` and ``special_tokens_map.json`` are written beside it.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from llama_edu.bpe import train_sentencepiece  # noqa: E402
from llama_edu.files import PROJECT_DATA_DIR, find_data_file  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", default=None, help="training text (default: tiny Shakespeare)")
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--output", default=str(PROJECT_DATA_DIR / "tokenizer.model"))
    args = parser.parse_args(argv)

    text = Path(args.input) if args.input else find_data_file("tinyshakespeare.txt")
    data = train_sentencepiece(text, vocab_size=args.vocab_size, output_file=args.output)
    print(f"wrote {args.output}: {len(data)} bytes, {args.vocab_size} pieces, sha256 {hashlib.sha256(data).hexdigest()}")
    output = Path(args.output)
    if output.name == "tokenizer.model":
        # tokenizer_config.json + special_tokens_map.json beside it, so that LlamaTokenizer.from_pretrained
        # and transformers load the folder. legacy=True: Meta's behaviour, and no warning.
        from llama_edu.tokenizer import LlamaTokenizer

        for f in LlamaTokenizer(output, legacy=True).save_pretrained(output.parent)[:2]:
            print(f"wrote {f}")


if __name__ == "__main__":
    main()
