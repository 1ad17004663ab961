"""Where the course lives: one home (``[project.urls] Homepage`` in pyproject.toml) that every
notebook's "Open in Colab" badge and Colab install cell point at, and one command that moves them
all to a fork.

    python -m llama_edu set-home https://github.com/YOU/llama_edu [--branch main]

rewrites pyproject.toml's Homepage, each notebook's badge
(``colab.research.google.com/github/OWNER/REPO/blob/BRANCH/notebooks/NN_x.ipynb``) and ``git clone``
line, and the README's links, each file atomically.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..io.files import atomic_write_bytes

REPO_ROOT = Path(__file__).resolve().parents[2]
_HOME = re.compile(r'^(Homepage\s*=\s*")([^"]+)(")', re.M)
_GITHUB = re.compile(r"^https://github\.com/([A-Za-z0-9_.-]+)/([A-Za-z0-9_.-]+?)(?:\.git)?/?$")
_BADGE = re.compile(r"https://colab\.research\.google\.com/github/[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+/blob/[A-Za-z0-9_./-]+?/notebooks/")


def read_home(root: str | Path = REPO_ROOT) -> str:
    """The course's home, ``https://github.com/OWNER/REPO``, from pyproject.toml's [project.urls]."""
    text = (Path(root) / "pyproject.toml").read_text(encoding="utf-8")
    m = _HOME.search(text)
    if not m:
        raise ValueError(f"{Path(root) / 'pyproject.toml'} has no [project.urls] Homepage = \"https://github.com/OWNER/REPO\" line")
    return m.group(2)


def _parse(url: str) -> tuple[str, str]:
    m = _GITHUB.match(url.strip())
    if not m:
        raise ValueError(f"{url!r} is not a GitHub repository URL; give https://github.com/OWNER/REPO")
    return m.group(1), m.group(2)


def rewrite_text(text: str, home: str, old_home: str, branch: str = "main") -> str:
    """``text`` with every Colab badge of a course notebook, and every link to ``old_home``, pointed
    at ``home`` (links to other projects stay)."""
    owner, repo = _parse(home)
    text = _BADGE.sub(f"https://colab.research.google.com/github/{owner}/{repo}/blob/{branch}/notebooks/", text)
    old = re.escape(old_home.rstrip("/"))
    return re.sub(old + r"(?![\w.-])", f"https://github.com/{owner}/{repo}", text)


def set_home(home: str, root: str | Path = REPO_ROOT, branch: str = "main") -> list[Path]:
    """Point pyproject.toml, every notebook and the README at ``home``; returns the files changed."""
    owner, repo = _parse(home)
    home = f"https://github.com/{owner}/{repo}"
    root = Path(root)
    changed = []
    pyproject = root / "pyproject.toml"
    old_home = read_home(root)  # fails clearly when the line is missing
    text = pyproject.read_text(encoding="utf-8")
    new = _HOME.sub(lambda m: m.group(1) + home + m.group(3), text)
    if new != text:
        atomic_write_bytes(pyproject, new.encode())
        changed.append(pyproject)
    for path in sorted((root / "notebooks").glob("*.ipynb")) + [root / "README.md"]:
        if not path.is_file():
            continue
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".ipynb":
            nb = json.loads(text)
            for cell in nb["cells"]:
                src = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
                new_src = rewrite_text(src, home, old_home, branch)
                if new_src != src:
                    lines = new_src.split("\n")
                    cell["source"] = [line + "\n" for line in lines[:-1]] + ([lines[-1]] if lines[-1] else [])
            new = json.dumps(nb, indent=1, ensure_ascii=False) + "\n"
        else:
            new = rewrite_text(text, home, old_home, branch)
        if new != text:
            atomic_write_bytes(path, new.encode())
            changed.append(path)
    return changed
