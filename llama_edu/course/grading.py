"""Grading submitted notebooks: run each in a fresh kernel, then check every exercise it answers on
held-out inputs (other random draws than the notebook showed), and write Gradescope-style JSON.

    python -m llama_edu grade alice/03_rope.ipynb bob/03_rope.ipynb --json results.json --csv results.csv

How it works: the notebook runs top to bottom in a new kernel (nbclient), errors allowed, each cell
limited to ``--cell-timeout`` seconds (a cell that never ends is interrupted and the run goes on).
The exercises a notebook answers are found in its own source: every ``check("name", my_fn)`` outside
a solution cell names an exercise and the learner's function. A last cell, added by the grader, runs
:func:`grade_in_kernel` in that kernel: each exercise is checked with ``held_out(seed)`` inputs,
each call of the learner's function limited to ``--timeout`` seconds (see ``checking.py`` for how),
and the diagnosis becomes the test's output. A crash, an endless loop or a wrong answer costs only
that exercise; a kernel that dies costs the exercises not yet graded, and the output says so.

Output (``--json``): for one notebook, Gradescope's ``results.json`` (``tests``: name, score,
max_score, status, output; ``score``); for several, ``{"submissions": {notebook: that object}}``.
``--csv``: one row per notebook (student = the notebook's folder name, or its file name), one
column per exercise, and the total.
"""

from __future__ import annotations

import ast
import csv
import io
import json
from pathlib import Path
from typing import Any

from ..io.files import atomic_write_bytes
from .exercises import EXERCISES
from .exercises.checking import _check, held_out
from .handout import is_solution_cell

_MARK = "LLAMA_EDU_GRADE:"


def exercises_answered(notebook: dict[str, Any]) -> dict[str, str]:
    """{exercise name: the learner's function name} for every ``check("name", fn)`` call in a code
    cell that is not a solution cell (in order; the last call for a name wins)."""
    found: dict[str, str] = {}
    for cell in notebook.get("cells", []):
        if cell.get("cell_type") != "code" or is_solution_cell(cell):
            continue
        source = "".join(cell.get("source", []))
        source = "\n".join(line for line in source.splitlines() if not line.lstrip().startswith(("%", "!")))
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "check"
                    and len(node.args) >= 2 and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
                    and isinstance(node.args[1], ast.Name) and node.args[0].value in EXERCISES):
                found[node.args[0].value] = node.args[1].id
    return found


def grade_in_kernel(answers: dict[str, str], namespace: dict[str, Any], seed: int = 1, timeout: float = 30.0) -> list[dict[str, Any]]:
    """Run in the learner's kernel: check each exercise's function (looked up in ``namespace`` by
    name) on held-out inputs; return Gradescope test entries."""
    tests = []
    for name, fn_name in answers.items():
        fn = namespace.get(fn_name)
        try:
            with held_out(seed):
                verdict = _check(name, fn, timeout, verbose=False)
            output = verdict.text if fn is not None else f"{name}: no function called {fn_name} was defined when the notebook ran."
            passed = verdict.passed
        except KeyboardInterrupt:
            raise
        except BaseException as e:  # a grader must grade the rest
            output, passed = f"{name}: the checker could not finish ({type(e).__name__}: {e}).", False
        tests.append({"name": f"{name} ({EXERCISES[name].notebook})", "score": 1.0 if passed else 0.0, "max_score": 1.0,
                      "status": "passed" if passed else "failed", "output": output})
    return tests


def _grading_cell(answers: dict[str, str], seed: int, timeout: float) -> str:
    return ("import json as _json\n"
            "from llama_edu.course.grading import grade_in_kernel as _grade\n"
            f"print({_MARK!r} + _json.dumps(_grade({answers!r}, globals(), seed={seed}, timeout={timeout})))\n")


def grade_notebook(path: str | Path, seed: int = 1, timeout: float = 30.0, cell_timeout: int = 300) -> dict[str, Any]:
    """Run the notebook at ``path`` in a fresh kernel and grade it; returns Gradescope's results
    object (``tests``, ``score``, ``max_score``)."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import DeadKernelError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no notebook at {path}: give the path of a submitted .ipynb file")
    try:
        nb = nbformat.read(path, as_version=4)
    except Exception as e:
        raise ValueError(f"{path} is not a readable notebook ({type(e).__name__}: {e}); ask for the .ipynb file itself") from e
    answers = exercises_answered(nb)
    if not answers:
        return {"tests": [], "score": 0.0, "max_score": 0.0, "output": f"{path.name}: no check(\"exercise\", fn) calls found."}
    nb.cells.append(nbformat.v4.new_code_cell(_grading_cell(answers, seed, timeout)))
    client = NotebookClient(nb, timeout=cell_timeout, kernel_name="python3", allow_errors=True, interrupt_on_timeout=True,
                            resources={"metadata": {"path": str(path.parent.resolve())}})
    problem = None
    try:
        client.execute()
    except DeadKernelError as e:
        problem = f"the kernel died while the notebook ran ({e}); the exercises after that point could not be graded"
    except Exception as e:  # noqa: BLE001 - a broken submission is a grade, not a crash of the grader
        problem = f"the notebook could not be run ({type(e).__name__}: {e})"
    tests = None
    for out in nb.cells[-1].get("outputs", []):
        text = out.get("text", "")
        if _MARK in text:
            tests = json.loads(text.split(_MARK, 1)[1].strip().splitlines()[0])
    if tests is None:
        why = problem or "the grading cell did not report (the kernel was busy past the time limit)"
        tests = [{"name": f"{name} ({EXERCISES[name].notebook})", "score": 0.0, "max_score": 1.0, "status": "failed",
                  "output": f"{name}: not graded: {why}."} for name in answers]
    result = {"tests": tests, "score": sum(t["score"] for t in tests), "max_score": float(len(tests))}
    if problem:
        result["output"] = problem
    return result


def _student(path: Path) -> str:
    return path.parent.name if path.parent.name not in ("", ".") else path.stem


def write_results(results: dict[str, dict[str, Any]], json_path: str | Path | None, csv_path: str | Path | None) -> None:
    """Write the Gradescope JSON (one object, or ``submissions`` for several) and the CSV."""
    if json_path:
        obj = next(iter(results.values())) if len(results) == 1 else {"submissions": results}
        atomic_write_bytes(Path(json_path), (json.dumps(obj, indent=2) + "\n").encode())
    if csv_path:
        names = sorted({t["name"] for r in results.values() for t in r["tests"]})
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(["student", "notebook", *names, "score", "max_score"])
        for nb_path, r in results.items():
            scores = {t["name"]: t["score"] for t in r["tests"]}
            writer.writerow([_student(Path(nb_path)), nb_path, *[scores.get(n, "") for n in names], r["score"], r["max_score"]])
        atomic_write_bytes(Path(csv_path), buf.getvalue().encode())
