"""The command line: ``python -m llama_edu <command> ...``.

One package holds every command's arguments, grouped by concern:

  run.py      generate, chat            stream text, multi-turn chat on the terminal
  convert.py  convert-meta, convert-llama2c
  train.py    train, sft, dpo           the one training loop, three objectives
  quant.py    quantize                  int8 / int4 / nf4 / gptq weights
  course.py   student-notebooks         the notebooks without their solutions

Each command imports torch and its modules only when it runs, so ``python -m llama_edu --help``
starts at once. A user's mistake (a missing file, a bad value) is one line on stderr naming the
input and the fix, exit status 1; a bug in llama_edu says so (exit status 70; ``--debug`` shows
the traceback); Ctrl-C is exit status 130.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import pickle
import sys
import traceback

from . import convert, course, quant, run, train


DEBUG_ENV = "LLAMA_EDU_DEBUG"
ISSUES_URL = "the llama_edu issue tracker"
#: What to do about an OSError, by errno.
_OS_FIXES = {
    errno.ENOENT: "check the path",
    errno.EACCES: "check its permissions or choose another path",
    errno.EPERM: "check its permissions or choose another path",
    errno.EROFS: "the file system is read-only: choose another path",
    errno.ENOSPC: "the disk is full: free some space or choose another path",
    errno.EFBIG: "the file is bigger than this file system or the size limit (ulimit -f) allows: raise the limit or choose another path",
    errno.EISDIR: "a file was expected there, not a folder",
    errno.ENOTDIR: "a folder was expected there, not a file",
    errno.EEXIST: "it exists already: choose another path or remove it",
}


def _user_error_classes() -> tuple[type[BaseException], ...]:
    """Exceptions that bad input (a path, a file's content, an option, too little memory)
    causes, as opposed to a bug in llama_edu."""
    classes: list[type[BaseException]] = [ValueError, OSError, MemoryError, pickle.UnpicklingError]
    safetensors, torch = sys.modules.get("safetensors"), sys.modules.get("torch")  # loaded if they raised
    if safetensors is not None:
        classes.append(safetensors.SafetensorError)
    if torch is not None:
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
    for group in (run, convert, train, quant, course):
        group.add_commands(sub)
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
