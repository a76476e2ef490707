"""Atomic writes: whatever fails or crashes, and wherever, a folder or JSON file is the old version or the new one."""

import json
import os
import shutil
import sys

import pytest

from trl_tms import atomic
from trl_tms.atomic import atomic_folder, recover_folder, write_json_atomically

OLD = {"a.txt": "old a", "b.txt": "old b", "sub/c.txt": "old c"}
NEW = {"a.txt": "new a", "sub/c.txt": "new c", "sub/d.txt": "new d"}
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="os.fork and /proc/self/fd")


def write_tree(folder, files):
    for name, text in files.items():
        os.makedirs(os.path.dirname(os.path.join(folder, name)), exist_ok=True)
        with open(os.path.join(folder, name), "w") as f:
            f.write(text)


def read_tree(folder):
    if not os.path.isdir(folder):
        return None
    tree = {}
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name)) as f:
                tree[os.path.relpath(os.path.join(root, name), folder)] = f.read()
    return tree


def old_folder(tmp_path):
    path = str(tmp_path / "step-1")
    write_tree(path, OLD)
    return path


def write_new(path):
    with atomic_folder(path) as staging:
        write_tree(staging, NEW)


class FailAt:
    """Patch `os.replace`, `shutil.rmtree` and the atomic exchange so that the `at`-th call of any of them fails."""

    def __init__(self, monkeypatch, at, action):
        self.calls, self.at, self.action = 0, at, action
        for owner, name in ((os, "replace"), (shutil, "rmtree"), (atomic, "_exchange")):
            monkeypatch.setattr(owner, name, self.wrap(getattr(owner, name)))

    def wrap(self, real):
        def step(*args, **kwargs):
            self.calls += 1
            if self.calls == self.at:
                self.action()
            return real(*args, **kwargs)

        return step


def steps_of_one_write(tmp_path, monkeypatch, exchange):
    """How many patched calls a full write makes, so that a failure can be injected at each."""
    if not exchange:
        monkeypatch.setattr(atomic, "_renameat2", lambda: None)
    with monkeypatch.context() as patch:
        counter = FailAt(patch, at=0, action=None)
        write_new(old_folder(tmp_path / "count"))
    assert read_tree(str(tmp_path / "count" / "step-1")) == NEW
    return counter.calls


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "aside"])
def test_a_failure_at_any_step_leaves_a_complete_folder(tmp_path, monkeypatch, exchange):
    steps = steps_of_one_write(tmp_path, monkeypatch, exchange)
    assert steps >= (2 if exchange else 3)

    def fail():
        raise OSError("injected")

    for at in range(1, steps + 1):
        path = old_folder(tmp_path / str(at))
        with monkeypatch.context() as patch:
            FailAt(patch, at, fail)
            with pytest.raises(OSError, match="injected"):
                write_new(path)
        assert read_tree(path) in (OLD, NEW), f"failure at step {at}"
        # The next write succeeds and leaves nothing hidden behind but what a failed cleanup could not delete.
        write_new(path)
        assert read_tree(path) == NEW
        assert not os.path.exists(atomic._aside(path))


@linux_only
@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "aside"])
def test_a_crash_at_any_step_leaves_a_complete_folder(tmp_path, monkeypatch, exchange):
    steps = steps_of_one_write(tmp_path, monkeypatch, exchange)
    for at in range(1, steps + 1):
        path = old_folder(tmp_path / str(at))
        child = os.fork()
        if child == 0:  # the process that dies midway, without running any cleanup
            try:
                FailAt(monkeypatch, at, lambda: os._exit(17))
                write_new(path)
            finally:
                os._exit(0)
        _, status = os.waitpid(child, 0)
        assert os.waitstatus_to_exitcode(status) == 17
        if exchange:  # one rename swaps the folders: there is no moment without one
            assert read_tree(path) in (OLD, NEW), f"crash at step {at}"
        recover_folder(path)
        assert read_tree(path) in (OLD, NEW), f"crash at step {at}"
        assert not os.path.exists(atomic._aside(path))


def test_an_error_in_the_block_leaves_the_old_folder_and_no_staging(tmp_path):
    path = old_folder(tmp_path)
    with pytest.raises(ValueError):
        with atomic_folder(path) as staging:
            write_tree(staging, NEW)
            raise ValueError("interrupted")
    assert read_tree(path) == OLD
    assert os.listdir(tmp_path) == ["step-1"]


def test_recover_folder_moves_a_stranded_old_folder_back_or_deletes_a_stale_one(tmp_path):
    path = str(tmp_path / "step-1")
    write_tree(atomic._aside(path), OLD)
    recover_folder(path)
    assert read_tree(path) == OLD and os.listdir(tmp_path) == ["step-1"]
    write_tree(atomic._aside(path), {"a.txt": "half"})
    recover_folder(path)
    assert read_tree(path) == OLD and os.listdir(tmp_path) == ["step-1"]


def fsynced_paths(monkeypatch):
    synced = []
    real = os.fsync

    def fsync(fd):
        synced.append(os.path.realpath(os.readlink(f"/proc/self/fd/{fd}")))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return synced


@linux_only
def test_atomic_folder_flushes_every_file_and_the_folders(tmp_path, monkeypatch):
    path = old_folder(tmp_path)
    synced = fsynced_paths(monkeypatch)
    with atomic_folder(path) as staging:
        write_tree(staging, NEW)
    staged = {os.path.relpath(p, os.path.realpath(staging)) for p in synced if p.startswith(os.path.realpath(staging))}
    # The staged files and folders, flushed before the swap, under the name they had then.
    assert {"a.txt", "sub/c.txt", "sub/d.txt", "sub", "."} <= staged
    assert os.path.realpath(tmp_path) in synced  # the folder that holds the rename


@linux_only
def test_write_json_flushes_the_file_and_its_folder_under_a_unique_name(tmp_path, monkeypatch):
    path = str(tmp_path / "run.json")
    synced = fsynced_paths(monkeypatch)
    staged = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (staged.append(src), real_replace(src, dst)))
    write_json_atomically(path, {"step": 1})
    write_json_atomically(path, {"step": 2})
    with open(path) as f:
        assert json.load(f) == {"step": 2}
    assert len(set(staged)) == 2 and all(os.path.basename(s).startswith(".run.json-") for s in staged)
    assert os.path.realpath(staged[0]) in synced and os.path.realpath(str(tmp_path)) in synced
    assert oct(os.stat(path).st_mode & 0o777) == oct(0o666 & ~current_umask())


def current_umask():
    umask = os.umask(0)
    os.umask(umask)
    return umask


def test_a_failed_json_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = str(tmp_path / "run.json")
    write_json_atomically(path, {"step": 1})

    def broken(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(OSError, match="disk full"):
        write_json_atomically(path, {"step": 2})
    with open(path) as f:
        assert json.load(f) == {"step": 1}
    assert os.listdir(tmp_path) == ["run.json"]
