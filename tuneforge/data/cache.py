"""Tokenised-data cache: examples streamed to flat binary files once, then memory-mapped.

A corpus larger than memory is tokenised record by record into flat files; later runs with the same key map
them instead of re-tokenising. The key covers everything that changes the tokens (see `cache_key`). No pickle
anywhere. One split's folder holds:

  ids.bin (int32), mask.bin (uint8)      the tokens and loss mask of every sequence, end to end
  offsets.bin (int64, sequences + 1)     where each sequence starts in ids/mask
  eots.bin (int32), eot_offsets.bin      each sequence's end-of-turn positions (relative to its start)
  meta.json                              statistics and the layout below

Single-sequence examples (clm blocks, sft conversations) need nothing more: sequence i is example i. Examples
of several named sequences (preference, pair, prompt) add:

  examples.bin (int64, examples + 1)     where each example's sequences start in offsets.bin
  roles.bin (uint8, sequences)           each sequence's role id (names in meta.json, in the builder's order)
  prefix.bin (int32, examples)           each example's shared prefix (Example.shared_prefix: a preference
                                         pair's prompt), so packing budgets come from arrays, not a Python loop
  texts.bin, text_offsets.bin (int64)    one JSON object per example (a reference answer, the pair texts), read
                                         one example at a time, so text never has to fit in memory
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tuneforge.data.chat import TokenizedExample
from tuneforge.data.example import Example

# 5: multi-sequence examples keep their shared prefix (prefix.bin; an older entry has none, and packing with the
# prompt shared would count its pairs whole); 4: preference examples keep their margin (from fields the readers used to ignore, so an older entry of the
# same files would serve batches without it); 3: multi-sequence examples, flat end-of-turn files; 2: leading
# assistant turn unsupervised
FORMAT_VERSION = 5


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


# The modules whose code decides what an entry holds (its tokens, masks and build statistics). Their source is
# part of every key, so a changed builder never serves an entry an older one made: FORMAT_VERSION alone was
# bumped by hand and missed a change that only touched the statistics (a stale "truncated_left" on pair data).
CODE_MODULES = ("builders.py", "chat.py", "audit.py", "records.py", "readers.py", "split.py", "example.py",
                "preference.py", "dataset.py", "cache.py")


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> str:
    h = hashlib.sha256()
    here = Path(__file__).parent
    for name in CODE_MODULES:
        path = here / name
        h.update(name.encode() + b"\0" + (path.read_bytes() if path.is_file() else b"") + b"\0")
    return h.hexdigest()[:16]


def cache_key(**parts) -> str:
    blob = json.dumps({"v": FORMAT_VERSION, "code": code_fingerprint(), **parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


EXAMPLE_TYPES = ("tokenized", "example")


class CacheWriter:
    """Append examples to the files of one split's folder. The folder lives inside the temporary folder of a
    whole cache entry (`tuneforge.fsutil.atomic_dir`): the entry appears complete or not at all.

    `example_type` "tokenized" takes TokenizedExample (one sequence each); "example" takes Example, whose
    role ids index `role_names`. Offsets are streamed to disk as they come: memory stays flat."""

    def __init__(self, folder: Path, example_type: str = "tokenized", role_names: Sequence[str] = ("text",)):
        if example_type not in EXAMPLE_TYPES:
            raise ValueError(f"example_type must be one of {EXAMPLE_TYPES}, not {example_type!r}")
        self.folder, self.example_type, self.role_names = Path(folder), example_type, tuple(role_names)
        self.folder.mkdir(parents=True)
        names = ["ids", "mask", "offsets", "eots", "eot_offsets"]
        if example_type == "example":
            names += ["examples", "roles", "prefix", "texts", "text_offsets"]
        self._files = {n: open(self.folder / f"{n}.bin", "wb") for n in names}
        self._tokens = self._eot_count = self._sequences = self._text_bytes = 0
        self.examples = 0
        for n in ("offsets", "eot_offsets", "examples", "text_offsets"):
            if n in self._files:
                self._files[n].write(_int64(0))

    def add(self, ex) -> None:
        if self.example_type == "tokenized":
            if not isinstance(ex, TokenizedExample):
                raise TypeError(f"a single-sequence cache takes TokenizedExample, not {type(ex).__name__}")
            self._add_sequence(ex)
        else:
            if not isinstance(ex, Example):
                raise TypeError(f"a multi-sequence cache takes Example, not {type(ex).__name__}")
            for seq in ex.sequences:
                self._add_sequence(seq)
            self._files["roles"].write(np.asarray(ex.roles, dtype=np.uint8).tobytes())
            self._files["examples"].write(_int64(self._sequences))
            self._files["prefix"].write(np.int32(ex.shared_prefix).tobytes())
            if ex.texts:
                blob = json.dumps(ex.texts, ensure_ascii=False).encode()
                self._files["texts"].write(blob)
                self._text_bytes += len(blob)
            self._files["text_offsets"].write(_int64(self._text_bytes))
        self.examples += 1

    def _add_sequence(self, seq: TokenizedExample) -> None:
        self._files["ids"].write(np.asarray(seq.input_ids, dtype=np.int32).tobytes())
        self._files["mask"].write(np.asarray(seq.loss_mask, dtype=np.uint8).tobytes())
        self._files["eots"].write(np.asarray(seq.eot_positions, dtype=np.int32).tobytes())
        self._tokens += len(seq.input_ids)
        self._eot_count += len(seq.eot_positions)
        self._sequences += 1
        self._files["offsets"].write(_int64(self._tokens))
        self._files["eot_offsets"].write(_int64(self._eot_count))

    def finish(self, meta: dict) -> None:
        for f in self._files.values():
            f.close()
        layout = {"example_type": self.example_type, "role_names": list(self.role_names),
                  "examples": self.examples, "sequences": self._sequences, "tokens": self._tokens}
        (self.folder / "meta.json").write_text(json.dumps({**meta, "layout": layout}, indent=1))


def _int64(value: int) -> bytes:
    return np.int64(value).tobytes()


def _map(path: Path, dtype) -> np.ndarray:
    """Memory-map a flat file; an empty one (np.memmap refuses size 0) becomes an empty array."""
    if path.stat().st_size == 0:
        return np.zeros(0, dtype)
    return np.memmap(path, dtype=dtype, mode="r")


class CachedExamples(Sequence):
    """A read-only sequence of examples backed by memory-mapped files: TokenizedExample for single-sequence
    data, Example for multi-sequence data (see the module docstring)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.meta = json.loads((self.folder / "meta.json").read_text())
        layout = self.meta["layout"]
        self.example_type, self.role_names = layout["example_type"], tuple(layout["role_names"])
        f = self.folder
        self._ids, self._mask = _map(f / "ids.bin", np.int32), _map(f / "mask.bin", np.uint8)
        self._offsets = _map(f / "offsets.bin", np.int64)
        self._eots, self._eot_offsets = _map(f / "eots.bin", np.int32), _map(f / "eot_offsets.bin", np.int64)
        if self.example_type == "example":
            self._examples, self._roles = _map(f / "examples.bin", np.int64), _map(f / "roles.bin", np.uint8)
            self._prefix = _map(f / "prefix.bin", np.int32)
            self._texts, self._text_offsets = _map(f / "texts.bin", np.uint8), _map(f / "text_offsets.bin", np.int64)
        else:  # sequence i is example i
            self._examples = None

    @staticmethod
    def exists(folder: Path) -> bool:
        return (Path(folder) / "meta.json").exists()

    def __len__(self) -> int:
        return len(self._offsets) - 1 if self._examples is None else len(self._examples) - 1

    def _sequence_range(self, i: int) -> tuple[int, int]:
        if self._examples is None:
            return i, i + 1
        return int(self._examples[i]), int(self._examples[i + 1])

    def length(self, i: int) -> int:
        """Total tokens of example i (all its sequences): what batching by length and packing need."""
        first, end = self._sequence_range(i)
        return int(self._offsets[end] - self._offsets[first])

    def lengths(self, share_prompt: bool = False) -> list[int]:
        """Every example's `length`, from the offsets at once (packing and length grouping read them all); with
        `share_prompt`, its `Example.packed_length` (the shared prefix counted once), from prefix.bin."""
        if self._examples is None:
            return np.diff(np.asarray(self._offsets)).tolist()
        examples = np.asarray(self._examples)
        total = np.diff(np.asarray(self._offsets)[examples])
        if share_prompt:
            total = total - np.asarray(self._prefix, dtype=np.int64) * (np.diff(examples) - 1)
        return total.tolist()

    def num_sequences(self, i: int) -> int:
        first, end = self._sequence_range(i)
        return end - first

    def _sequence(self, s: int) -> TokenizedExample:
        a, b = int(self._offsets[s]), int(self._offsets[s + 1])
        eots = self._eots[int(self._eot_offsets[s]):int(self._eot_offsets[s + 1])].tolist()
        return TokenizedExample(self._ids[a:b].tolist(), self._mask[a:b].tolist(), None, eots)

    def texts(self, i: int) -> dict | None:
        """The text kept with example i (None for single-sequence data, or when its builder keeps none)."""
        if self._examples is None:
            return None
        a, b = int(self._text_offsets[i]), int(self._text_offsets[i + 1])
        return json.loads(self._texts[a:b].tobytes().decode()) if b > a else None

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"example {i} out of range ({len(self)} examples)")
        if self._examples is None:
            return self._sequence(i)
        first, end = self._sequence_range(i)
        return Example([self._sequence(s) for s in range(first, end)], self._roles[first:end].tolist(),
                       self.role_names, self.texts(i), shared_prefix=int(self._prefix[i]))


def entry_complete(entry: Path) -> bool:
    """A cache entry (train + eval + its own meta.json, written last) is usable only when whole."""
    return (Path(entry) / "meta.json").exists()
