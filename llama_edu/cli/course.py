"""``student-notebooks``: the course for a class."""

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


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``student-notebooks`` to ``python -m llama_edu``."""
    p = subparsers.add_parser("student-notebooks", help="write the notebooks without their solutions, for a class",
                              description="Write copies of the course notebooks with each solution cell replaced by a stub, for a class.")
    p.add_argument("out_dir", metavar="OUT_DIR", help="folder for the student copies (created if missing)")
    p.add_argument("--notebooks", default=str(REPO_ROOT / "notebooks"), help="folder of the course notebooks (default: the repository's)")
    p.add_argument("--overwrite", action="store_true", help="replace the notebooks OUT_DIR holds (by default a non-empty OUT_DIR is refused)")
    p.set_defaults(func=_cmd_student_notebooks)
