"""Student copies of the notebooks (python -m llama_edu student-notebooks), and how the notebooks
present their exercises: every registered exercise is checked in its notebook, every solution is
hidden."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llama_edu.cli import main
from llama_edu.exercises import EXERCISES
from llama_edu.handout import NOTEBOOKS_DIR, is_solution_cell, strip_solutions, write_student_notebooks


REPO = Path(__file__).resolve().parents[1]


def _source(cell) -> str:
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def _notebook(*cells):
    return {"cells": list(cells), "metadata": {}, "nbformat": 4, "nbformat_minor": 5}


def _code(source, tags=(), outputs=()):
    return {"cell_type": "code", "metadata": {"tags": list(tags)}, "source": source, "outputs": list(outputs),
            "execution_count": 3}


def test_strip_solutions_replaces_code_by_stubs_and_keeps_other_cells():
    output = {"output_type": "stream", "name": "stdout", "text": ["rotate_half: not attempted yet\n"]}
    stub = _code("def my_rotate_half(x):\n    raise NotImplementedError\n", outputs=[output])
    solution = _code("def rotate_half_solution(x):\n    x1, x2 = x.chunk(2, -1)\n    return x1\n\n\nassert check('rotate_half', rotate_half_solution)\n",
                     tags=["solution"], outputs=[output])
    text = {"cell_type": "markdown", "metadata": {}, "source": "## RoPE"}
    nb = _notebook(text, stub, solution)
    student, changed = strip_solutions(nb)
    assert changed == 1
    assert student["cells"][0] == text and student["cells"][1] == stub  # untouched, outputs kept
    new = student["cells"][2]
    assert "x.chunk" not in _source(new) and new["outputs"] == [] and new["execution_count"] is None
    assert "def rotate_half_solution(*args, **kwargs):" in _source(new)
    namespace = {}
    exec(_source(new), namespace)  # the stub is valid Python and says what happened
    with pytest.raises(NotImplementedError, match="removed"):
        namespace["rotate_half_solution"](1)
    assert nb["cells"][2]["source"].startswith("def rotate_half_solution")  # the original is not modified


def test_student_copies_of_the_course(tmp_path):
    written = write_student_notebooks(tmp_path)
    originals = sorted(NOTEBOOKS_DIR.glob("*.ipynb"))
    assert [p.name for p in written] == [p.name for p in originals]
    for original, copy in zip(originals, written):
        a, b = json.loads(original.read_text()), json.loads(copy.read_text())
        assert len(a["cells"]) == len(b["cells"])
        for ca, cb in zip(a["cells"], b["cells"]):
            if is_solution_cell(ca):
                assert cb["outputs"] == [] and "Solution removed" in _source(cb)
                assert "assert check(" not in _source(cb)
            else:
                assert ca == cb  # source, metadata and outputs kept


def test_notebooks_check_every_exercise_and_hide_every_solution():
    """Each exercise of notebooks 00-09 and 15 is checked in its notebook, and every solution is
    collapsed in JupyterLab and hidden in Colab."""
    for path in sorted(NOTEBOOKS_DIR.glob("*.ipynb")):
        cells = json.loads(path.read_text())["cells"]
        for cell in cells:
            if is_solution_cell(cell):
                assert cell["metadata"].get("jupyter", {}).get("source_hidden") is True, path.name
                assert cell["metadata"].get("cellView") == "form", path.name
        code = "\n".join(_source(c) for c in cells if c["cell_type"] == "code")
        for name, ex in EXERCISES.items():
            if path.stem == ex.notebook:
                assert f'check("{name}", my_' in code, f"{path.name} has no 'Your turn' cell for {name}"
                assert f'assert check("{name}", ' in code, f"{path.name} has no solution for {name}"
    ours = {ex.notebook for ex in EXERCISES.values() if ex.notebook[:2] <= "09"}
    assert ours <= {p.stem for p in NOTEBOOKS_DIR.glob("*.ipynb")}


def test_every_solution_cell_is_tagged():
    """A cell that asserts a check passes is a solution: it must be tagged, or the student copy keeps it."""
    for path in sorted(NOTEBOOKS_DIR.glob("*.ipynb")):
        for cell in json.loads(path.read_text())["cells"]:
            if cell["cell_type"] == "code" and "assert check(" in _source(cell):
                assert is_solution_cell(cell), f"{path.name}: an untagged solution cell: {_source(cell)[:80]!r}"


def test_cli_writes_student_notebooks_and_refuses_bad_folders(tmp_path, capsys):
    assert main(["student-notebooks", str(tmp_path / "out")]) == 0
    assert "student notebooks in" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "out").glob("*.ipynb")) == sorted(p.name for p in NOTEBOOKS_DIR.glob("*.ipynb"))
    assert main(["student-notebooks", str(tmp_path / "x"), "--notebooks", str(tmp_path / "missing")]) == 1
    assert "no notebooks folder" in capsys.readouterr().err
    assert main(["student-notebooks", str(NOTEBOOKS_DIR)]) == 1
    assert "is the input folder" in capsys.readouterr().err


def test_a_student_notebook_runs(tmp_path):
    """The student copy of the course map executes: its checks report 'not attempted yet'."""
    nbclient = pytest.importorskip("nbclient")
    nbformat = pytest.importorskip("nbformat")
    write_student_notebooks(tmp_path)
    nb = nbformat.read(tmp_path / "00_course_map.ipynb", as_version=4)
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    printed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "softmax: not attempted yet" in printed
    assert "softmax: correct" not in printed


# ---------------------------------------------------------------------------------------------
# Nothing lost: a course copy with its solutions, the sources by another path
# ---------------------------------------------------------------------------------------------
def _course(tmp_path) -> Path:
    """A course folder: one notebook with a solution cell."""
    src = tmp_path / "course"
    src.mkdir()
    solution = _code("def answer():\n    return 42\n", tags=["solution"])
    (src / "01_x.ipynb").write_text(json.dumps(_notebook(solution)))
    return src


def test_a_folder_holding_notebooks_is_refused_without_overwrite(tmp_path, capsys):
    src = _course(tmp_path)
    teacher = tmp_path / "teacher"  # a teacher's working copy, solutions and all
    teacher.mkdir()
    mine = (src / "01_x.ipynb").read_bytes()
    (teacher / "01_x.ipynb").write_bytes(mine)
    assert main(["student-notebooks", str(teacher), "--notebooks", str(src)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not empty (it holds 01_x.ipynb)" in err[0] and "--overwrite" in err[0]
    assert (teacher / "01_x.ipynb").read_bytes() == mine  # untouched
    assert main(["student-notebooks", str(teacher), "--notebooks", str(src), "--overwrite"]) == 0
    assert "Solution removed" in (teacher / "01_x.ipynb").read_text()


def test_the_sources_by_another_path_are_refused(tmp_path, capsys, monkeypatch):
    src = _course(tmp_path)
    before = (src / "01_x.ipynb").read_bytes()
    (tmp_path / "link").symlink_to(src)
    monkeypatch.chdir(tmp_path)
    for out in ["link", "link/", "./course", "course/.", str(src), "course/../course"]:
        for extra in ([], ["--overwrite"]):
            assert main(["student-notebooks", out, "--notebooks", "course", *extra]) == 1, out
            assert "is the input folder" in capsys.readouterr().err
    assert main(["student-notebooks", ".", "--notebooks", "course", "--overwrite"]) == 1  # it holds the sources
    assert "holds the input folder" in capsys.readouterr().err
    assert (src / "01_x.ipynb").read_bytes() == before


def test_a_bind_mount_of_the_sources_is_refused(tmp_path):
    """A bind mount is the same folder under another path that no symlink reveals: only
    os.path.samefile (device and inode) sees it. Needs unshare (a private mount namespace)."""
    if not shutil.which("unshare") or subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode:
        pytest.skip("no unprivileged mount namespace here (unshare -rm) to make a bind mount in")
    src = _course(tmp_path)
    before = (src / "01_x.ipynb").read_bytes()
    (tmp_path / "mnt").mkdir()
    script = (f"mount --bind {src} {tmp_path / 'mnt'} && {sys.executable} -m llama_edu student-notebooks "
              f"{tmp_path / 'mnt'} --notebooks {src} --overwrite")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "is the input folder" in proc.stderr and "Traceback" not in proc.stderr
    assert (src / "01_x.ipynb").read_bytes() == before


@pytest.mark.parametrize("content,pattern", [
    (b"[1, 2, 3]", r"is JSON but not a Jupyter notebook"),
    (b'{"cells": "none"}', r"is JSON but not a Jupyter notebook"),
    (b'{"cells": [1]}', r"is JSON but not a Jupyter notebook"),
    (b"\xff\xfe{}", r"is not a notebook: it is not UTF-8"),
    (b"{not json", r"is not a valid notebook \(JSON error"),
], ids=["list", "cells-string", "cell-number", "not-utf8", "not-json"])
def test_a_file_that_is_not_a_notebook_is_one_line_and_nothing_is_written(tmp_path, capsys, content, pattern):
    src = _course(tmp_path)
    (src / "02_bad.ipynb").write_bytes(content)
    assert main(["student-notebooks", str(tmp_path / "out"), "--notebooks", str(src)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(pattern, err[0]) and "02_bad.ipynb" in err[0], err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_filled_in_capstone_runs_end_to_end(tmp_path):
    """Notebook 06's student copy, with the learner's own llama_generate written in (here: the
    solution's body under the learner's name), runs its capstone cells in a fresh kernel: the check
    passes and the learner's model writes the package's tokens."""
    nbclient = pytest.importorskip("nbclient")
    nbformat = pytest.importorskip("nbformat")
    original = json.loads((NOTEBOOKS_DIR / "06_full_model.ipynb").read_text())
    solution = next(_source(c) for c in original["cells"] if "def llama_generate_solution" in _source(c))
    answer = solution.replace("llama_generate_solution", "my_llama_generate").split("\nassert check(")[0]
    answer += '\n\ncheck("llama_generate", my_llama_generate);'
    write_student_notebooks(tmp_path)
    nb = nbformat.read(tmp_path / "06_full_model.ipynb", as_version=4)
    cells = nb.cells
    start = next(i for i, c in enumerate(cells) if c.cell_type == "markdown" and "Your own Llama (capstone)" in c.source)
    needed = [1, 2] + [i for i, c in enumerate(cells) if c.cell_type == "code" and "model = LlamaForCausalLM.from_pretrained" in c.source]
    capstone = [c for c in cells[start:] if c.cell_type == "code"][:4]  # weights, your turn, (stubbed) solution, comparison
    assert "def my_llama_generate" in capstone[1].source and "NotImplementedError" in capstone[1].source
    capstone[1].source = answer
    nb.cells = [cells[i] for i in needed] + capstone
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    printed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "llama_generate: correct on all 3 cases" in printed, printed
    assert "the same tokens as the package's generate: True" in printed, printed
