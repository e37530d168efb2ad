"""Files written atomically, folders locked between processes, and JSON read with its format
checked: the ways memformer touches disk, in one place.

Crash safety. A folder or file is written into a temporary sibling, its contents are flushed to
disk (fsync), and it is renamed into place; an existing folder is swapped with the new one in one
step (Linux `renameat2(RENAME_EXCHANGE)`), so at every instant `path` is either the complete old
version or the complete new one. Where the exchange is not available the old folder is first
renamed aside and the new one renamed in; a process killed between those two renames leaves no
`path`, and the next reader or writer renames the old one back (`recover_dir`). Temporary and
replaced siblings (`.NAME.tmp-*`, `.NAME.old-*`) left by a killed process are removed by the next
write; a sibling still being written is recognised by the lock its writer holds on it.

Concurrency. Each folder `path` has a lock file `.NAME.lock` beside it, created by its writers: a
writer holds it exclusively only while swapping the finished folder in, readers share it while
they read (`dir_lock`), so a reader never mixes files of two versions. Two writers of one folder both
finish; the one that swaps last wins, and each version is complete.

Errors. A write that fails (disk full, file-size limit, read-only or missing permission) raises
`WriteError`, an OSError naming the target, after removing its temporary sibling; the previous
version is untouched.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import shutil
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks, writes stay atomic
    fcntl = None


class WriteError(OSError):
    """A file or folder could not be written; the message names it and the previous version is intact."""


def _write_error(path: Path, e: BaseException) -> WriteError:
    code = getattr(e, "errno", None)
    reason = (os.strerror(code) if code else None) or str(e)
    if code == errno.EFBIG:
        reason += " (a file-size limit, ulimit -f)"
    return WriteError(code or errno.EIO, f"could not write {path}: {reason}; nothing was changed there")


def write_error(path, e: BaseException) -> WriteError | None:
    """`e` as a WriteError naming `path` when it is an OS error (also one wrapped by safetensors's
    writer); None for any other error."""
    if isinstance(e, WriteError):
        return e
    if isinstance(e, OSError):
        return _write_error(Path(path), e)
    code = _safetensors_io_error(e)
    return None if code is None else _write_error(Path(path), OSError(code, os.strerror(code)))


def _safetensors_io_error(e: BaseException) -> int | None:
    """The errno inside a safetensors serialization error (it wraps the OS error in its text)."""
    text = str(e)
    for code, names in ((errno.ENOSPC, ("No space left", "StorageFull")), (errno.EFBIG, ("File too large", "FileTooLarge")),
                        (errno.EACCES, ("Permission denied", "PermissionDenied")),
                        (errno.EROFS, ("Read-only file system", "ReadOnlyFilesystem"))):
        if any(n in text for n in names):
            return code
    return None


# ---------------------------------------------------------------- locks
@contextlib.contextmanager
def _flock(fd: int, shared: bool):
    if fcntl is None:
        yield
        return
    fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)


def lock_path(path) -> Path:
    path = Path(path)
    return path.parent / f".{path.name}.lock"


@contextlib.contextmanager
def dir_lock(path, *, shared: bool = False):
    """Hold the inter-process lock of `path` (the file `.NAME.lock` beside it): shared for
    readers, exclusive for writers. Writers create the lock file; readers never write: where it
    does not exist (a folder no memformer of this version has written) they read without it."""
    lock = lock_path(path)
    try:
        fd = os.open(lock, os.O_RDONLY) if shared else os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        if shared:
            yield
            return
        raise _write_error(Path(path), e) from None
    try:
        with _flock(fd, shared):
            yield
    finally:
        os.close(fd)


class BusyError(RuntimeError):
    """A folder another process is writing (its exclusive lock is held)."""


def hold_dir_lock(path) -> int | None:
    """Take the exclusive lock of `path` without waiting and keep it until `release_dir_lock`
    (or the end of the process, even on SIGKILL). Raises BusyError naming the folder when another
    process holds it: for long writers, such as a training run, that must not wait for hours."""
    if fcntl is None:
        return None
    path = Path(path)
    try:
        fd = os.open(lock_path(path), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise _write_error(path, e) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise BusyError(f"{path} is in use by another process (lock {lock_path(path)} is held); "
                        "wait for it to finish or choose another folder") from None
    return fd


def release_dir_lock(fd: int | None) -> None:
    if fd is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


# ---------------------------------------------------------------- temporary siblings
def _sibling(path: Path, kind: str) -> Path:
    return path.parent / f".{path.name}.{kind}-{os.getpid()}-{time.monotonic_ns()}"


def _claim(folder: Path):
    """Open `folder` and lock it exclusively for this process's lifetime (the lock ends when the
    process does, even on SIGKILL): the mark that a temporary sibling is still being written."""
    if fcntl is None:
        return None
    fd = os.open(folder, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def _is_abandoned(folder: Path) -> bool:
    """True when no live process holds the lock of the temporary sibling `folder`."""
    if fcntl is None:
        return False
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)                 # closing releases a lock taken here


def remove_dir(path) -> None:
    """Delete the folder `path` so that no half-deleted folder is ever visible under its name:
    it is renamed to a hidden sibling first, then removed."""
    path = Path(path)
    trash = _sibling(path, "old")
    try:
        os.rename(path, trash)
    except FileNotFoundError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def recover_dir(path) -> bool:
    """If `path` is missing but a replaced version (`.NAME.old-*`) survives from a writer killed
    between its two renames, rename the newest one back. Returns True when it did."""
    path = Path(path)
    if path.exists() or not path.parent.is_dir():
        return False
    olds = sorted(path.parent.glob(f".{path.name}.old-*"), key=lambda p: p.stat().st_mtime_ns)
    for old in reversed(olds):
        if old.is_dir() and _is_abandoned(old):
            try:
                os.rename(old, path)
                return True
            except OSError:
                return False
    return False


def recover_for_reading(path) -> None:
    """`recover_dir` for a reader that finds `path` missing: only when a replaced version exists,
    under the writers' lock; a reader that may not write there leaves it as it is."""
    path = Path(path)
    if path.exists() or not path.parent.is_dir() or not any(path.parent.glob(f".{path.name}.old-*")):
        return
    with contextlib.suppress(OSError), dir_lock(path):
        recover_dir(path)


def _clean_siblings(path: Path) -> None:
    """Remove temporary / replaced siblings of `path` left by killed processes."""
    for kind in ("tmp", "old"):
        for p in path.parent.glob(f".{path.name}.{kind}-*"):
            if p.is_dir() and _is_abandoned(p):
                shutil.rmtree(p, ignore_errors=True)


# ---------------------------------------------------------------- durable renames
_UMASK = os.umask(0)
os.umask(_UMASK)                  # read once, at import (os.umask can only be read by setting it)


def fsync_tree(folder: Path, *, normal_modes: bool = False) -> None:
    """Flush every file under `folder` and the folder itself to disk (before a rename publishes it).
    normal_modes: give files and folders the modes a plain open()/mkdir() would (some writers,
    safetensors among them, create 0600 files: a memory others could not read)."""
    for p in sorted(folder.rglob("*"), reverse=True):
        if normal_modes and not p.is_symlink():
            p.chmod((0o777 if p.is_dir() else 0o666) & ~_UMASK)
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    if normal_modes:
        folder.chmod(0o777 & ~_UMASK)
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:      # some file systems refuse fsync on a folder
        pass
    finally:
        os.close(fd)


_RENAME_EXCHANGE = 2
_renameat2 = None


def _exchange(a: Path, b: Path) -> bool:
    """Swap the folders `a` and `b` in one atomic step (Linux renameat2); False where unsupported."""
    global _renameat2
    if _renameat2 is None:
        try:
            _renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
        except (OSError, AttributeError):
            _renameat2 = False
    if not _renameat2:
        return False
    at_fdcwd = -100
    if _renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def atomic_dir(path, fill) -> Path:
    """Create or replace the folder `path` with what `fill(tmp)` writes into a temporary sibling
    (see the module docstring for what a crash, a second writer or a full disk leave behind)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _sibling(path, "tmp")
        tmp.mkdir()
    except OSError as e:
        raise _write_error(path, e) from None
    fd = None
    try:
        fd = _claim(tmp)
        try:
            fill(tmp)
            fsync_tree(tmp, normal_modes=True)
        except Exception as e:       # noqa: BLE001 - OS errors (also wrapped by safetensors) name the target
            err = write_error(path, e)
            if err is None:
                raise
            raise err from None
        with dir_lock(path):
            recover_dir(path)
            try:
                if path.exists():
                    if not _exchange(tmp, path):
                        old = _sibling(path, "old")
                        os.rename(path, old)
                        os.rename(tmp, path)
                        tmp = old
                    shutil.rmtree(tmp, ignore_errors=True)   # now the old version
                else:
                    os.rename(tmp, path)
            except OSError as e:
                raise _write_error(path, e) from None
            _fsync_dir(path.parent)
            _clean_siblings(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if fd is not None:
            os.close(fd)
    return path


def atomic_write_text(path, text: str) -> Path:
    """Write `text` to the file `path` through a temporary sibling flushed and renamed into place."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{time.monotonic_ns()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise _write_error(path, e) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def read_json(path, *, error=ValueError, format: str | None = None, version=None,
              version_key: str = "format_version") -> dict:
    """The JSON object in the file `path`. FileNotFoundError when it is missing; `error` (naming
    the file) when it is not valid UTF-8 JSON, not an object, or when `format` / `version` are
    given and its "format" / `version_key` fields differ."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path} is corrupt: {e}") from None
    except RecursionError:                # nesting deeper than the parser's stack
        raise error(f"{path} is corrupt: JSON nested too deeply") from None
    if not isinstance(data, dict):
        raise error(f"{path} is corrupt: a JSON object was expected, got {type(data).__name__}")
    if format is not None and data.get("format") != format:
        raise error(f"{path}: not a {format} file (format {data.get('format')!r})")
    if version is not None and data.get(version_key) != version:
        raise error(f"{path}: {format or 'file'} version {data.get(version_key)!r} is not supported "
                    f"(this memformer reads version {version})")
    return data


def jsonl_objects(path, *, error=ValueError):
    """(line number, object) for each non-blank line of the JSONL file `path`, streamed; `error`
    naming the file and line when a line is not a JSON object or not UTF-8."""
    path = Path(path)
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise error(f"{path}:{n}: not valid UTF-8 ({e.reason})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise error(f"{path}:{n}: not valid JSON ({e.msg})") from None
            except RecursionError:
                raise error(f"{path}:{n}: JSON nested too deeply") from None
            if not isinstance(row, dict):
                raise error(f"{path}:{n}: a JSON object was expected, got {type(row).__name__}")
            yield n, row
