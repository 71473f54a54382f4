"""The files the commands write (``vapt-train``, ``vapt-bench``): each replaced in one step, and
the error that names the path and the cause when that fails."""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Optional


class OutputError(Exception):
    """A file a command could not read or write; the message names the path and the cause."""


def cause(error: BaseException) -> Optional[OSError]:
    """The :class:`OSError` behind ``error`` (itself, or one it was raised from or while handling:
    ``torch.save`` reports a failed write of its file as a ``RuntimeError`` raised while handling
    it), or None."""
    while error is not None and not isinstance(error, OSError):
        error = error.__cause__ or error.__context__
    return error


def describe(error: OSError) -> str:
    """``[Errno 28] No space left on device``: the error without its file name (the message has it)."""
    if error.errno and error.strerror:
        return f"[Errno {error.errno}] {error.strerror}"
    return str(error) or type(error).__name__


def write_atomic(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Make what ``write(f)`` writes the content of ``path`` in one step: written to a temporary
    file in the same folder, flushed to disk, then renamed over ``path`` (through a symbolic link:
    over the file it names), with ``path``'s permissions (a new file: those the umask gives).
    ``path`` is the old file or the whole new one, never a truncated one.

    Raises:
        OutputError: an :class:`OSError` behind the failure (a full disk, a folder in the way);
            the temporary file is removed and ``path`` is as it was. Any other error of ``write``
            is raised as it is, after the same cleanup.
    """
    target = Path(os.path.realpath(path))
    tmp = None
    try:
        try:
            mode = stat.S_IMODE(target.stat().st_mode)
        except FileNotFoundError:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        os.close(fd)
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
        tmp = None
    except BaseException as error:
        os_error = cause(error)
        if os_error is None:
            raise
        raise OutputError(f"cannot write {path}: {describe(os_error)}") from error
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    with contextlib.suppress(OSError):  # the rename reaches the disk too; the file is complete either way
        folder = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
