"""Replacing a set of files in a folder all at once: a save either happens whole or not at all.

A checkpoint is several files (config.json, weight shards, an index, tokenizer files) that only
make sense together. Renaming them into place one by one is not enough: a crash between two
renames leaves a folder that mixes two models, and two saves into one folder interleave. So a
save here works on a copy:

1. take a lock (``.NAME.llama_edu-lock`` beside the folder; ``fcntl.flock``, or an ``O_EXCL``
   lock file where there is no fcntl) so that two writers of the same folder take turns;
2. remove what an earlier save killed with ``kill -9`` left behind: hidden temporaries named
   ``.NAME.llama_edu-tmp-PID-XXXX`` / ``.NAME.llama_edu-old-PID-XXXX``. Saves make them only
   while holding the lock, so while we hold it they are all stale (without fcntl: those whose
   PID is gone);
3. write the complete new set of files into a fresh hidden folder beside the target;
4. hard-link in every entry of the old folder that is not ours (a README, a generation config,
   a user's notes: ``owned(name)`` says which names the save replaces);
5. swap the new folder in: one atomic ``renameat2(RENAME_EXCHANGE)`` on Linux, else two renames
   (a crash between them leaves the old folder under its hidden name, and the next save puts
   it back first); then delete the old folder.

Readers of the folder see the old files or the new ones, never a mixture, whatever path names
the folder: relative (``out``, ``.``, ``../x``), through a symlink, with a trailing slash; the
path is resolved once, before anything is written. A save into the folder this process works in
swaps it too, and then moves the process into the new folder (a shell that sat in the old one
must ``cd .`` again). Where the folder cannot be swapped (it is a mount point, or its parent is
not writable), the files are renamed into the folder one by one instead, config.json removed
first and written last, so a crash mid-way leaves a folder that refuses to load rather than one
that loads mixed weights.

:func:`check_output_folder` is the rule every command that writes a folder applies first: never
into one of its inputs (compared by ``os.path.samefile``, so symlinks, relative paths and bind
mounts count), and not into a folder that holds something already unless the user said
``--overwrite``.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Callable, Iterable, Iterator

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

#: Every temporary a save makes carries this marker (and the writer's PID), so the next save
#: can recognise and remove the ones a killed writer left.
MARKER = ".llama_edu-"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    try:  # Linux: a killed process that its parent has not reaped yet is a zombie, not a writer
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_path`` (created if needed; left in place afterwards,
    because deleting a lock file while another process waits on it would break the lock)."""
    if fcntl is not None:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # blocks while another save of this folder runs
            yield
        finally:
            os.close(fd)  # closing releases the lock
        return
    # No fcntl: a lock file created with O_EXCL holding our PID; a dead holder's file is taken over.
    while True:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
            break
        except FileExistsError:
            try:
                holder = int(lock_path.read_text() or "0")
            except (OSError, ValueError):
                holder = 0
            if holder and not _pid_alive(holder):
                lock_path.unlink(missing_ok=True)
                continue
            time.sleep(0.05)
    try:
        yield
    finally:
        lock_path.unlink(missing_ok=True)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _temp_name(prefix: str, kind: str) -> str:
    return f"{prefix}{MARKER}{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def remove_stale_temporaries(folder: Path, prefix: str, target: Path | None = None, locked: bool = False) -> list[Path]:
    """Delete the ``{prefix}.llama_edu-{tmp,old}-PID-XXXX`` entries of ``folder`` that a killed
    save left. ``locked``: the caller holds the target's ``fcntl`` lock, under which every save
    makes its temporaries, so all of them are stale (a live writer cannot hold the lock at the
    same time); otherwise only those whose writer (PID) is no longer running. When ``target``
    is missing and a stale ``old`` folder exists (a crash between the two renames of a swap),
    that folder is put back at ``target`` first. Returns what was removed."""
    pattern = re.compile(rf"^{re.escape(prefix)}{re.escape(MARKER)}(tmp|old)-(\d+)-[0-9a-f]+$")
    stale = []
    for entry in folder.iterdir() if folder.is_dir() else []:
        m = pattern.match(entry.name)
        if m and (locked or not _pid_alive(int(m.group(2)))):
            stale.append((m.group(1), entry))
    if target is not None and not target.exists():
        olds = sorted((e for kind, e in stale if kind == "old"), key=lambda e: e.stat().st_mtime)
        if olds:
            os.rename(olds[-1], target)
            stale = [(k, e) for k, e in stale if e != olds[-1]]
    for _, entry in stale:
        _remove(entry)
    return [e for _, e in stale]


def _cwd_below(folder: Path) -> Path | None:
    """Where this process works, relative to ``folder`` (``Path(".")`` for the folder itself),
    or None when it works elsewhere."""
    try:
        cwd = Path.cwd().resolve()
    except OSError:
        return None
    real = folder.resolve()
    return cwd.relative_to(real) if cwd == real or real in cwd.parents else None


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # not supported by this filesystem or kernel
        return False
    raise OSError(err, f"could not swap {a} and {b}: {os.strerror(err)}")


def _link_or_copy(src: Path, dst: Path) -> None:
    """Put ``src`` at ``dst`` without copying bytes where possible (hard links)."""
    if src.is_symlink():
        os.symlink(os.readlink(src), dst)
    elif src.is_dir():
        shutil.copytree(src, dst, symlinks=True, copy_function=_link_file)
    else:
        _link_file(src, dst)


def _link_file(src: str | Path, dst: str | Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or links not allowed: copy
        shutil.copy2(src, dst)


def _swap_in(staging: Path, target: Path, owned: Callable[[str], bool]) -> None:
    """Make ``target`` the folder ``staging`` (plus the entries of the old ``target`` that the
    save does not own), atomically. ``staging`` is gone afterwards."""
    if not target.exists():
        os.rename(staging, target)
        return
    shutil.copymode(target, staging)  # the folder keeps its permissions (group-writable, ...)
    new_names = {p.name for p in staging.iterdir()}
    for entry in target.iterdir():  # keep what is not ours
        if entry.name not in new_names and not owned(entry.name) and MARKER not in entry.name:
            _link_or_copy(entry, staging / entry.name)
    here = _cwd_below(target)
    if _exchange(staging, target):
        old = staging  # after the exchange the staging path holds the old folder
    else:
        old = staging.with_name(staging.name.replace(f"{MARKER}tmp-", f"{MARKER}old-"))
        os.rename(target, old)  # a crash right here is repaired by the next save (see above)
        try:
            os.rename(staging, target)
        except BaseException:
            os.rename(old, target)
            raise
    if here is not None:  # we worked in the old folder: work in the new one (same place in it)
        os.chdir(target / here if (target / here).is_dir() else target)
    for entry in old.iterdir():  # entries a user added to the folder while we were saving
        if not owned(entry.name) and MARKER not in entry.name and not (target / entry.name).exists():
            os.rename(entry, target / entry.name)
    _remove(old)


def _replace_in_place(staging: Path, target: Path, owned: Callable[[str], bool], last: str | None) -> None:
    """Fallback without a swap: rename the staged files into ``target`` one by one. ``last``
    (config.json) is removed first and renamed last, so a crash mid-way leaves a folder that
    does not load instead of one that loads a mixture."""
    names = sorted(p.name for p in staging.iterdir())
    if last in names:
        names.remove(last)
        (target / last).unlink(missing_ok=True)
        names.append(last)
    for entry in target.iterdir():  # the old save's files that the new one does not replace
        if owned(entry.name) and entry.name not in names and MARKER not in entry.name:
            _remove(entry)
    for name in names:
        os.replace(staging / name, target / name)
    staging.rmdir()


@contextlib.contextmanager
def replace_folder_files(
    target: str | os.PathLike, owned: Callable[[str], bool], last: str | None = "config.json"
) -> Iterator[Path]:
    """Yield an empty hidden folder; write the complete new files into it. When the block
    ends normally, ``target`` holds exactly those files plus the entries of the old ``target``
    for which ``owned(name)`` is False, all at once (see the module docstring). On any error
    (including KeyboardInterrupt) the temporaries are removed and ``target`` is untouched.
    """
    # Resolved once, now: symlinks (the real folder is swapped, the link kept), ".", "..", a
    # relative path (the working directory may change while we save).
    target = Path(target).expanduser().resolve()
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a folder; choose another save_directory")
    if target == target.parent:
        raise ValueError(f"cannot save into the root folder {target}; choose a folder below it")
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    swap = os.access(parent, os.W_OK) and not (target.exists() and os.path.ismount(target))
    if not swap and not target.exists():
        raise PermissionError(f"cannot create {target}: its parent folder {parent} is not writable")
    if not swap and not os.access(target, os.W_OK):
        raise PermissionError(f"cannot save into {target}: the folder is not writable; choose another save_directory")
    # One lock per target whichever way it is saved (swap or in place), so all writers take turns.
    lock = parent / f".{target.name}{MARKER}lock" if os.access(parent, os.W_OK) else target / f"{MARKER}lock"
    home, prefix = (parent, f".{target.name}") if swap else (target, "")
    with _locked(lock):
        locked = fcntl is not None
        remove_stale_temporaries(parent, f".{target.name}", target, locked)  # swaps' temporaries
        remove_stale_temporaries(target, "", None, locked)  # in-place saves' temporaries
        staging = home / _temp_name(prefix, "tmp")
        staging.mkdir()
        try:
            yield staging
            if swap:
                _swap_in(staging, target, owned)
            else:
                _replace_in_place(staging, target, owned, last)
        except BaseException as e:
            # torch.save / safetensors report a failed write as a RuntimeError / SafetensorError
            writer_error = isinstance(e, RuntimeError) or type(e).__name__ == "SafetensorError"
            why = write_failure(staging, target, e) if writer_error else None
            _remove(staging)
            if why is not None:
                raise why from e
            raise


def write_failure(staging: Path, target: Path, error: Exception) -> OSError | None:
    """The OSError behind a writer's failure, when the disk is full or a file hit the size limit
    (``ulimit -f``, RLIMIT_FSIZE): torch.save and safetensors report those as a RuntimeError
    ("unexpected pos", "file write failed") or a SafetensorError, without the errno. None when
    neither explains it."""
    try:
        import resource  # POSIX only

        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        limited = limit not in (-1, resource.RLIM_INFINITY)
    except (ImportError, OSError, ValueError):
        limit, limited = -1, False
    if limited:  # a writer stops short of the limit, so no "size == limit" test: a finite limit is the suspect
        sizes = [(f.stat().st_size, f.name) for f in staging.rglob("*") if f.is_file()] if staging.is_dir() else []
        name = max(sizes, default=(0, ""))[1]
        return OSError(errno.EFBIG, f"File too large (files may hold at most {limit} bytes here, ulimit -f; "
                       f"{type(error).__name__}: {error})", str(target / name))
    try:
        free = shutil.disk_usage(staging if staging.exists() else target.parent).free
    except OSError:
        return None
    if free < 1 << 20:
        return OSError(errno.ENOSPC, f"No space left on device ({type(error).__name__}: {error})", str(target))
    return None


def recover_folder(target: str | os.PathLike) -> None:
    """Before reading ``target`` (e.g. to resume training): finish what a killed save left, under
    the save lock. If a crash fell between the two renames of a swap (where there is no atomic
    exchange), the complete old folder is put back; stale temporaries are removed."""
    target = Path(target).expanduser().resolve()
    if not target.parent.is_dir() or not os.access(target.parent, os.W_OK):
        return
    prefix = f".{target.name}{MARKER}"
    if not any(e.name.startswith(prefix) and not e.name.endswith("lock") for e in target.parent.iterdir()):
        return  # nothing a save left behind (and no lock file made for nothing)
    with _locked(target.parent / f".{target.name}{MARKER}lock"):
        remove_stale_temporaries(target.parent, f".{target.name}", target, fcntl is not None)



def _same(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (or cannot be looked at): not the same
        return False


def check_output_folder(
    out: str | os.PathLike, inputs: Iterable[str | os.PathLike | None] = (), *, overwrite: bool = False,
    option: str = "--overwrite", what: str = "output folder",
) -> Path:
    """Refuse, before anything is read or written, to write the folder ``out``:

    - when it is one of ``inputs`` or holds one (a model folder, a notebook folder, an input file
      inside it): compared with ``os.path.samefile``, so a symlink, a relative path, a trailing
      slash or a bind mount of the same folder is caught; never allowed, ``overwrite`` or not;
    - when it is a file;
    - when it holds anything already (a model, notebooks with their solutions, notes), unless
      ``overwrite``: saying what is there and ``option``, the flag that allows it.

    Returns ``out`` resolved. Our own lock and temporary files do not count as content.
    """
    path = Path(out).expanduser()
    for given in inputs:
        if given is None:
            continue
        src = Path(given).expanduser()
        chain = [src, *src.absolute().parents, *(src.resolve().parents if src.exists() else ())]
        if any(_same(path, p) for p in chain):
            kind = "folder" if src.is_dir() else "file"
            if _same(path, src):
                raise ValueError(f"the {what} {out} is the input {kind} {given} (the same folder by another path): "
                                 "write to a new folder, the input must stay as it is")
            raise ValueError(f"the {what} {out} holds the input {kind} {given}: write to a new folder, "
                             "the input must stay as it is")
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"the {what} {out} exists and is a file: choose a folder")
    if path.is_dir() and not overwrite:
        held = sorted(e.name for e in path.iterdir() if MARKER not in e.name)
        if held:
            shown = ", ".join(held[:5]) + (f" and {len(held) - 5} more" if len(held) > 5 else "")
            raise FileExistsError(f"the {what} {out} is not empty (it holds {shown}): choose a new folder, "
                                  f"or pass {option} to replace what it holds")
    return path.resolve()
