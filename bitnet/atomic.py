"""Atomic file writes: a crash at any point leaves either the old file or the new one.

Every write goes to a temporary file in the same folder, is fsynced, then renamed into place
(os.replace), and the folder is fsynced; on an error the temporary file is removed.
"""

from __future__ import annotations

import errno as _errno
import os
import re
import shutil
import tempfile

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file


class SaveError(RuntimeError):
    """A write that failed (disk full, quota, permissions, ...): one line naming the file, its
    folder, the bytes it needed and the bytes free; no partial file is left behind and the file it
    would have replaced is untouched. `errno` holds the OS error number (errno.ENOSPC for a full disk)."""

    def __init__(self, message: str, errno: int | None = None, path: str | None = None):
        super().__init__(message)
        self.errno, self.path = errno, path


def human(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def free_bytes(folder: str) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def _os_error(e: BaseException) -> tuple[int | None, str] | None:
    """(errno, reason) of an OSError, or of a SafetensorError that wraps one ("... (os error 28)")."""
    if isinstance(e, OSError):
        return e.errno, e.strerror or str(e)
    if isinstance(e, SafetensorError):
        m = re.search(r"os error (\d+)", str(e)) or re.search(r"code: (\d+)", str(e))
        if m:
            code = int(m.group(1))
            return code, os.strerror(code)
    return None


def save_error(path: str, e: BaseException, size: int | None) -> SaveError | None:
    """The SaveError for `e` raised while writing `path`, or None when `e` is not an OS error."""
    got = _os_error(e)
    if got is None:
        return None
    code, reason = got
    folder = os.path.dirname(os.path.abspath(path))
    free = free_bytes(folder)
    full = " (disk full)" if code in (_errno.ENOSPC, _errno.EDQUOT) else ""
    return SaveError(f"could not write {os.path.basename(path)} in {folder}: {reason}{full}; it needs "
                     f"{human(size)}, {human(free)} free there; no partial file was left and the previous "
                     f"{os.path.basename(path)} (if any) is untouched", code, path)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temp_name(path: str) -> str:
    d, base = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=".tmp", dir=d)
    os.close(fd)
    return tmp


def _fsync_file(path: str) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def atomic_write(path: str, write, size: int | None = None) -> None:
    """Call write(temporary path), fsync the file, rename it to `path`: a crash at any point leaves
    either the old file or the new one, never a part of one (and no temporary file on an error).
    An OS error (a full disk: ENOSPC, also inside safetensors) becomes a SaveError naming the file,
    the folder, `size` (the bytes the file needs) and the bytes free."""
    try:
        tmp = _temp_name(path)
    except OSError as e:
        raise save_error(path, e, size) from None
    try:
        write(tmp)
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            try:
                os.remove(tmp)
            except OSError:
                pass
        err = save_error(path, e, size) if isinstance(e, Exception) else None
        if err is not None:
            raise err from e
        raise
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def atomic_write_bytes(path: str, data: bytes) -> None:
    def write(tmp):
        fd = os.open(tmp, os.O_WRONLY | os.O_TRUNC)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)

    atomic_write(path, write, len(data))


def safetensors_size(tensors: dict[str, torch.Tensor]) -> int:
    """Bytes of a safetensors file of `tensors` (data plus an estimate of the JSON header)."""
    return sum(t.numel() * t.element_size() + len(k) + 80 for k, t in tensors.items()) + 8


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str] | None = None) -> None:
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt", **(metadata or {})}),
                 safetensors_size(tensors))
