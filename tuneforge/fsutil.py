"""Crash-safe file-system writes: a folder is written in a temporary sibling, fsynced, then renamed.

A crash, a full disk or Ctrl-C mid-write must never leave a half-written checkpoint, cache or model folder that
a later load takes for a finished one, and must never remove the previous complete folder first.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path


def fsync_dir(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    for f in folder.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    fsync_dir(folder)


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike):
    """`with atomic_dir(final) as tmp:` write into tmp; on success tmp is fsynced and replaces `final`.

    The swap is two renames on one file system (old -> trash, tmp -> final): readers see the old or the new
    complete folder. On any error the temporary folder is removed and `final` is untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        fsync_tree(tmp)
        trash = None
        if final.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            os.rename(final, trash / "old")
        os.rename(tmp, final)
        fsync_dir(final.parent)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
