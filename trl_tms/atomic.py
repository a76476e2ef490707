"""Files and folders written atomically: a reader, or a run that crashed midway, sees the old version or the new one."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import json
import os
import shutil
import sys
import tempfile


def _aside(path: str) -> str:
    """Where `atomic_folder` moves the old folder while the new one takes its place: hidden, so readers skip it."""
    head, name = os.path.split(os.path.abspath(path))
    return os.path.join(head, f".{name}.replaced")


def recover_folder(path: str) -> None:
    """
    Finish or undo a folder swap that `atomic_folder` left halfway (the process died between its two renames).

    If the old folder was moved aside and the new one never took its place, the old one is moved back; if the new one
    did, the leftover old copy is deleted. `atomic_folder` calls this before every write; a reader that must see the
    folder even after such a crash calls it before reading.
    """
    aside = _aside(path)
    if not os.path.isdir(aside):
        return
    if os.path.exists(path):
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(aside, path)
        _fsync_dir(os.path.dirname(aside))


@contextlib.contextmanager
def atomic_folder(path: str):
    """
    Yield a hidden staging folder beside `path`; when the block succeeds, it replaces `path`. On any error the staging
    folder is removed and `path` is left as it was. Readers skip hidden (`.`-prefixed) folders.

    The staged files are flushed to disk before the swap. On Linux the old and new folders are exchanged in one
    atomic rename, so `path` always holds a complete folder. Elsewhere the old folder is first moved aside (hidden),
    and a crash between that rename and the next leaves no `path`: `recover_folder` (run by the next write) moves the
    old folder back.
    """
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    recover_folder(path)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}-", dir=parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes it owner-only; the result is an ordinary folder
        yield staging
        _fsync_tree(staging)
        if os.path.exists(path) and _exchange(staging, path):
            # `staging` now holds the old folder.
            _fsync_dir(parent)
        else:
            _replace_via_aside(staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _replace_via_aside(staging: str, path: str) -> None:
    aside = _aside(path)
    if os.path.exists(path):
        os.replace(path, aside)
    try:
        os.replace(staging, path)
    except BaseException:
        recover_folder(path)
        raise
    _fsync_dir(os.path.dirname(aside))
    # The new folder is in place; a copy of the old one that cannot be deleted now goes at the next write.
    shutil.rmtree(aside, ignore_errors=True)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: str, b: str) -> bool:
    """Swap two existing paths in one atomic rename (Linux `renameat2`); False where the system cannot."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # a file system or kernel without the exchange
        return False
    raise OSError(code, os.strerror(code), a, None, b)


@functools.cache
def _renameat2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):  # a C library older than glibc 2.28
        return None


def _fsync_tree(folder: str) -> None:
    for root, _, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(root)


def _fsync_dir(folder: str) -> None:
    """Make a folder's entries (a rename into it, say) durable; a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a folder; the rename itself is still atomic
        pass
    finally:
        os.close(fd)


def write_json_atomically(path: str, value) -> None:
    """
    Write `value` as JSON to a uniquely named hidden file beside `path`, flush it to disk and rename it over `path`:
    a reader sees the old file or the new, never half, even after a crash.
    """
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    fd, staging = tempfile.mkstemp(prefix=f".{os.path.basename(path)}-", suffix=".tmp", dir=parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o666 & ~umask)  # mkstemp makes it owner-only; the result is an ordinary file
        with os.fdopen(fd, "w") as f:
            json.dump(value, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(staging, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(staging)
        raise
    _fsync_dir(parent)
