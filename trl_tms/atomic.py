"""Folders written atomically: a reader sees the previous folder or the complete new one, never half of one."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile


@contextlib.contextmanager
def atomic_folder(path: str):
    """
    Yield a hidden staging folder beside `path`; when the block succeeds, it replaces `path`. On any error the staging
    folder is removed and `path` is left as it was. Readers skip hidden (`.`-prefixed) folders.
    """
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}-", dir=parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes it owner-only; the result is an ordinary folder
        yield staging
        if os.path.exists(path):
            shutil.rmtree(path)
        os.replace(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_json_atomically(path: str, value) -> None:
    """Write `value` as JSON beside `path` and rename it over: a reader sees the old file or the new, never half."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    staging = f"{path}.tmp"
    with open(staging, "w") as f:
        json.dump(value, f)
    os.replace(staging, path)
