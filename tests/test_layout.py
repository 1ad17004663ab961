"""The package's shape, as DESIGN.md sets it: the core at the top imports nothing of the shell, the
shell lives in subpackages by concern, no module is too long, and no import cycle exists (imports
inside functions count)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "llama_edu"
CORE = {"config", "rmsnorm", "rope", "attention", "mlp", "model", "cache", "reference"}
SHELL_PACKAGES = {"text", "io", "generation", "training", "quant", "course", "cli"}
# What the core may import besides itself: finding and writing config.json (io.files), and nothing else.
CORE_MAY_IMPORT = {"io.files"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every llama_edu module a file imports, at any depth of the file (functions included),
    as dotted names relative to the package."""
    me = _module_name(path).split(".") if _module_name(path) else []
    package = me if path.name == "__init__.py" else me[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                target = base + (node.module.split(".") if node.module else [])
            elif node.module and node.module.split(".")[0] == "llama_edu":
                target = node.module.split(".")[1:]
            else:
                continue
            for alias in node.names:  # `from . import x` imports the module x
                sub = ".".join(target + [alias.name])
                found.add(sub if _exists(sub) else ".".join(target))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("llama_edu."):
                    found.add(alias.name.split(".", 1)[1])
    return {m for m in found if m and _exists(m)} - {_module_name(path)}


def _exists(dotted: str) -> bool:
    p = PACKAGE.joinpath(*dotted.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in PACKAGE.rglob("*.py") if _module_name(p)}


def test_at_most_16_modules_at_the_top_and_none_over_900_lines():
    top = sorted(p.name for p in PACKAGE.glob("*.py") if p.name not in ("__init__.py", "__main__.py"))
    assert len(top) <= 16, top
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 900}
    assert not long, long


def test_the_shell_lives_in_subpackages_by_concern():
    subpackages = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert subpackages <= SHELL_PACKAGES, subpackages - SHELL_PACKAGES
    assert {p.stem for p in PACKAGE.glob("*.py")} >= CORE


def test_no_import_cycles_function_level_imports_included():
    graph = _graph()

    def reaches(start: str, goal: str) -> list[str] | None:
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for dep in graph.get(node, ()):
                if dep == goal:
                    return path + [dep]
                if dep not in seen:
                    seen.add(dep)
                    stack.append((dep, path + [dep]))
        return None

    cycles = [cycle for a in graph for b in graph[a] if (cycle := reaches(b, a)) and a not in _parents(b)]
    assert not cycles, " -> ".join(cycles[0])


def _parents(dotted: str) -> set[str]:
    """A subpackage's __init__ may import its own modules; that is not a cycle of concern."""
    parts = dotted.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def test_the_core_imports_nothing_of_the_shell():
    graph = _graph()
    for module in CORE:
        shell = {m for m in graph[module] if m not in CORE and m not in CORE_MAY_IMPORT}
        assert not shell, f"{module}.py imports {sorted(shell)}"


def test_old_module_names_still_import_as_the_moved_modules():
    code = (
        "import importlib, llama_edu\n"
        "for old, new in llama_edu.MOVED_MODULES.items():\n"
        "    a = importlib.import_module('llama_edu.' + old); b = importlib.import_module('llama_edu.' + new)\n"
        "    assert a is b and a.__spec__.name == 'llama_edu.' + new, old\n"
        "from llama_edu.exercises import check\n"
        "from llama_edu.generation import generate\n"
        "from llama_edu import LlamaForCausalLM, LlamaTokenizer, chat\n"
        "assert callable(chat)\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PACKAGE.parent)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


@pytest.mark.parametrize("name", ["LlamaForCausalLM", "LlamaTokenizer", "generate", "TextStreamer", "PRESETS"])
def test_public_names_resolve(name):
    import llama_edu

    assert getattr(llama_edu, name) is not None and name in dir(llama_edu)


def test_the_command_line_knows_the_parallel_strategies_without_importing_torch():
    from llama_edu.cli.train import STRATEGIES
    from llama_edu.training.distributed import STRATEGIES as REAL

    assert STRATEGIES == REAL


def test_help_imports_no_torch():
    code = "import sys, llama_edu.cli as c; c.build_parser().format_help(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PACKAGE.parent)
    assert out.stdout.strip() == "False", out.stderr


def test_every_module_path_the_course_and_readme_name_exists():
    """A learner follows `llama_edu/...py` paths from the notebooks' text and the README: after the
    layout move each must still be a file (a moved module keeps its import name, not its path)."""
    import json
    import re

    root = Path(__file__).resolve().parent.parent
    texts = {"README.md": (root / "README.md").read_text()}
    for nb in sorted((root / "notebooks").glob("*.ipynb")):
        cells = json.loads(nb.read_text())["cells"]
        texts[nb.name] = "\n".join("".join(c["source"]) for c in cells)
    missing = [(name, path) for name, text in texts.items()
               for path in sorted(set(re.findall(r"llama_edu/[\w/]+\.py", text))) if not (root / path).is_file()]
    assert not missing, missing
