"""Student copies of the course notebooks: the same notebooks with the solutions taken out.

A solution cell is a code cell tagged ``solution`` (the notebooks also collapse it in JupyterLab,
``"jupyter": {"source_hidden": true}``, and hide it in Colab, ``"cellView": "form"``). In the
student copy its code is replaced by stubs of the functions it defined, each raising
``NotImplementedError``, and its outputs are cleared; every other cell, outputs included, is kept
as it is, so a teacher can hand out the executed notebooks.

    python -m llama_edu student-notebooks OUT_DIR [--notebooks DIR] [--overwrite]
"""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path
from typing import Any

from ..io.atomic_save import check_output_folder
from ..io.files import REPO_ROOT, atomic_write_bytes

SOLUTION_TAG = "solution"
NOTEBOOKS_DIR = REPO_ROOT / "notebooks"


def is_solution_cell(cell: dict[str, Any]) -> bool:
    """True for a code cell tagged ``solution``."""
    return cell.get("cell_type") == "code" and SOLUTION_TAG in cell.get("metadata", {}).get("tags", [])


def _defined_functions(source: str) -> list[str]:
    """Names of the functions a cell defines at top level (none when it does not parse)."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    return [node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]


def stub_source(source: str) -> str:
    """What replaces a solution: a note, and for every function it defined a stub that raises
    ``NotImplementedError`` (so a later cell that uses it fails with a clear message)."""
    lines = ["# Solution removed from this copy (python -m llama_edu student-notebooks): ask your teacher."]
    for name in _defined_functions(source):
        lines += ["", "", f"def {name}(*args, **kwargs):",
                  '    raise NotImplementedError("the solution was removed from this copy of the notebook")']
    return "\n".join(lines) + "\n"


def strip_solutions(notebook: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """Return a copy of a notebook (the parsed ``.ipynb`` JSON) with every solution cell replaced by
    its stubs and its outputs cleared, and the number of cells changed."""
    out = json.loads(json.dumps(notebook))  # a deep copy
    changed = 0
    for cell in out.get("cells", []):
        if is_solution_cell(cell):
            source = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
            cell["source"] = stub_source(source)
            cell["outputs"] = []
            cell["execution_count"] = None
            changed += 1
    return out, changed


def read_notebook(path: Path) -> dict[str, Any]:
    """The parsed ``.ipynb`` at ``path``, or a ValueError naming it: not UTF-8, not JSON, or JSON
    that is not a notebook (an object with a list of cells, each with a ``cell_type``)."""
    try:
        notebook = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not a notebook: it is not UTF-8 text ({e.reason} at byte {e.start}); "
                         "remove it from the folder or pass --notebooks DIR") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not a valid notebook (JSON error: {e}); remove it from the folder or pass --notebooks DIR") from None
    cells = notebook.get("cells") if isinstance(notebook, dict) else None
    if not isinstance(cells, list) or not all(isinstance(c, dict) and "cell_type" in c for c in cells):
        raise ValueError(f"{path} is JSON but not a Jupyter notebook (no list of cells with a cell_type); "
                         "remove it from the folder or pass --notebooks DIR")
    return notebook


def write_student_notebooks(out_dir: str | os.PathLike, notebooks_dir: str | os.PathLike = NOTEBOOKS_DIR,
                            overwrite: bool = False) -> list[Path]:
    """Write a student copy of every ``*.ipynb`` in ``notebooks_dir`` into ``out_dir`` (created if
    needed). Returns the paths written.

    Nothing is lost: ``out_dir`` may not be the notebooks folder by any path (a symlink, a bind
    mount: compared with ``os.path.samefile``), nor hold it; an ``out_dir`` that holds files
    already (a teacher's copy with its solutions, an earlier handout) is refused unless
    ``overwrite``. Every notebook is read and checked before the first is written."""
    src, dst = Path(notebooks_dir), Path(out_dir)
    if not src.is_dir():
        raise FileNotFoundError(f"no notebooks folder at {src}; pass --notebooks DIR")
    paths = sorted(src.glob("*.ipynb"))
    if not paths:
        raise FileNotFoundError(f"no .ipynb files in {src}")
    check_output_folder(dst, [src], overwrite=overwrite, what="OUT_DIR")
    students = [(path.name, strip_solutions(read_notebook(path))[0]) for path in paths]
    return [atomic_write_bytes(dst / name, (json.dumps(student, indent=1, ensure_ascii=False) + "\n").encode("utf-8"))
            for name, student in students]

