"""The files the package writes (``vapt-train``, ``vapt-bench``, saved tasks): each file or folder
replaced in one step, and the error that names the path and the cause when that fails."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Optional


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


@contextlib.contextmanager
def _reported(path: Path) -> Iterator[None]:
    """A failure with an :class:`OSError` behind it raised as :class:`OutputError`, naming ``path``
    and the cause; any other error raised as it is."""
    try:
        yield
    except BaseException as error:
        os_error = cause(error)
        if os_error is None:
            raise
        raise OutputError(f"cannot write {path}: {describe(os_error)}") from error


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
        with _reported(path):
            try:
                mode = stat.S_IMODE(target.stat().st_mode)
            except FileNotFoundError:
                mode = 0o666 & ~_umask()
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
            os.close(fd)
            with open(tmp, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, mode)
            os.replace(tmp, target)
            tmp = None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    with contextlib.suppress(OSError):  # the rename reaches the disk too; the file is complete either way
        _fsync(target.parent)


def _fsync(path: Path, flags: int = os.O_RDONLY) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_folder(path: Path, fill: Callable[[Path], None]) -> None:
    """Make the files ``fill(folder)`` writes into an empty folder the content of folder ``path``,
    in one step: they are written to a temporary folder beside ``path`` and flushed to disk, then
    the temporary folder is renamed to ``path``. An existing ``path`` is renamed aside first and
    removed once the new folder is in place (put back if that fails), so ``path`` is the old folder
    or the whole new one, never a mix; whether it may be replaced is the caller's decision. Missing
    parent folders are created.

    Raises:
        OutputError: an :class:`OSError` behind the failure (a full disk, no permission); the
            temporary folder is removed and ``path`` is as it was. Any other error of ``fill`` is
            raised as it is, after the same cleanup.
    """
    target = Path(os.path.abspath(path))
    tmp = old = None
    try:
        with _reported(path):
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
            os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's folder is private; a saved folder is not
            fill(tmp)
            for file in tmp.rglob("*"):
                if file.is_file():
                    _fsync(file)
            _fsync(tmp)
            if os.path.lexists(target):
                old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".old"))
                os.rmdir(old)
                os.rename(target, old)
                try:
                    os.rename(tmp, target)
                except BaseException:
                    os.rename(old, target)
                    old = None
                    raise
            else:
                os.rename(tmp, target)
            tmp = None
    finally:
        for leftover in (tmp, old):
            if leftover is not None:
                shutil.rmtree(leftover, ignore_errors=True)
    with contextlib.suppress(OSError):
        _fsync(target.parent)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask
