"""Tokenised-data cache: examples streamed to flat binary files once, then memory-mapped.

A corpus larger than memory is tokenised record by record into `ids.bin` (int32), `mask.bin` (uint8) and
`offsets.bin` (int64), with JSON metadata; later runs with the same key map the files instead of
re-tokenising. The key covers everything that changes the tokens (see `cache_key`). No pickle anywhere.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tuneforge.data.chat import TokenizedExample

FORMAT_VERSION = 2  # 2: a leading assistant turn no longer supervises the template preamble


def tokenizer_fingerprint(tokenizer) -> str:
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else repr(sorted(tokenizer.get_vocab().items())).encode())
    h.update(repr(getattr(tokenizer, "chat_template", None)).encode())
    h.update(repr(sorted(tokenizer.special_tokens_map.items())).encode())
    return h.hexdigest()


def file_fingerprints(paths) -> list:
    out = []
    for p in paths if isinstance(paths, list) else [paths]:
        if p is None:
            continue
        path = Path(p)
        files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
        for f in files:
            st = f.stat()
            out.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
    return out


def cache_key(**parts) -> str:
    blob = json.dumps({"v": FORMAT_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


class CacheWriter:
    """Append examples to the files of one split's folder. The folder lives inside the temporary folder of a
    whole cache entry (`tuneforge.fsutil.atomic_dir`): the entry appears complete or not at all."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True)
        self._ids = open(self.folder / "ids.bin", "wb")
        self._mask = open(self.folder / "mask.bin", "wb")
        self._offsets = [0]
        self._eots: list[list[int]] = []

    def add(self, ex: TokenizedExample) -> None:
        self._ids.write(np.asarray(ex.input_ids, dtype=np.int32).tobytes())
        self._mask.write(np.asarray(ex.loss_mask, dtype=np.uint8).tobytes())
        self._offsets.append(self._offsets[-1] + len(ex.input_ids))
        self._eots.append(ex.eot_positions)

    def finish(self, meta: dict) -> None:
        self._ids.close()
        self._mask.close()
        np.asarray(self._offsets, dtype=np.int64).tofile(self.folder / "offsets.bin")
        (self.folder / "eots.json").write_text(json.dumps(self._eots))
        (self.folder / "meta.json").write_text(json.dumps(meta, indent=1))


class CachedExamples(Sequence):
    """A read-only sequence of TokenizedExample backed by memory-mapped files."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.meta = json.loads((self.folder / "meta.json").read_text())
        self._offsets = np.fromfile(self.folder / "offsets.bin", dtype=np.int64)
        size = int(self._offsets[-1])
        self._ids = np.memmap(self.folder / "ids.bin", dtype=np.int32, mode="r", shape=(size,)) if size else \
            np.zeros(0, np.int32)
        self._mask = np.memmap(self.folder / "mask.bin", dtype=np.uint8, mode="r", shape=(size,)) if size else \
            np.zeros(0, np.uint8)
        self._eots = json.loads((self.folder / "eots.json").read_text())

    @staticmethod
    def exists(folder: Path) -> bool:
        return (Path(folder) / "meta.json").exists()


    def __len__(self) -> int:
        return len(self._offsets) - 1

    def length(self, i: int) -> int:
        return int(self._offsets[i + 1] - self._offsets[i])

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        a, b = int(self._offsets[i]), int(self._offsets[i + 1])
        return TokenizedExample(self._ids[a:b].tolist(), self._mask[a:b].tolist(), None, self._eots[i])


def entry_complete(entry: Path) -> bool:
    """A cache entry (train + eval + its own meta.json, written last) is usable only when whole."""
    return (Path(entry) / "meta.json").exists()
