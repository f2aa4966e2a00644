"""Crash-safe writes: a failure part-way leaves the previous folder or file whole and no temporary behind."""

from __future__ import annotations

import errno
import os

import pytest

from tuneforge import fsutil
from tuneforge.fsutil import atomic_dir, atomic_write_text


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_atomic_dir_failure_keeps_the_old_folder_and_removes_the_temporary(tmp_path, monkeypatch):
    final = tmp_path / "out"
    with atomic_dir(final) as tmp:
        (tmp / "a.txt").write_text("old")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.txt").write_text("old")
    monkeypatch.setattr(fsutil.os, "fsync", _no_space)  # the disk fills up while the new folder is synced
    with pytest.raises(OSError, match="No space left"), atomic_dir(final) as tmp:
        (tmp / "a.txt").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (final / "a.txt").read_text() == "old" and (final / "sub" / "b.txt").read_text() == "old"


def test_atomic_dir_replaces_a_complete_folder(tmp_path):
    final = tmp_path / "out"
    for text in ("old", "new"):
        with atomic_dir(final) as tmp:
            (tmp / "a.txt").write_text(text)
    assert (final / "a.txt").read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_atomic_write_text_failure_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    atomic_write_text(path, '{"old": 1}')
    monkeypatch.setattr(fsutil.os, "fsync", _no_space)
    with pytest.raises(OSError, match="No space left"):
        atomic_write_text(path, '{"new": 2}')
    assert path.read_text() == '{"old": 1}' and [p.name for p in tmp_path.iterdir()] == ["results.json"]
    monkeypatch.undo()
    atomic_write_text(path, '{"new": 2}')
    assert path.read_text() == '{"new": 2}'
