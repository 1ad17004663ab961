"""Time each notebook as a learner runs it: a fresh kernel executes every cell, then reports the
CPU seconds its process used (all threads, user + system, children included) and the wall time.

    PYTHONPATH=$PWD python benchmarks/notebook_times.py notebooks/03_rope.ipynb ...
    PYTHONPATH=$PWD python benchmarks/notebook_times.py --markdown notebooks/*.ipynb

The course promises "each notebook runs in under a minute" of CPU on a 2-core machine; the kernel's
own CPU time is the honest measure (the wall time depends on what else the machine runs)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

_USAGE = ("import resource as _r, json as _j; _s, _c = _r.getrusage(_r.RUSAGE_SELF), _r.getrusage(_r.RUSAGE_CHILDREN); "
          "print(_j.dumps(_s.ru_utime + _s.ru_stime + _c.ru_utime + _c.ru_stime))")


def time_notebook(path: Path, timeout: int = 600) -> tuple[float, float]:
    """(kernel CPU seconds, wall seconds) to run every cell of the notebook at ``path``."""
    nb = nbformat.read(path, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(_USAGE))
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}})
    start = time.perf_counter()
    client.execute()
    wall = time.perf_counter() - start
    out = nb.cells[-1].outputs[0]["text"]
    return float(json.loads(out.strip().splitlines()[-1])), wall


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="+", type=Path)
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = parser.parse_args(argv)
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    if args.markdown:
        print(f"| notebook | CPU s | wall s |  (OMP_NUM_THREADS={threads}, {os.cpu_count()} cores)\n|---|---:|---:|")
    failed = 0
    for path in args.notebooks:
        try:
            cpu, wall = time_notebook(path)
        except Exception as e:  # one broken notebook must not hide the others' times
            print(f"| {path.stem} | error: {type(e).__name__} | |", flush=True)
            failed += 1
            continue
        line = f"| {path.stem} | {cpu:.0f} | {wall:.0f} |" if args.markdown else f"{path.stem:40s} cpu {cpu:6.1f} s  wall {wall:6.1f} s"
        print(line, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
