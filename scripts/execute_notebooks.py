"""Execute notebooks in place and store their outputs, the way the course commits them.

    python scripts/execute_notebooks.py notebooks/14_quantization.ipynb [...]

Each runs in a fresh kernel with the notebooks folder as its working directory (as JupyterLab
does), then is written back with nbformat. The tests then check the stored outputs with nbval.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient


def execute(path: Path, timeout: int = 900) -> None:
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    nbformat.write(nb, path)


if __name__ == "__main__":
    for name in sys.argv[1:]:
        execute(Path(name))
        print(f"executed {name}")
