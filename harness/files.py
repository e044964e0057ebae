"""Files segprune writes whole: atomically, and read back with a one-line error that names a corrupt one.

A file is written to a temporary sibling, fsynced and renamed over the old one, so a reader, a killed process or a
full disk leaves either the old file or the new one, never a part of one. (Cell records are appended line by line
instead; `harness.runner.read_records` drops a torn last line.)
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def usual_mode(mode: int) -> int:
    """The permissions `open` or `mkdir` would give: `mode` less the process umask (mkstemp / mkdtemp give 0600 /
    0700, which a cache shared by a group cannot read)."""
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Replace `path` by a file holding `text`, all at once (the new file gets the usual umask permissions)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, usual_mode(0o666))  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(err, OSError) and err.filename is None:  # a failed write names no file: name the one we wrote
            raise OSError(err.errno, err.strerror, str(path)) from err
        raise


def sync_folder(folder: str | os.PathLike) -> None:
    """fsync every file in `folder` and the folder itself, so that a rename that publishes it publishes its data."""
    for f in Path(folder).iterdir():
        if f.is_file():
            fsync_path(f)
    fsync_path(folder)


def fsync_path(path: str | os.PathLike) -> None:
    """fsync one file or folder (a folder: the names in it, such as a rename into it). Some network and FUSE file
    systems cannot fsync a folder (EINVAL, ENOTSUP, EBADF): that is skipped, files are always synced."""
    import errno

    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:
        if not (Path(path).is_dir() and err.errno in (errno.EINVAL, errno.ENOTSUP, errno.EBADF)):
            raise
    finally:
        os.close(fd)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=2))


def read_json(path: str | os.PathLike, recover: str) -> dict[str, Any]:
    """A JSON object from a file (segprune's own or a checkpoint's); a file that does not parse, or holds anything but
    an object, is a one-line `ValueError` naming it.

    Args:
        path: the file.
        recover: how to get a good file back, appended to the error ("delete it and rerun the same command").
    """
    path = Path(path)
    try:
        obj = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        refuse_lfs_pointer(path)
        raise ValueError(f"{path} is corrupt (not valid JSON: {err}); {recover}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} is corrupt (a JSON {type(obj).__name__}, not an object); {recover}")
    return obj


LFS_POINTER = b"version https://git-lfs.github.com/spec/"


def refuse_lfs_pointer(path: str | os.PathLike) -> None:
    """A one-line `ValueError` when `path` is a Git LFS pointer (a clone without `git lfs`) instead of the file."""
    path = Path(path)
    if path.stat().st_size < 1024:
        with open(path, "rb") as f:
            if f.read(len(LFS_POINTER)) == LFS_POINTER:
                raise ValueError(f"{path} is a Git LFS pointer, not the file itself (the folder was cloned without "
                                 f"git-lfs); run `git lfs pull` in {path.parent}, or download with `hf download`")


class Busy(Exception):
    """Another process holds the lock (`holder`: the pid it wrote, or "unknown")."""

    def __init__(self, holder: str):
        super().__init__(holder)
        self.holder = holder


@contextlib.contextmanager
def exclusive(path: str | os.PathLike, *, wait: bool) -> Iterator[None]:
    """Hold an exclusive advisory lock on `path` (created if needed) for the block; the kernel releases it when the
    process dies, so a killed run never leaves a stale lock.

    Args:
        path: the lock file; the holder's pid is written into it, for the message of whoever finds it taken.
        wait: block until the lock is free (short critical sections), or raise `Busy` at once (a cell's writer).
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise Busy(os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)
