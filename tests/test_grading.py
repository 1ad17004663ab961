"""`python -m llama_edu grade`: a submitted notebook runs in a fresh kernel, every exercise it
answers is checked on held-out inputs, and a crash, an endless loop or a broken cell costs only
that exercise."""

from __future__ import annotations

import csv
import json

import nbformat
import pytest

pytest.importorskip("nbclient")

from llama_edu.cli import main  # noqa: E402
from llama_edu.course.grading import exercises_answered  # noqa: E402


def _notebook(path, cells):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(c) for c in cells]
    solution = nbformat.v4.new_code_cell('assert check("softmax", softmax_solution)')
    solution.metadata["tags"] = ["solution"]
    nb.cells.append(solution)  # a solution cell: not the learner's answer, never graded
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return path


SETUP = "import torch\nfrom llama_edu.exercises import check"
GOOD_SOFTMAX = "def my_softmax(x, dim):\n    e = (x - x.amax(dim, keepdim=True)).exp()\n    return e / e.sum(dim, keepdim=True)"


def test_grade_one_notebook_gradescope_json(tmp_path):
    nb = _notebook(tmp_path / "alice" / "sub.ipynb", [
        SETUP,
        GOOD_SOFTMAX, 'check("softmax", my_softmax)',
        "1 / 0",  # a crashing cell does not stop the grading
        "def my_rotate_half(x):\n    while True:\n        pass",  # an answer that never returns
        "def my_rms_norm(h, w, eps):\n    return w * h / torch.sqrt((h * h).mean(-1, keepdim=True) + eps)",
        "import sys\ndef my_repeat_kv(h, n):\n    sys.exit(1)",
        'for name, fn in [("rms_norm", my_rms_norm), ("repeat_kv", my_repeat_kv)]:\n    pass\n'
        'check("rms_norm", my_rms_norm)\ncheck("repeat_kv", my_repeat_kv)',
        '# check("rotate_half", my_rotate_half) ran for ever here; the grader finds it all the same\n'
        'if False:\n    check("rotate_half", my_rotate_half)',
        'check("swiglu", my_swiglu_never_defined)',
    ])
    assert exercises_answered(nbformat.read(nb, as_version=4)) == {
        "softmax": "my_softmax", "rms_norm": "my_rms_norm", "repeat_kv": "my_repeat_kv",
        "rotate_half": "my_rotate_half", "swiglu": "my_swiglu_never_defined"}
    out = tmp_path / "results.json"
    assert main(["grade", str(nb), "--json", str(out), "--timeout", "1", "--cell-timeout", "60"]) == 0
    result = json.loads(out.read_text())
    tests = {t["name"].split(" ")[0]: t for t in result["tests"]}
    assert set(tests) == {"softmax", "rms_norm", "repeat_kv", "rotate_half", "swiglu"}
    assert result["score"] == 1.0 and result["max_score"] == 5.0
    assert tests["softmax"]["status"] == "passed" and tests["softmax"]["score"] == 1.0
    for t in result["tests"]:
        assert set(t) == {"name", "score", "max_score", "status", "output"}
    assert "no float32 upcast" in tests["rms_norm"]["output"]
    assert "SystemExit" in tests["repeat_kv"]["output"]
    assert "did not return within 1 s" in tests["rotate_half"]["output"]
    assert "no function called my_swiglu_never_defined" in tests["swiglu"]["output"]


def test_several_notebooks_json_and_a_csv_row_each(tmp_path):
    # (one kernel per notebook is slow; the end-to-end run is the test above)
    from llama_edu.course.grading import write_results

    def result(ok):
        t = {"name": "softmax (00_course_map)", "score": float(ok), "max_score": 1.0, "status": "passed" if ok else "failed", "output": ""}
        return {"tests": [t], "score": float(ok), "max_score": 1.0}

    results = {str(tmp_path / "bob" / "sub.ipynb"): result(True), str(tmp_path / "carol" / "sub.ipynb"): result(False)}
    out, table = tmp_path / "r.json", tmp_path / "r.csv"
    write_results(results, out, table)
    assert json.loads(out.read_text())["submissions"] == results
    rows = list(csv.DictReader(table.open()))
    assert [(r["student"], r["softmax (00_course_map)"], r["score"]) for r in rows] == [("bob", "1.0", "1.0"), ("carol", "0.0", "0.0")]
    write_results({str(tmp_path / "bob" / "sub.ipynb"): result(True)}, out, None)
    assert json.loads(out.read_text()) == result(True)  # one notebook: Gradescope's results.json itself


def test_held_out_inputs_differ_from_the_notebooks():
    import torch

    from llama_edu.exercises import EXERCISES, held_out

    shown = EXERCISES["rms_norm"].cases()
    with held_out(1):
        hidden = EXERCISES["rms_norm"].cases()
    assert [label for label, _ in shown] == [label for label, _ in hidden]
    assert not torch.equal(shown[0][1][0], hidden[0][1][0])
    assert torch.equal(EXERCISES["rms_norm"].cases()[0][1][0], shown[0][1][0])  # back to the notebook's after


def test_grade_refuses_bad_input(tmp_path, capsys):
    assert main(["grade", str(tmp_path / "missing.ipynb")]) == 1
    assert "no notebook at" in capsys.readouterr().err
    (tmp_path / "x.ipynb").write_text("not json")
    assert main(["grade", str(tmp_path / "x.ipynb")]) == 1
    assert "not a readable notebook" in capsys.readouterr().err
