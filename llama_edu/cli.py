"""The command line: ``python -m llama_edu <command> ...``.

Commands:
  generate            stream a continuation of a prompt     (below)
  chat                multi-turn chat on the terminal        (below)
  convert-meta        Meta consolidated.*.pth -> HF layout   (llama_edu.convert)
  convert-llama2c     llama2.c model.bin -> HF layout        (llama_edu.convert)
  train               train a small Llama on a text file     (llama_edu.train)
  sft                 instruction-tune on chat examples      (llama_edu.sft)
  dpo                 preference-tune with DPO               (llama_edu.dpo)
  quantize            int8 / int4 / nf4 / gptq weights       (llama_edu.gptq)
  export-gguf         HF layout -> GGUF for llama.cpp        (llama_edu.io.gguf)
  describe-gguf       print a GGUF file's structure          (llama_edu.io.gguf)
  serve               OpenAI-compatible HTTP server          (llama_edu.generation.server)
  student-notebooks   the notebooks without their solutions  (llama_edu.handout)

Each module that drives a command defines its arguments in ``add_cli_commands(subparsers)``;
:func:`build_parser` calls them, in the order listed. A user's mistake (a missing file, a bad
value) is one line on stderr naming the input and the fix, exit status 1; a bug in llama_edu says
so (exit status 70; ``--debug`` shows the traceback); Ctrl-C is exit status 130.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import pickle
import sys
import traceback
import unicodedata
from typing import Any

import torch

from . import convert, dpo, gptq, handout, sft, train
from .chat import chat_loop, load_model_and_tokenizer
from .generation import context_limit, generate
from .generation import server as serving
from .io import gguf
from .streaming import TextStreamer


DEBUG_ENV = "LLAMA_EDU_DEBUG"
ISSUES_URL = "the llama_edu issue tracker"
#: What to do about an OSError, by errno.
_OS_FIXES = {
    errno.ENOENT: "check the path",
    errno.EACCES: "check its permissions or choose another path",
    errno.EPERM: "check its permissions or choose another path",
    errno.EROFS: "the file system is read-only: choose another path",
    errno.ENOSPC: "the disk is full: free some space or choose another path",
    errno.EISDIR: "a file was expected there, not a folder",
    errno.ENOTDIR: "a folder was expected there, not a file",
    errno.EEXIST: "it exists already: choose another path or remove it",
}


def _user_error_classes() -> tuple[type[BaseException], ...]:
    """Exceptions that bad input (a path, a file's content, an option, too little memory)
    causes, as opposed to a bug in llama_edu."""
    classes: list[type[BaseException]] = [ValueError, OSError, MemoryError, pickle.UnpicklingError]
    try:
        from safetensors import SafetensorError

        classes.append(SafetensorError)
    except ImportError:
        pass
    classes.append(getattr(torch, "OutOfMemoryError", MemoryError))  # a CUDA allocation that failed
    return tuple(classes)


def _one_line(e: BaseException) -> str:
    """The error as one line: the message (ours name the input and the fix), and for an
    operating-system error, what to do about it."""
    text = str(e) or type(e).__name__
    if isinstance(e, OSError) and e.errno in _OS_FIXES and e.filename is not None:
        text = f"{e.strerror}: {e.filename} ({_OS_FIXES[e.errno]})"
    elif isinstance(e, (MemoryError,)) or type(e).__name__ == "OutOfMemoryError":
        text = f"out of memory ({text.splitlines()[0] if text else 'MemoryError'}): use a smaller model, a smaller batch, or --dtype bfloat16"
    elif type(e).__name__ == "SafetensorError":
        text = f"a safetensors file is corrupt or truncated ({text}): re-download or re-save it"
    text = " ".join(part.strip() for part in text.splitlines() if part.strip())
    return text if len(text) <= 1000 else text[:997] + "..."


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m llama_edu", description="Llama 2, built from scratch.")
    parser.add_argument("--debug", action="store_true",
                        help=f"show the full traceback of an error (or set {DEBUG_ENV}=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_generation_commands(sub)
    convert.add_cli_commands(sub)
    train.add_cli_commands(sub)
    sft.add_cli_commands(sub)
    dpo.add_cli_commands(sub)
    gptq.add_cli_commands(sub)
    gguf.add_cli_commands(sub)
    serving.add_cli_commands(sub)
    handout.add_cli_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command. Exit status: 0 done, 1 a user error (one line on stderr naming the
    input and the fix), 2 bad command-line syntax, 70 a bug in llama_edu (say so; the traceback
    with --debug or LLAMA_EDU_DEBUG=1), 130 interrupted (Ctrl-C)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = args.debug or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of our output went away (| head): stop quietly
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except _user_error_classes() as e:  # user errors: one clear line, no traceback
        if debug:
            traceback.print_exc()
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - anything else is a bug: say so
        if debug:
            traceback.print_exc()
        print(
            f"internal error in llama_edu, please report it to {ISSUES_URL}: {type(e).__name__}: {_one_line(e)} "
            f"(run with --debug or {DEBUG_ENV}=1 for the traceback)",
            file=sys.stderr,
        )
        return 70


# --------------------------------------------------------------------------------------------
# Printing model text on a terminal
# --------------------------------------------------------------------------------------------


def printable(text: str) -> str:
    """``text`` without control characters other than newline and tab: generated text (byte
    tokens) could otherwise carry terminal escape sequences to the user's terminal."""
    return "".join(c for c in text if c in "\n\t" or unicodedata.category(c) != "Cc")


class TerminalStreamer(TextStreamer):
    """A TextStreamer that prints only :func:`printable` text."""

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        super().on_finalized_text(printable(text), stream_end)


# --------------------------------------------------------------------------------------------
# generate, chat
# --------------------------------------------------------------------------------------------


def _sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """--greedy / --temperature 0 mean greedy; otherwise seeded sampling."""
    if args.greedy or args.temperature == 0:
        return dict(do_sample=False)
    if args.temperature < 0:
        raise ValueError(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.top_k < 0:
        raise ValueError(f"--top-k must be >= 0 (0 = off), got {args.top_k}")
    return dict(do_sample=True, temperature=float(args.temperature), top_k=args.top_k, top_p=args.top_p, seed=args.seed)


def _cmd_generate(args: argparse.Namespace) -> int:
    if args.max_new_tokens <= 0:
        raise ValueError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    model, tokenizer = load_model_and_tokenizer(args.model, args.device, args.dtype)
    ids = tokenizer.encode(args.prompt)
    room = context_limit(model.config) - len(ids)
    if room <= 0:
        raise ValueError(f"the prompt is {len(ids)} tokens, the model's context is {context_limit(model.config)}: shorten it")
    streamer = TerminalStreamer(tokenizer, skip_special_tokens=True)
    try:
        generate(
            model, torch.tensor([ids]), max_new_tokens=min(args.max_new_tokens, room),
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id, streamer=streamer,
            **_sampling_kwargs(args),
        )
    except KeyboardInterrupt:  # Ctrl-C: show what was generated, then stop quietly
        streamer.end()
        return 130
    return 0


def _cmd_chat(args: argparse.Namespace) -> int:
    if args.max_new_tokens <= 0:
        raise ValueError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    model, tokenizer = load_model_and_tokenizer(args.model, args.device, args.dtype)
    try:
        chat_loop(model, tokenizer, system=args.system, max_new_tokens=args.max_new_tokens,
                  output_filter=printable, **_sampling_kwargs(args))
    except KeyboardInterrupt:  # Ctrl-C at the prompt ends the session (Ctrl-C in an answer only stops it)
        print()
        return 130
    return 0


def _add_common(p: argparse.ArgumentParser, temperature: float) -> None:
    p.add_argument("--model", default=None, help="model folder (HF layout) or hub repo id; default: data/shakespeare-llama")
    p.add_argument("--max-new-tokens", "--max_new_tokens", type=int, default=200, help="how many tokens to generate at most (default 200)")
    p.add_argument("--temperature", type=float, default=temperature, help=f"sampling temperature, 0 = greedy (default {temperature})")
    p.add_argument("--top-k", "--top_k", type=int, default=0, help="keep the k most likely tokens, 0 = off (default 0)")
    p.add_argument("--top-p", "--top_p", type=float, default=0.95, help="nucleus sampling mass (default 0.95)")
    p.add_argument("--seed", type=int, default=0, help="random seed, so runs repeat (default 0)")
    p.add_argument("--greedy", action="store_true", help="greedy decoding (same as --temperature 0)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: as stored)")


def add_generation_commands(subparsers: argparse._SubParsersAction) -> None:
    """``generate`` and ``chat``."""
    p = subparsers.add_parser("generate", help="stream a continuation of a prompt",
                              description="Continue a prompt with a Llama model, streaming the text.")
    p.add_argument("--prompt", required=True, help="the text to continue")
    _add_common(p, temperature=0.8)
    p.set_defaults(func=_cmd_generate)

    p = subparsers.add_parser("chat", help="multi-turn chat with a chat model",
                              description="Chat on the terminal (Llama 2 chat template). /reset clears the history; Ctrl-D ends.")
    p.add_argument("--system", default=None, help="a system prompt")
    _add_common(p, temperature=0.8)
    p.set_defaults(func=_cmd_chat)


if __name__ == "__main__":
    sys.exit(main())
