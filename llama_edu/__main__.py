"""The command line: ``python -m llama_edu <command> ...``.

Commands (each defined next to the code it drives):
  generate         stream a continuation of a prompt     (llama_edu.generation)
  chat             multi-turn chat with a chat model      (llama_edu.generation)
  convert-meta     Meta consolidated.*.pth -> HF layout   (llama_edu.convert)
  convert-llama2c  llama2.c model.bin -> HF layout        (llama_edu.convert)
  train            train a small Llama on a text file     (llama_edu.train)
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import os
import pickle
import sys
import traceback

import torch  # the commands need it anyway

# module -> the commands it registers through its ``add_cli_commands(subparsers)``
COMMAND_MODULES = ("generation", "convert", "train")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m llama_edu", description="Llama 2, built from scratch.")
    parser.add_argument("--debug", action="store_true",
                        help=f"show the full traceback of an error (or set {DEBUG_ENV}=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        module = importlib.import_module(f"llama_edu.{name}")
        module.add_cli_commands(sub)
    return parser


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


if __name__ == "__main__":
    sys.exit(main())
