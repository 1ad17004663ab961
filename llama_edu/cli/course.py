"""``student-notebooks``, ``grade`` and ``set-home``: the course for a class and its teacher."""

from __future__ import annotations

import argparse

from ..io.files import REPO_ROOT


def _cmd_student_notebooks(args: argparse.Namespace) -> int:
    from ..course.handout import write_student_notebooks

    written = write_student_notebooks(args.out_dir, args.notebooks, overwrite=args.overwrite)
    for path in written:
        print(f"wrote {path}")
    print(f"{len(written)} student notebooks in {args.out_dir} (solution cells replaced by stubs)")
    return 0


def _add_student_notebooks(subparsers: argparse._SubParsersAction) -> None:
    """Add ``student-notebooks`` to ``python -m llama_edu``."""
    p = subparsers.add_parser("student-notebooks", help="write the notebooks without their solutions, for a class",
                              description="Write copies of the course notebooks with each solution cell replaced by a stub, for a class.")
    p.add_argument("out_dir", metavar="OUT_DIR", help="folder for the student copies (created if missing)")
    p.add_argument("--notebooks", default=str(REPO_ROOT / "notebooks"), help="folder of the course notebooks (default: the repository's)")
    p.add_argument("--overwrite", action="store_true", help="replace the notebooks OUT_DIR holds (by default a non-empty OUT_DIR is refused)")
    p.set_defaults(func=_cmd_student_notebooks)


def _cmd_grade(args: argparse.Namespace) -> int:
    from ..course.grading import grade_notebook, write_results

    if args.timeout <= 0 or args.cell_timeout <= 0:
        raise ValueError("--timeout and --cell-timeout must be positive numbers of seconds")
    results = {}
    for nb in args.notebooks:
        r = grade_notebook(nb, seed=args.seed, timeout=args.timeout, cell_timeout=args.cell_timeout)
        results[str(nb)] = r
        print(f"{nb}: {r['score']:g} / {r['max_score']:g}" + "".join(
            f"\n  {'PASS' if t['status'] == 'passed' else 'FAIL'} {t['name']}" for t in r["tests"]))
    write_results(results, args.json, args.csv)
    return 0


def _add_grade(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("grade", help="grade submitted notebooks on held-out inputs (Gradescope JSON, CSV)",
                              description="Grade submitted notebooks: run each in a fresh kernel and check every registered exercise on inputs it never showed.")
    p.add_argument("notebooks", nargs="+", metavar="NOTEBOOK", help="submitted .ipynb files (one per student)")
    p.add_argument("--json", metavar="FILE", help="write Gradescope's results.json here")
    p.add_argument("--csv", metavar="FILE", help="write one row per notebook here")
    p.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                   help="time limit for each call of a learner's function (default 30)")
    p.add_argument("--cell-timeout", type=int, default=300, metavar="SECONDS",
                   help="time limit for each cell of the notebook (default 300); a cell past it is interrupted")
    p.add_argument("--seed", type=int, default=1, help="which held-out draw of the random inputs (default 1; 0 = the notebook's own)")
    p.set_defaults(func=_cmd_grade)


def _cmd_set_home(args: argparse.Namespace) -> int:
    from ..course.home import read_home, set_home

    changed = set_home(args.url, args.root, args.branch)
    print(f"home is now {read_home(args.root)}; {len(changed)} files rewritten")
    return 0


def _add_set_home(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("set-home", help="point every notebook's Colab badge and install cell at a fork",
                              description="Point every notebook's Colab badge and install cell at a fork (the home in pyproject.toml's project URLs).")
    p.add_argument("url", metavar="URL", help="the fork, https://github.com/OWNER/REPO")
    p.add_argument("--branch", default="main", help="the branch the badges open (default main)")
    p.add_argument("--root", default=str(REPO_ROOT), help="the checkout to rewrite (default: this one)")
    p.set_defaults(func=_cmd_set_home)


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """``student-notebooks``, ``grade`` and ``set-home``."""
    _add_student_notebooks(subparsers)
    _add_grade(subparsers)
    _add_set_home(subparsers)
