"""Every machine: the suite as a fresh clone meets it.

1. The notebooks run a second way, on other arithmetic paths: one thread (``OMP_NUM_THREADS=1``:
   other reduction orders) and PyTorch's portable kernels (``ATEN_CPU_CAPABILITY=default``: no
   AVX2/AVX-512). A cell marked ``# NBVAL_CHECK_OUTPUT`` must print the same there, so its
   stored output cannot hold digits that only this CPU produces. nbval runs each notebook in a
   subprocess of its own, as many at a time as the machine has cores (each uses one thread),
   and a failure names the cells.
2. Without the shared data (no ``$LLAMA_EDU_DATA``, no ``../shared/data``, offline), tests and
   notebook cells that need a data file skip, saying which file and where it comes from,
   instead of erroring: a copy of the checkout without ``../shared`` is tested in a subprocess.
3. In parallel (``python -m pytest -n auto``, the README's command) each notebook still runs whole,
   in order, in one kernel.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import uuid
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
CHECK = "# NBVAL_CHECK_OUTPUT"
#: The other arithmetic paths of the second run.
SECOND_WAY = {"OMP_NUM_THREADS": "1", "ATEN_CPU_CAPABILITY": "default"}

pytest.importorskip("nbval")


def checked_notebooks() -> list[Path]:
    """The notebooks with at least one cell whose output nbval compares."""
    def has_check(path: Path) -> bool:
        cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
        return any(c["cell_type"] == "code" and CHECK in "".join(c["source"]) for c in cells)

    return [p for p in sorted(NOTEBOOKS.glob("*.ipynb")) if has_check(p)]


def run_pytest(args: list[str], env: dict[str, str], cwd: Path, timeout: float) -> dict[str, list[tuple[str, str]]]:
    """``python -m pytest ARGS`` in a subprocess; the outcome of every test, from its JUnit XML:
    {"passed"|"failed"|"error"|"skipped": [(test id, message)]}."""
    report = cwd / f".junit-{uuid.uuid4().hex}.xml"  # several may run at once
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-o", "addopts=", "-q", f"--junitxml={report}", *args]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if not report.is_file():
        raise AssertionError(f"pytest wrote no report (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    outcomes: dict[str, list[tuple[str, str]]] = {"passed": [], "failed": [], "error": [], "skipped": []}
    for case in ET.parse(report).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        kind = next((k for k in ("failure", "error", "skipped") if case.find(k) is not None), None)
        node = case.find(kind) if kind else None
        message = "\n".join(filter(None, [node.get("message"), node.text])) if node is not None else ""
        message = re.sub(r"(\x1b|#x1B)\[[0-9;]*m", "", message)
        outcomes[{"failure": "failed", None: "passed"}.get(kind, kind)].append((name, message))
    report.unlink()
    return outcomes


def cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def second_way(notebooks: list[Path], cwd: Path = REPO, timeout: float = 1800) -> dict[str, list[tuple[str, str]]]:
    """nbval on ``notebooks`` the second way, each in a pytest of its own. They run one thread
    each, so as many run at once as there are cores (on 2 cores: 270 s instead of 439 one at a time).
    Every notebook writes only to temporary folders of its own, so they cannot collide."""
    env = {**os.environ, **SECOND_WAY, "PYTHONPATH": str(REPO)}
    with ThreadPoolExecutor(max(1, min(cores(), len(notebooks)))) as pool:
        runs = list(pool.map(lambda nb: run_pytest(["--nbval-lax", str(nb)], env, cwd, timeout), notebooks))
    return {kind: [case for run in runs for case in run[kind]] for kind in ("passed", "failed", "error", "skipped")}


def _failures(outcomes) -> str:
    """Each failing cell, with the lines of nbval's report that say how its output differed."""
    out = []
    for name, message in outcomes["failed"] + outcomes["error"]:
        lines = [line for line in message.splitlines() if line.strip()]
        diff = [line for line in lines if line.lstrip().startswith(("+", "-", "Expected", "Actual", "E "))]
        out.append(f"{name}: " + "\n    ".join((lines[:1] + diff)[:12]))
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# 1. The second way
# ---------------------------------------------------------------------------------------------
def _notebook(path: Path, cells: list[tuple[str, str]]) -> Path:
    """A notebook of code cells (source, stored stdout)."""
    nb = {"cells": [{"cell_type": "code", "execution_count": i + 1, "id": f"c{i}", "metadata": {}, "source": src,
                     "outputs": [{"name": "stdout", "output_type": "stream", "text": out}] if out else []}
                    for i, (src, out) in enumerate(cells)],
          "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"}},
          "nbformat": 4, "nbformat_minor": 5}
    path.write_text(json.dumps(nb), encoding="utf-8")
    return path


def test_the_second_way_runs_other_arithmetic_and_names_the_failing_cells(tmp_path):
    """The mechanism, on a notebook of three checked cells: one prints what holds everywhere, one
    prints which kernels ran (as stored from a default run: it differs on the second way), one
    fails outright. The run reports exactly the last two, by cell."""
    nb = _notebook(tmp_path / "probe.ipynb", [
        (f"{CHECK}\nprint(round(sum(i * 0.1 for i in range(10)), 6))", "4.5\n"),
        (f"{CHECK}\nimport os\nprint(os.environ.get('ATEN_CPU_CAPABILITY'), os.environ.get('OMP_NUM_THREADS'))", "None None\n"),
        (f"{CHECK}\nraise ValueError('broken')", ""),
    ])
    outcomes = second_way([nb], cwd=tmp_path, timeout=300)
    assert [name.rsplit("::", 1)[1] for name, _ in outcomes["passed"]] == ["Cell 0"]
    assert sorted(name.rsplit("::", 1)[1] for name, _ in outcomes["failed"]) == ["Cell 1", "Cell 2"], _failures(outcomes)


def test_checked_notebooks_hold_on_another_arithmetic_path():
    """Every notebook with checked cells, run with OMP_NUM_THREADS=1 ATEN_CPU_CAPABILITY=default
    (a few minutes: each notebook runs once more, as in CI's first pass)."""
    notebooks = checked_notebooks()
    assert notebooks, f"no notebook in {NOTEBOOKS} has a {CHECK} cell"
    outcomes = second_way(notebooks)
    assert not outcomes["failed"] and not outcomes["error"], (
        "cells whose output differs on another arithmetic path (OMP_NUM_THREADS=1 ATEN_CPU_CAPABILITY=default); "
        "print only what holds on every CPU (a comparison with its tolerance, a rounded figure):\n" + _failures(outcomes)
    )
    assert outcomes["passed"]


# ---------------------------------------------------------------------------------------------
# 2. Without the shared data, offline
# ---------------------------------------------------------------------------------------------
PROBE_TESTS = '''
import pytest
from llama_edu.io.files import find_data_file

@pytest.fixture(scope="module")
def corpus():
    return find_data_file("tinyshakespeare.txt").read_text()

def test_in_the_body():
    find_data_file("llama2-tokenizer.model")

def test_in_a_module_fixture(corpus):
    assert corpus

def test_a_zip_original():
    find_data_file("sms_spam_collection.tsv")

def test_other_missing_files_still_fail(tmp_path):
    open(tmp_path / "not-data.txt")

def test_without_data_runs():
    assert find_data_file("tinyshakespeare.txt", path=__file__)
'''


def hidden_checkout(tmp_path: Path, tests: list[str]) -> tuple[Path, dict[str, str]]:
    """A copy of the checkout in ``tmp_path/clone`` with no ``../shared`` beside it, the given test
    files, and an environment without ``LLAMA_EDU_DATA``, with an empty cache and no network
    (the proxies point at a closed port, so a download fails at once)."""
    clone = tmp_path / "clone"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO / "llama_edu", clone / "llama_edu", ignore=ignore)
    for name in ("conftest.py", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, clone / name)
    (clone / "tests").mkdir()
    shutil.copy(REPO / "tests" / "conftest.py", clone / "tests" / "conftest.py")
    for name in tests:
        shutil.copy(REPO / "tests" / name, clone / "tests" / name)
    (clone / "data").symlink_to(REPO / "data")  # the project's own artefacts are in every clone
    env = {k: v for k, v in os.environ.items() if k != "LLAMA_EDU_DATA" and not k.lower().endswith("_proxy")}
    closed = "http://127.0.0.1:9"
    env.update(PYTHONPATH=str(clone), XDG_CACHE_HOME=str(tmp_path / "cache"), HF_HUB_OFFLINE="1",
               http_proxy=closed, https_proxy=closed, HTTP_PROXY=closed, HTTPS_PROXY=closed, no_proxy="")
    return clone, env


def test_without_shared_data_the_suite_skips_instead_of_erroring(tmp_path):
    clone, env = hidden_checkout(tmp_path, ["test_data.py"])
    (clone / "tests" / "test_probe_data.py").write_text(PROBE_TESTS)
    (clone / "notebooks").mkdir()
    _notebook(clone / "notebooks" / "probe.ipynb", [
        ("x = 1\nprint(x)", "1\n"),
        ("from llama_edu.io.files import find_data_file\ntext = find_data_file('tinyshakespeare.txt').read_text()", ""),
        (f"{CHECK}\nprint(len(text) > 0)", "True\n"),  # would fail on the undefined name: skipped too
    ])
    outcomes = run_pytest(["--nbval-lax", "tests", "notebooks/probe.ipynb"], env, clone, timeout=300)
    short = {name.rsplit("::", 1)[1]: message for kind in outcomes.values() for name, message in kind}
    assert [name for name, _ in outcomes["error"]] == []
    assert [name.rsplit("::", 1)[1] for name, _ in outcomes["failed"]] == ["test_other_missing_files_still_fail"]
    skipped = {name.rsplit("::", 1)[1] for name, _ in outcomes["skipped"]}
    assert {"test_in_the_body", "test_in_a_module_fixture", "test_a_zip_original", "test_shared_files_are_found_and_verified",
            "Cell 1", "Cell 2"} <= skipped, outcomes
    assert {"test_without_data_runs", "Cell 0", "test_a_zip_original_is_downloaded_unpacked_and_verified"} <= {
        name.rsplit("::", 1)[1] for name, _ in outcomes["passed"]}
    assert "tinyshakespeare.txt" in short["test_in_a_module_fixture"]
    assert "https://raw.githubusercontent.com/karpathy/char-rnn" in short["test_in_a_module_fixture"]
    assert "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip" in short["test_a_zip_original"]
    assert "tinyshakespeare.txt" in short["Cell 1"] and "https://raw.githubusercontent.com/karpathy/char-rnn" in short["Cell 1"]
    assert "tinyshakespeare.txt" in short["Cell 2"]


# ---------------------------------------------------------------------------------------------
# 3. In parallel
# ---------------------------------------------------------------------------------------------
def test_the_parallel_command_runs_each_notebook_whole_in_one_kernel(tmp_path):
    """The root conftest sends whole files to pytest-xdist's workers. xdist's default would deal
    a notebook's cells out one by one to both workers, and a cell would miss the names that the
    cells before it defined in the other kernel."""
    pytest.importorskip("xdist")
    clone, env = hidden_checkout(tmp_path, [])
    (clone / "notebooks").mkdir()
    cells = [("x = 0", "")] + [(f"{CHECK}\nx += 1\nprint(x)", f"{i}\n") for i in range(1, 9)]
    for name in ("a", "b"):
        _notebook(clone / "notebooks" / f"{name}.ipynb", cells)
    outcomes = run_pytest(["-n", "2", "--nbval-lax", "notebooks"], env, clone, timeout=300)
    assert not outcomes["failed"] and not outcomes["error"], _failures(outcomes)
    assert len(outcomes["passed"]) == 2 * len(cells)
