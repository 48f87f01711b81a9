"""Small file and hashing helpers shared across covidxr (runtime layer: stdlib and numpy only)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import secrets
import stat
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import numpy as np

from covidxr.runtime.errors import CovidxrError

__all__ = [
    "atomic_path",
    "atomic_write",
    "exclusive_temp",
    "hash_arrays",
    "locked",
    "output_folder",
    "stable_digest",
    "write_failure",
    "write_file",
]

# What a user can do about a write the system refused, by its errno (anything else: its own words).
_WRITE_ADVICE = {
    errno.ENOSPC: "free some space",
    errno.EDQUOT: "free some space",
    errno.EFBIG: "raise the file size limit (ulimit -f)",
    errno.EROFS: "make the file system writable again",
    errno.EACCES: "get permission to write there",
    errno.EPERM: "get permission to write there",
}


def stable_digest(value: Any) -> str:
    """SHA-256 (hex) of a JSON-able value with sorted keys: the same for equal values in any process, so
    it can name cache entries and exports."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def hash_arrays(arrays: Mapping[str, np.ndarray]) -> str:
    """SHA-256 of named arrays in key order (each name, then its C-ordered bytes): the identity of a head or
    backbone's weights, equal whether they were read by torch or by numpy."""
    digest = hashlib.sha256()
    for key in sorted(arrays):
        digest.update(key.encode())
        digest.update(np.ascontiguousarray(arrays[key]).tobytes())
    return digest.hexdigest()


def _create_beside(path: Path, suffix: str) -> tuple[Path, int]:
    """A new, empty file beside ``path`` and its open descriptor: a hidden name with a random part, created
    exclusively (``O_EXCL``, never through a link), as ``tempfile.mkstemp`` does but with the permissions a
    plain ``open`` gives (0666 less the umask), since the file is renamed into place."""
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}{suffix}")
        try:
            return tmp, os.open(tmp, flags, 0o666)
        except FileExistsError:
            continue  # another name: a file (or a planted link) is there already


def exclusive_temp(path: str | Path, suffix: str = ".tmp") -> Path:
    """A new, empty file beside ``path`` that no one else had opened (``_create_beside``), for a tool that
    writes by name; the caller removes it."""
    tmp, descriptor = _create_beside(Path(path), suffix)
    os.close(descriptor)
    return tmp


@contextmanager
def atomic_path(path: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary path beside ``path`` for a writer that needs a file name (torch.save, an exporter): renamed
    onto ``path`` when the block ends, removed when it raises, so a reader never sees half a file and an
    interrupted write leaves the old one. The file is created exclusively under a hidden random name
    (``exclusive_temp``), so a link planted beside ``path`` is never followed."""
    path = Path(path)
    tmp = exclusive_temp(path, suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | Path, data: bytes | str, sync: bool = False) -> Path:
    """Write ``data`` beside ``path`` and rename it into place (``atomic_path``'s exclusive file, written
    through the descriptor that created it); ``sync`` also flushes it to disk first."""
    path = Path(path)
    tmp, descriptor = _create_beside(path, ".tmp")
    try:
        with open(descriptor, "wb") as handle:
            handle.write(data.encode("utf-8") if isinstance(data, str) else data)
            if sync:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_failure(path: str | Path, exc: OSError, kept: str = "") -> CovidxrError:
    """One line for a write the system refused (a full or read-only disk, no permission): the file, the
    system's reason, what was kept (``kept``, e.g. "the 12 finished row(s) are kept") and what to do."""
    message = f"{path}: cannot write ({exc.strerror or type(exc).__name__})"
    message += f"; {kept}" if kept else ""
    advice = _WRITE_ADVICE.get(exc.errno or 0)
    return CovidxrError(f"{message}: {advice}" if advice else message)


def output_folder(path: str | Path) -> Path:
    """``path`` as a folder to write into, made if missing; a file in its place, a parent that is a file, or
    a place the system refuses is one line naming it (never a traceback), and nothing is written."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise CovidxrError(f"{path}: exists and is not a folder; choose another --out") from None
    except NotADirectoryError:
        raise CovidxrError(f"{path}: a part of this path is a file, not a folder; choose another --out") from None
    except OSError as exc:
        raise write_failure(path, exc) from None
    return path


def write_file(path: str | Path, data: bytes) -> Path:
    """``atomic_write`` with a refused write as one line (``write_failure``): a full disk leaves the old file or
    none, never a truncated one."""
    try:
        return atomic_write(path, data)
    except OSError as exc:
        raise write_failure(path, exc) from None


def _lock_holder(inode: int) -> int | None:
    """The process holding a ``flock`` on the file ``inode``, from Linux's ``/proc/locks`` (None elsewhere, or
    when it has just let go). Read there rather than written in the lock file, which then takes no disk space
    (a full disk still gets its one-line error)."""
    try:
        with open("/proc/locks", encoding="ascii") as handle:
            for line in handle:
                fields = line.split()  # 1: FLOCK ADVISORY WRITE PID MAJOR:MINOR:INODE START END
                if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5].rsplit(":", 1)[-1] == str(inode):
                    return int(fields[4])
    except (OSError, ValueError):
        pass
    return None


@contextmanager
def locked(path: str | Path, what: str = "file") -> Iterator[None]:
    """Hold an exclusive lock on ``path`` for one writer: ``fcntl.flock`` on a hidden, empty ``.NAME.lock``
    beside it, removed when the block ends. A second writer, in this process or another, is refused at once in
    one line naming the holder's process (``_lock_holder``); the lock goes with its process, so one that
    crashed leaves nothing to clean up."""
    import fcntl  # POSIX

    path = Path(path)
    lock = path.with_name(f".{path.name}.lock")
    # Read-only: flock needs no write access, and a file held open for writing would stop the disk from being
    # remounted read-only (which the writer then reports in one line).
    flags = os.O_RDONLY | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    while True:
        try:
            descriptor = os.open(lock, flags, 0o666)
        except OSError as exc:
            reason = "a link" if exc.errno == errno.ELOOP else exc.strerror or type(exc).__name__
            raise CovidxrError(f"{path}: cannot lock it ({lock.name}: {reason})") from None
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(os.fstat(descriptor).st_ino)
            os.close(descriptor)
            by = "another process" if holder is None else f"process {holder}"
            raise CovidxrError(
                f"{path}: another covidxr is writing this {what} ({by}, lock {lock.name}); wait for it to finish "
                "or choose another --out"
            ) from None
        mine = os.fstat(descriptor)
        if not stat.S_ISREG(mine.st_mode):
            os.close(descriptor)
            raise CovidxrError(f"{path}: cannot lock it ({lock.name} is not a regular file)")
        try:
            current = os.stat(lock, follow_symlinks=False)
        except FileNotFoundError:
            current = None
        if current is not None and (mine.st_dev, mine.st_ino) == (current.st_dev, current.st_ino):
            break
        os.close(descriptor)  # the holder removed this lock file as we opened it: take the new one
    try:
        yield
    finally:
        # Removed before the lock is released, so a waiting writer never takes a stale file; where it cannot be
        # (the disk went read-only mid-run) it stays, empty and unlocked, and the next writer takes it.
        with suppress(OSError):
            lock.unlink(missing_ok=True)
        os.close(descriptor)
