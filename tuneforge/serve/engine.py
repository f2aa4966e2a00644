"""The serving engine: one base model, several LoRA adapters loaded on it, requests batched together.

One worker thread owns the model. Requests wait in a bounded queue; the worker takes the first, waits
`batch_wait` seconds for more, and decodes up to `max_batch` of them in one batch through the one decoding core
(eval/generation.py `sample_completions`: left padding, KV cache, stop at end of turn), each row through its own
adapter (PEFT's mixed-adapter batches; the base's rows through none). Requests that sample with other settings
than the first's wait for the next batch (one temperature and top-p a batch). Every new token is decoded and
handed to its request's event queue as it comes (streaming); a request whose client went away is cancelled
and its row stops; so does a row whose text reached one of its `stop` strings (the text is cut before it, and
a streamed delta never shows the start of a stop string that may yet complete). Greedy rows decode exactly as
`tuneforge generate` does: the same prompt rendering and the same core.

A request's `n` choices are `n` Requests sharing one event queue, each with its `index`; they have the same
sampling settings, so they are decoded in one batch.
"""

from __future__ import annotations

import itertools
import queue
import random
import threading
import time
from dataclasses import dataclass, field

import torch

from tuneforge.errors import TuneforgeError
from tuneforge.eval.generation import BASE_ADAPTER, sample_completions, stop_token_ids


class QueueFull(TuneforgeError):
    """More requests are waiting than the queue holds."""


@dataclass
class Request:
    """One completion to decode. Events on `events`, each tagged with the request's `index` (its choice):
    ("delta", index, text), then ("done", index, finish_reason, usage, text) or ("error", index, message)."""

    model: str
    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    index: int = 0
    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    tokens: list[int] = field(default_factory=list)
    stop_hit: threading.Event = field(default_factory=threading.Event)  # its text reached a stop string

    @property
    def sampling(self) -> tuple:
        return (False, 0.0, 1.0) if self.temperature <= 0 else (True, float(self.temperature), float(self.top_p))


class _Stream:
    """Incremental detokenisation of one row: the text so far, handed out as deltas (leading whitespace held
    back, as `generate` strips it; a partial UTF-8 character held until it completes; the end of the text held
    while it is the start of a stop string). At a stop string the text is cut before it and the row is done."""

    def __init__(self, tokenizer, request: Request):
        self.tok, self.request, self.sent = tokenizer, request, ""

    def _text(self) -> str:
        text = self.tok.decode(self.request.tokens, skip_special_tokens=True).lstrip()
        cuts = [i for i in (text.find(s) for s in self.request.stop) if i >= 0]
        if cuts:
            self.request.stop_hit.set()
            return text[:min(cuts)]
        return text

    def _held(self, text: str) -> int:
        """How many characters at the end of `text` could begin a stop string."""
        return max((k for s in self.request.stop for k in range(min(len(s) - 1, len(text)), 0, -1)
                    if text.endswith(s[:k])), default=0)

    def _send(self, text: str) -> None:
        if len(text) > len(self.sent) and text.startswith(self.sent):
            self.request.events.put(("delta", self.request.index, text[len(self.sent):]))
            self.sent = text

    def push(self, token: int) -> None:
        if self.request.stop_hit.is_set():
            return
        self.request.tokens.append(token)
        text = self._text()
        if self.request.stop_hit.is_set():
            return self._send(text)
        if text.endswith("\ufffd"):
            return
        self._send(text[:len(text) - self._held(text)])

    def flush(self) -> str:
        """The rest of the text (a character still incomplete at the end included); the whole answer,
        stripped as `generate` strips it."""
        text = self._text() if not self.request.stop_hit.is_set() else self.sent
        self._send(text)
        return text.strip()


class Engine:
    """`model`: the base, with every adapter in `adapters` (served name -> PEFT adapter name) loaded on it;
    `base_name`: the name requests use for the base alone."""

    def __init__(self, model, tokenizer, adapters: dict[str, str], base_name: str, max_batch: int = 16,
                 max_queue: int = 64, batch_wait: float = 0.05):
        self.model, self.tok = model, tokenizer
        self.adapters, self.base_name = dict(adapters), base_name
        self.max_batch, self.batch_wait = max_batch, batch_wait
        self.stops = stop_token_ids(tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stops[0]
        self.pending: queue.Queue = queue.Queue(maxsize=max_queue)
        self.held: list[Request] = []  # taken from the queue but waiting for a batch of their sampling settings
        self.stats = {"batches": 0, "rows": 0, "tokens": 0, "max_rows": 0}
        self._stop = threading.Event()
        self._seeds = itertools.count(random.SystemRandom().randrange(1 << 30))
        self.worker = threading.Thread(target=self._loop, name="tuneforge-serve-engine", daemon=True)
        self.worker.start()

    @property
    def names(self) -> list[str]:
        return [self.base_name, *self.adapters]

    def submit(self, request: Request) -> Request:
        if request.model not in self.names:
            raise TuneforgeError(f"unknown model {request.model!r}")
        try:
            self.pending.put_nowait(request)
        except queue.Full:
            raise QueueFull(f"{self.pending.maxsize} requests are already waiting") from None
        return request

    def close(self) -> None:
        self._stop.set()
        self.worker.join(timeout=5)

    # ------------------------------------------------------------------------------------------ worker

    def _take(self) -> list[Request]:
        if self.held:
            first = self.held.pop(0)
        else:
            try:
                first = self.pending.get(timeout=0.2)
            except queue.Empty:
                return []
        batch, deadline = [first], time.monotonic() + self.batch_wait
        keep = []
        for r in self.held:  # held requests first, in arrival order
            (batch if r.sampling == first.sampling and len(batch) < self.max_batch else keep).append(r)
        self.held = keep
        # a sliding window: go on collecting while requests keep arriving within batch_wait of each other
        # (clients answered by the last batch send their next request together), for 5 x batch_wait at most
        limit = time.monotonic() + 5 * self.batch_wait
        while len(batch) < self.max_batch:
            left = min(deadline, limit) - time.monotonic()
            try:
                r = self.pending.get(timeout=left) if left > 0 else self.pending.get_nowait()
            except queue.Empty:
                break
            (batch if r.sampling == first.sampling else self.held).append(r)
            deadline = time.monotonic() + self.batch_wait
        return [r for r in batch if not r.cancelled.is_set()]

    def _loop(self) -> None:
        while not self._stop.is_set():
            batch = self._take()
            if not batch:
                continue
            try:
                self._decode(batch)
            except Exception as exc:  # noqa: BLE001 - every waiting client gets the message, the server goes on
                for r in batch:
                    r.events.put(("error", r.index, f"{type(exc).__name__}: {exc}"))

    def _decode(self, batch: list[Request]) -> None:
        streams = [_Stream(self.tok, r) for r in batch]
        names = [self.adapters.get(r.model, BASE_ADAPTER) for r in batch]
        uniform = len(set(names)) == 1 and names[0] != BASE_ADAPTER
        if uniform:  # one adapter for every row: PEFT's plain forward with it active (fewer kernels a step)
            self.model.set_adapter(names[0])
        sampling, temperature, top_p = batch[0].sampling

        def on_step(tokens: torch.Tensor, live: torch.Tensor):
            for i, (token, alive) in enumerate(zip(tokens.tolist(), live.tolist())):
                if alive:
                    streams[i].push(token)
            ended = [r.cancelled.is_set() or r.stop_hit.is_set() for r in batch]
            return torch.tensor(ended) if any(ended) else None

        seeds = [r.seed if r.seed is not None else next(self._seeds) for r in batch] if sampling else None
        out = sample_completions(self.model, [r.prompt_ids for r in batch], max(r.max_tokens for r in batch),
                                 self.stops, self.pad_id, temperature=temperature or 1.0, top_p=top_p,
                                 do_sample=sampling, seeds=seeds, adapter_names=None if uniform else names,
                                 row_limits=[r.max_tokens for r in batch], on_step=on_step)
        self.stats["batches"] += 1
        self.stats["rows"] += len(batch)
        self.stats["max_rows"] = max(self.stats["max_rows"], len(batch))
        self.stats["tokens"] += out.num_tokens
        for r, s, tokens, stopped in zip(batch, streams, out.tokens, out.stopped):
            usage = {"prompt_tokens": len(r.prompt_ids), "completion_tokens": len(tokens),
                     "total_tokens": len(r.prompt_ids) + len(tokens)}
            text = s.flush()
            finish = "stop" if stopped or r.stop_hit.is_set() else "length"
            r.events.put(("done", r.index, finish, usage, text))
