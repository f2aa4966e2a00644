"""`tuneforge serve`: an OpenAI-compatible HTTP API over the serving engine (engine.py).

Endpoints: GET /v1/models; POST /v1/chat/completions (messages rendered with the chat template and system
prompt training used; `stream: true` sends server-sent events; `n` choices; `stop` strings); POST
/v1/completions (raw text prompt); POST /v1/embeddings (embedders: embeddings.py). The `model` field names the
base (its served name), an adapter or an embedder. Loopback only unless --host says otherwise;
with an API key (--api-key or TUNEFORGE_API_KEY) every request must carry `Authorization: Bearer KEY`.
Bad requests get an OpenAI-style body {"error": {"message", "type", "param", "code"}} and their status, and
the server keeps serving: malformed JSON (400), unknown model (404), missing or malformed messages (400), a
prompt over --max-prompt-tokens (400, context_length_exceeded), max_tokens over --max-tokens (400), a full
queue (429), a wrong or missing key (401), an unknown path (404); a client that disconnects mid-stream has its
row cancelled.
"""

from __future__ import annotations

import base64
import hmac
import json
import queue
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tuneforge.errors import TuneforgeError
from tuneforge.eval.generation import encode_prompts
from tuneforge.serve.embeddings import Embedder
from tuneforge.serve.engine import Engine, QueueFull, Request

ROLES = ("system", "user", "assistant")
MAX_BODY = 4 * 1024 * 1024


@dataclass
class Limits:
    max_prompt_tokens: int = 4096
    max_tokens: int = 1024
    default_max_tokens: int = 256
    timeout: float = 600.0  # seconds a request may wait for its answer
    max_n: int = 16  # choices a request may ask for
    max_inputs: int = 2048  # texts one embeddings request may carry (OpenAI's limit)


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.body = status, {"error": {"message": message, "type": type_, "param": param,
                                                    "code": code}}


def _number(body: dict, key: str, default, lo: float, hi: float, integer: bool = False):
    value = body.get(key, default)
    if value is None:
        return default
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not lo <= value <= hi:
        what = "an integer" if integer else "a number"
        raise ApiError(400, f"{key} must be {what} from {lo} to {hi}, got {value!r}", param=key)
    return value


class Service:
    """What the HTTP handlers call: request checking, prompt encoding, the engine (generation; None when only
    embedders are served) and the embedders."""

    def __init__(self, engine: Engine | None, tokenizer, system_prompt: str | None, limits: Limits,
                 api_key: str | None = None, embedders: dict[str, Embedder] | None = None):
        self.engine, self.tok, self.system = engine, tokenizer, system_prompt
        self.limits, self.api_key = limits, api_key
        self.embedders = dict(embedders or {})
        self.created = int(time.time())

    @property
    def names(self) -> list[str]:
        return [*(self.engine.names if self.engine is not None else []), *self.embedders]

    def check_key(self, header: str | None) -> None:
        if not self.api_key:
            return
        given = (header or "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), self.api_key.encode()):
            raise ApiError(401, "Incorrect API key provided" if given else "No API key provided: send "
                           "'Authorization: Bearer KEY'", code="invalid_api_key")

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": n, "object": "model", "created": self.created,
                                            "owned_by": "tuneforge"} for n in self.names]}

    def _model(self, body, embedding: bool) -> str:
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise ApiError(400, "missing 'model': one of " + ", ".join(self.names), param="model")
        if model not in self.names:
            raise ApiError(404, f"The model '{model}' does not exist; served: {', '.join(self.names)}",
                           param="model", code="model_not_found")
        if embedding and model not in self.embedders:
            raise ApiError(400, f"'{model}' generates text, it is not an embedding model; embedders served: "
                           f"{', '.join(self.embedders) or 'none'}", param="model")
        if not embedding and model in self.embedders:
            raise ApiError(400, f"'{model}' is an embedding model: POST /v1/embeddings", param="model")
        return model

    def request(self, body: dict, chat: bool) -> tuple[list[Request], bool]:
        """The request's choices (n Requests sharing one event queue) and whether it streams."""
        model = self._model(body, embedding=False)
        lim = self.limits
        n = _number(body, "n", 1, 1, lim.max_n, True)
        if chat:
            ids = encode_prompts(self.tok, [self._messages(body.get("messages"))], self.system)[0]
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            if not isinstance(prompt, str) or not prompt:
                raise ApiError(400, "'prompt' must be a non-empty string", param="prompt")
            ids = self.tok(prompt, add_special_tokens=False)["input_ids"]
        if len(ids) > lim.max_prompt_tokens:
            raise ApiError(400, f"the prompt is {len(ids)} tokens, over this server's limit of "
                           f"{lim.max_prompt_tokens} (--max-prompt-tokens)", param="messages" if chat else "prompt",
                           code="context_length_exceeded")
        key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > lim.max_tokens:
            raise ApiError(400, f"{key} is {value}, over this server's limit of {lim.max_tokens} (--max-tokens)",
                           param=key)
        max_tokens = _number(body, key, min(lim.default_max_tokens, lim.max_tokens), 1, lim.max_tokens, True)
        temperature = _number(body, "temperature", 0.0, 0.0, 2.0)
        top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
        seed = _number(body, "seed", None, 0, 2 ** 63 - 1 - lim.max_n, True)
        stop = self._stop(body.get("stop"))
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise ApiError(400, "'stream' must be true or false", param="stream")
        events: queue.Queue = queue.Queue()
        return [Request(model, ids, int(max_tokens), float(temperature), float(top_p) or 1.0,
                        None if seed is None else seed + i, stop, i, events) for i in range(n)], stream

    @staticmethod
    def _stop(stop) -> tuple[str, ...]:
        if stop is None:
            return ()
        stops = [stop] if isinstance(stop, str) else stop
        if (not isinstance(stops, list) or not 1 <= len(stops) <= 4
                or not all(isinstance(x, str) and x for x in stops)):
            raise ApiError(400, "'stop' must be a non-empty string or a list of 1 to 4 of them", param="stop")
        return tuple(stops)

    def embeddings(self, body: dict) -> dict:
        """The /v1/embeddings answer: every input's vector (float list, or base64 of little-endian float32)."""
        model = self._model(body, embedding=True)
        embedder, lim = self.embedders[model], self.limits
        inputs = body.get("input")
        if isinstance(inputs, str) or (isinstance(inputs, list) and inputs and all(
                isinstance(x, int) and not isinstance(x, bool) for x in inputs)):
            inputs = [inputs]  # one text, or one text's token ids
        if not isinstance(inputs, list) or not inputs:
            raise ApiError(400, "'input' must be a string, a list of strings, or token ids", param="input")
        if len(inputs) > lim.max_inputs:
            raise ApiError(400, f"'input' holds {len(inputs)} texts, over this server's limit of {lim.max_inputs}",
                           param="input")
        input_type = body.get("input_type")
        if input_type is not None and input_type not in ("query", "document"):
            raise ApiError(400, "'input_type' must be 'query' or 'document' (the embedder's prompts: "
                           f"{', '.join(embedder.prompts) or 'none'})", param="input_type")
        encoding = body.get("encoding_format", "float")
        if encoding not in ("float", "base64"):
            raise ApiError(400, "'encoding_format' must be 'float' or 'base64'", param="encoding_format")
        dimensions = body.get("dimensions")
        if dimensions is not None and dimensions != embedder.dim:
            raise ApiError(400, f"{model} gives {embedder.dim}-dimensional vectors; it was not trained to be cut "
                           f"to {dimensions!r} (leave out 'dimensions')", param="dimensions")
        vocab, sequences = len(embedder.tokenizer), []
        for i, x in enumerate(inputs):
            if isinstance(x, str):
                if not x.strip():
                    raise ApiError(400, f"input[{i}] is empty", param=f"input[{i}]")
                ids, sent = embedder.tokens(x, input_type)
            elif isinstance(x, list) and x and all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab
                                                   for t in x):
                ids, sent = x[:embedder.max_length], len(x)  # cut at the embedder's length, as a text is
            else:
                raise ApiError(400, f"input[{i}] must be a non-empty string or a list of token ids", param=f"input[{i}]")
            if sent > lim.max_prompt_tokens:
                raise ApiError(400, f"input[{i}] is {sent} tokens, over this server's limit of "
                               f"{lim.max_prompt_tokens} (--max-prompt-tokens)", param=f"input[{i}]",
                               code="context_length_exceeded")
            sequences.append(ids)
        vectors = embedder.embed(sequences)
        data = []
        for i, v in enumerate(vectors):
            if encoding == "base64":
                value = base64.b64encode(v.float().numpy().astype("<f4").tobytes()).decode()
            else:
                value = v.tolist()
            data.append({"object": "embedding", "index": i, "embedding": value})
        tokens = sum(len(ids) for ids in sequences)
        return {"object": "list", "data": data, "model": model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    @staticmethod
    def _messages(messages) -> list[dict]:
        if messages is None:
            raise ApiError(400, "missing 'messages': a list of {role, content}", param="messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "'messages' must be a non-empty list of {role, content}", param="messages")
        out = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES:
                raise ApiError(400, f"messages[{i}]: role must be one of {', '.join(ROLES)}",
                               param=f"messages[{i}].role")
            content = m.get("content")
            if isinstance(content, list):  # content parts: the text ones, joined
                if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                    raise ApiError(400, f"messages[{i}].content: only text parts are supported",
                                   param=f"messages[{i}].content")
                content = "".join(str(p.get("text", "")) for p in content)
            if not isinstance(content, str):
                raise ApiError(400, f"messages[{i}].content must be a string", param=f"messages[{i}].content")
            out.append({"role": m["role"], "content": content})
        if out[-1]["role"] == "assistant":
            raise ApiError(400, "the last message is the assistant's: nothing to answer", param="messages")
        return out

    def submit(self, requests: list[Request]) -> list[Request]:
        """Every choice of a request queued, or none (a full queue: 429, the ones already queued cancelled)."""
        done = []
        try:
            for r in requests:
                done.append(self.engine.submit(r))
        except QueueFull as exc:
            for r in done:
                r.cancelled.set()
            raise ApiError(429, f"the server is busy: {exc}; retry later", type_="rate_limit_error",
                           code="queue_full") from None
        return requests


def _chunk(rid: str, created: int, model: str, chat: bool, index: int = 0, delta: str | None = None,
           role: bool = False, finish: str | None = None) -> dict:
    if chat:
        d = {"role": "assistant", "content": ""} if role else ({"content": delta} if delta is not None else {})
        choice = {"index": index, "delta": d, "finish_reason": finish}
        return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [choice]}
    choice = {"index": index, "text": delta or "", "finish_reason": finish, "logprobs": None}
    return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [choice]}


def make_handler(service: Service):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "tuneforge"

        def log_message(self, format, *args):  # noqa: A002 - quiet: one line per request would flood the terminal
            pass

        def _send(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _body(self) -> dict:
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                raise ApiError(400, "bad Content-Length") from None
            if length > MAX_BODY:
                raise ApiError(413, f"the request body is over {MAX_BODY} bytes")
            raw = self.rfile.read(length) if length else b""
            try:
                return json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise ApiError(400, f"could not parse the JSON body: {exc}") from None

        def _guard(self, work) -> None:
            try:
                service.check_key(self.headers.get("Authorization"))
                work()
            except ApiError as exc:
                self._send(exc.status, exc.body)
            except (BrokenPipeError, ConnectionResetError):
                pass
            except TuneforgeError as exc:
                self._send(400, ApiError(400, str(exc)).body)
            except Exception as exc:  # noqa: BLE001 - one request failed: it gets a 500, the server goes on
                self._send(500, ApiError(500, f"{type(exc).__name__}: {exc}", type_="server_error").body)

        def do_GET(self):  # noqa: N802 - the http.server name
            def work():
                if self.path.rstrip("/") == "/v1/models":
                    return self._send(200, service.models())
                raise ApiError(404, f"no route {self.path}", code="not_found")
            self._guard(work)

        def do_POST(self):  # noqa: N802
            def work():
                path = self.path.rstrip("/")
                if path == "/v1/embeddings":
                    return self._send(200, service.embeddings(self._body()))
                if path not in ("/v1/chat/completions", "/v1/completions"):
                    self._body()  # read it, so the connection stays usable
                    raise ApiError(404, f"no route {self.path}", code="not_found")
                chat = path == "/v1/chat/completions"
                requests, stream = service.request(self._body(), chat)
                service.submit(requests)
                (self._stream if stream else self._whole)(requests, chat)
            self._guard(work)

        def _events(self, requests: list[Request]):
            """The events of a request's choices as they come, until every choice is done."""
            deadline = time.monotonic() + service.limits.timeout
            events, left = requests[0].events, len(requests)
            while left:
                try:
                    event = events.get(timeout=max(deadline - time.monotonic(), 0.001))
                except queue.Empty:
                    for r in requests:
                        r.cancelled.set()
                    raise ApiError(504, "the answer took longer than the server's timeout", type_="timeout") from None
                if event[0] == "error":
                    for r in requests:
                        r.cancelled.set()
                    raise ApiError(500, event[2], type_="server_error")
                left -= event[0] == "done"
                yield event

        def _whole(self, requests: list[Request], chat: bool) -> None:
            rid, created = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex, int(time.time())
            ends = {}
            for event in self._events(requests):
                if event[0] == "done":
                    ends[event[1]] = event[2:]
            choices, completion = [], 0
            for i in range(len(requests)):
                finish, usage, text = ends[i]
                completion += usage["completion_tokens"]
                if chat:
                    choices.append({"index": i, "message": {"role": "assistant", "content": text},
                                    "finish_reason": finish, "logprobs": None})
                else:
                    choices.append({"index": i, "text": text, "finish_reason": finish, "logprobs": None})
            prompt = len(requests[0].prompt_ids)
            usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
            self._send(200, {"id": rid, "object": "chat.completion" if chat else "text_completion",
                             "created": created, "model": requests[0].model, "choices": choices, "usage": usage})

        def _write_chunk(self, payload: dict | str) -> None:
            text = payload if isinstance(payload, str) else json.dumps(payload)
            data = f"data: {text}\n\n".encode()
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()

        def _stream(self, requests: list[Request], chat: bool) -> None:
            rid, created = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex, int(time.time())
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            model = requests[0].model
            try:
                if chat:
                    for r in requests:
                        self._write_chunk(_chunk(rid, created, model, chat, r.index, role=True))
                for event in self._events(requests):
                    if event[0] == "delta":
                        self._write_chunk(_chunk(rid, created, model, chat, event[1], delta=event[2]))
                    else:
                        self._write_chunk(_chunk(rid, created, model, chat, event[1], finish=event[2]))
                self._write_chunk("[DONE]")
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError, OSError):
                for r in requests:
                    r.cancelled.set()  # the client went away: its rows stop decoding
                self.close_connection = True
            except ApiError as exc:  # headers are sent: the error travels as an event
                self._write_chunk({"error": exc.body["error"]})
                self.wfile.write(b"0\r\n\r\n")

    return Handler


class Server:
    """A running server: `url`, `close()`. `port=0` picks a free port."""

    def __init__(self, service: Service, host: str = "127.0.0.1", port: int = 8000):
        self.service = service
        self.httpd = ThreadingHTTPServer((host, port), make_handler(service))
        self.httpd.daemon_threads = True
        self.host, self.port = self.httpd.server_address[:2]
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="tuneforge-serve-http", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def start(self) -> Server:
        self.thread.start()
        return self

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self.service.engine is not None:
            self.service.engine.close()


def load_served(base: str, adapters: list[tuple[str, str]], base_name: str | None = None, threads: int | None = None):
    """(model, tokenizer, {served name: adapter name}, base's served name): the base loaded once, every
    adapter loaded on it under its served name."""
    import torch

    from tuneforge.adapters.lora import load_adapter
    from tuneforge.config.schema import RunConfig
    from tuneforge.run import load_model_and_tokenizer
    if threads:
        torch.set_num_threads(threads)
    cfg = RunConfig.model_validate({"model": {"name": base}})
    model, tokenizer = load_model_and_tokenizer(cfg)
    names = {}
    for name, folder in adapters:
        if name in names or name == (base_name or base):
            raise TuneforgeError(f"two models are served as {name!r}: give each --adapter its own NAME=DIR")
        model = load_adapter(model, folder, adapter_name=name)
        names[name] = name
    model.eval()
    return model, tokenizer, names, base_name or _short(base)


def _short(base: str) -> str:
    from pathlib import Path
    return Path(base).name if ("/" in base or "\\" in base) and Path(base).exists() else base
