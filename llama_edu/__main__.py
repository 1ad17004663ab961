"""The command line: ``python -m llama_edu <command> ...``.

Commands (each defined next to the code it drives):
  generate         stream a continuation of a prompt     (llama_edu.generation)
  chat             multi-turn chat with a chat model      (llama_edu.generation)
  convert-meta     Meta consolidated.*.pth -> HF layout   (llama_edu.convert)
  convert-llama2c  llama2.c model.bin -> HF layout        (llama_edu.convert)
  train            train a small Llama on a text file     (llama_edu.train)
  quantize         int8 / int4 / nf4 / gptq weights       (llama_edu.gptq)
"""

from __future__ import annotations

import argparse
import importlib
import sys

# module -> the commands it registers through its ``add_cli_commands(subparsers)``
COMMAND_MODULES = ("generation", "convert", "train", "gptq")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m llama_edu", description="Llama 2, built from scratch.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        module = importlib.import_module(f"llama_edu.{name}")
        module.add_cli_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, OSError) as e:  # user errors: one clear line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
