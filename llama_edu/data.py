"""Finding the data files the course uses, and the project's own artefacts in ``data/``.

Public corpora and Meta's tokenizer are never committed to the repository. They are found,
in this order:

1. an explicit path given by the caller;
2. the directory named by the environment variable ``LLAMA_EDU_DATA``;
3. ``../shared/data`` beside the checkout (how the tests and CI get them);
4. the user cache (``~/.cache/llama_edu``), filled by a download from the public original
   and verified against its sha256.

Offline with nothing found, :func:`find_data_file` raises a ``FileNotFoundError`` that says
where to put the file.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

#: The repository root (the folder holding ``llama_edu/`` and ``data/``).
REPO_ROOT = Path(__file__).resolve().parent.parent

#: The project's own artefacts: its trained tokenizer and default checkpoint.
PROJECT_DATA_DIR = REPO_ROOT / "data"

#: Where the default model (HF layout) lives.
DEFAULT_MODEL_DIR = PROJECT_DATA_DIR / "shakespeare-llama"


@dataclass(frozen=True)
class DataFile:
    """A public file the course uses: its sha256 and where the original lives."""

    name: str
    sha256: str | None
    url: str | None
    description: str


KNOWN_FILES = {
    f.name: f
    for f in [
        DataFile(
            "llama2-tokenizer.model",
            "9e556afd44213b6bd1be2b850ebbbd98f5481437a8021afaf58ee7fb1818d347",
            "https://huggingface.co/hf-internal-testing/llama-tokenizer/resolve/main/tokenizer.model",
            "Meta's Llama 2 SentencePiece tokenizer (32,000 pieces)",
        ),
        DataFile(
            "tinyshakespeare.txt",
            "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
            "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
            "the tiny Shakespeare corpus (1.1 MB)",
        ),
        DataFile(
            "sms_spam_collection.tsv",
            "7d039a24a6083ed9ef0f806ebad56bbb976e3aeb8de05669173bfdc4996c239d",
            None,  # the UCI original is a zip archive: download and unpack it by hand
            "the UCI SMS Spam Collection (label<TAB>text)",
        ),
        DataFile(
            "stories260K/stories260K.bin",
            "9414d5a285453a7eab631713d171753232c978f6f97654211469aff8be93c8d6",
            "https://huggingface.co/karpathy/tinyllamas/resolve/main/stories260K/stories260K.bin",
            "llama2.c's pretrained stories260K model",
        ),
        DataFile(
            "stories260K/hf",
            None,
            None,  # made from stories260K.bin by the llama2.c converter when not found
            "stories260K in the Hugging Face layout",
        ),
    ]
}


def cache_dir() -> Path:
    """The user cache for downloaded data (``$XDG_CACHE_HOME/llama_edu`` or ``~/.cache/llama_edu``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "llama_edu"


def search_dirs() -> list[Path]:
    """The directories searched for shared data, in order."""
    dirs = []
    if os.environ.get("LLAMA_EDU_DATA"):
        dirs.append(Path(os.environ["LLAMA_EDU_DATA"]))
    dirs.append(REPO_ROOT.parent / "shared" / "data")
    dirs.append(Path.cwd().parent / "shared" / "data")
    dirs.append(cache_dir())
    return dirs


def sha256_of(path: str | os.PathLike) -> str:
    """The hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _download(info: DataFile, target: Path) -> Path:
    """Download ``info.url`` to ``target`` atomically and check its sha256."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.name + ".", suffix=".part")
    os.close(fd)
    try:
        urllib.request.urlretrieve(info.url, tmp)
        got = sha256_of(tmp)
        if info.sha256 and got != info.sha256:
            raise OSError(
                f"downloaded {info.name} from {info.url} but its sha256 is {got}, "
                f"expected {info.sha256}; the file was not kept"
            )
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return target


def find_data_file(name: str, path: str | os.PathLike | None = None, download: bool = True) -> Path:
    """Locate a shared data file (or folder) by ``name``, e.g. ``"tinyshakespeare.txt"``.

    ``path``, when given, wins and must exist. Otherwise the search order of the module
    docstring applies; ``download=False`` skips the network step.
    """
    if path is not None:
        p = Path(path).expanduser()
        if not p.exists():
            raise FileNotFoundError(f"{p} does not exist (it was given explicitly for {name!r})")
        return p
    for d in search_dirs():
        candidate = d / name
        if candidate.exists():
            return candidate
    info = KNOWN_FILES.get(name)
    if name == "stories260K/hf" and download:
        return _convert_stories260k()
    if download and info is not None and info.url is not None:
        try:
            return _download(info, cache_dir() / name)
        except OSError as e:  # offline, or a bad download: fall through to the clear error
            reason = f" (download from {info.url} failed: {e})"
    else:
        reason = ""
    what = f"{info.description} " if info else ""
    where = "\n  ".join(str(d / name) for d in search_dirs())
    raise FileNotFoundError(
        f"could not find {what}{name!r}{reason}. Put the file at one of:\n  {where}\n"
        "or set LLAMA_EDU_DATA to the folder that holds it."
    )


def _convert_stories260k() -> Path:
    """Make the HF-layout stories260K in the user cache from llama2.c's ``.bin`` (found or
    downloaded), with the project's own converter; the same weights as the shared ``hf/`` copy."""
    from .convert import convert_llama2c_checkpoint

    target = cache_dir() / "stories260K" / "hf"
    convert_llama2c_checkpoint(find_data_file("stories260K/stories260K.bin"), target)
    return target
