"""Crash-safe file writes: a reader sees the old file or the complete new one, never a torn one.

``atomic_write_bytes(path, data)`` writes to a temporary file in the same directory, flushes and
``fsync``s it, renames it over ``path`` (atomic on POSIX within one file system) and ``fsync``s
the directory so the rename itself survives a power loss. On any failure the temporary file is
removed and ``path`` is untouched.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from veil.errors import InputError

__all__ = ["TEMP_SUFFIX", "atomic_write_bytes", "atomic_write_text", "fsync_dir", "stale_temp_files"]

TEMP_SUFFIX = ".veil-tmp"


def fsync_dir(directory: Path) -> None:
    """fsync a directory so a rename/create inside it is durable (no-op where unsupported)."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
    try:
        fd = os.open(directory, flags)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        with contextlib.suppress(OSError):  # some file systems refuse fsync on directories
            os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes | bytearray | memoryview, *,
                       mode: int = 0o644, make_parents: bool = True) -> Path:
    """Atomically replace ``path`` with ``data``; returns the path.

    ``mode`` is applied to the new file before it becomes visible (use ``0o600`` for secrets).
    Raises :class:`InputError` when the target is a directory or cannot be written.
    """
    target = Path(path)
    if target.is_dir():
        raise InputError(f"cannot write {target}: it is a directory")
    parent = target.parent
    try:
        if make_parents:
            parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=TEMP_SUFFIX, dir=parent)
    except OSError as exc:
        raise InputError(f"cannot write {target}: {exc}") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), mode)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise InputError(f"cannot write {target}: {exc}") from None
        raise
    fsync_dir(parent)
    return target


def atomic_write_text(path: str | os.PathLike[str], text: str, *, encoding: str = "utf-8",
                      mode: int = 0o644, make_parents: bool = True) -> Path:
    """Atomically replace ``path`` with ``text`` encoded as ``encoding``; returns the path."""
    return atomic_write_bytes(path, text.encode(encoding), mode=mode, make_parents=make_parents)


def stale_temp_files(directory: str | os.PathLike[str]) -> list[Path]:
    """Temporary files left in ``directory`` by writes that were killed before the rename."""
    d = Path(directory)
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if p.name.startswith(".") and p.name.endswith(TEMP_SUFFIX))
