"""One home for the course (pyproject.toml's [project.urls] Homepage): every notebook's Colab badge
and install cell point at it, and `set-home` moves them all to a fork."""

from __future__ import annotations

import json
import re
import shutil

from llama_edu.cli import main
from llama_edu.course.home import REPO_ROOT, read_home, rewrite_text

NOTEBOOKS = sorted((REPO_ROOT / "notebooks").glob("*.ipynb"))


def _urls(text):
    return set(re.findall(r"https://(?:colab\.research\.google\.com/github|github\.com)/[\w.-]+/[\w.-]+", text))


def test_every_notebook_points_at_the_home():
    home = read_home()
    owner_repo = home.removeprefix("https://github.com/")
    for path in NOTEBOOKS:
        cells = json.loads(path.read_text())["cells"]
        first, setup = "".join(cells[0]["source"]), "".join(cells[1]["source"])
        assert f"https://colab.research.google.com/github/{owner_repo}/blob/main/notebooks/{path.name}" in first, path.name
        if "git clone" in setup:
            assert f"git clone -q" in setup and home in setup, path.name
            assert "2>/dev/null" not in setup and "|| true" not in setup, f"{path.name}: the install cell hides its errors"


def test_set_home_rewrites_a_fork(tmp_path, capsys):
    root = tmp_path / "checkout"
    (root / "notebooks").mkdir(parents=True)
    shutil.copy(REPO_ROOT / "pyproject.toml", root)
    shutil.copy(REPO_ROOT / "README.md", root)
    for path in NOTEBOOKS[:3]:
        shutil.copy(path, root / "notebooks")
    assert main(["set-home", "https://github.com/someone/my-llama.git", "--branch", "dev", "--root", str(root)]) == 0
    assert "home is now https://github.com/someone/my-llama" in capsys.readouterr().out
    assert read_home(root) == "https://github.com/someone/my-llama"
    for path in (root / "notebooks").glob("*.ipynb"):
        text = path.read_text()
        json.loads(text)  # still a notebook
        assert f"colab.research.google.com/github/someone/my-llama/blob/dev/notebooks/{path.name}" in text
        assert "llama-edu/llama_edu" not in text
    assert main(["set-home", "not a url", "--root", str(root)]) == 1
    assert "not a GitHub repository URL" in capsys.readouterr().err


def test_rewrite_leaves_other_links_alone():
    text = ("see https://github.com/huggingface/transformers, git clone https://github.com/llama-edu/llama_edu /x, "
            "https://github.com/llama-edu/llama_edu_extra and "
            "[badge](https://colab.research.google.com/github/llama-edu/llama_edu/blob/main/notebooks/x.ipynb)")
    out = rewrite_text(text, "https://github.com/me/fork", "https://github.com/llama-edu/llama_edu")
    assert "colab.research.google.com/github/me/fork/blob/main/notebooks/x.ipynb" in out
    assert "git clone https://github.com/me/fork /x" in out
    assert "https://github.com/huggingface/transformers" in out and "https://github.com/llama-edu/llama_edu_extra" in out
