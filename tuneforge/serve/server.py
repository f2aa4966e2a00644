"""`tuneforge serve`: an OpenAI-compatible HTTP API over the serving engine (engine.py).

Endpoints: GET /v1/models; POST /v1/chat/completions (messages rendered with the chat template and system
prompt training used; `stream: true` sends server-sent events); POST /v1/completions (raw text prompt). The
`model` field names the base (its served name) or an adapter. Loopback only unless --host says otherwise;
with an API key (--api-key or TUNEFORGE_API_KEY) every request must carry `Authorization: Bearer KEY`.
Bad requests get an OpenAI-style body {"error": {"message", "type", "param", "code"}} and their status, and
the server keeps serving: malformed JSON (400), unknown model (404), missing or malformed messages (400), a
prompt over --max-prompt-tokens (400, context_length_exceeded), max_tokens over --max-tokens (400), a full
queue (429), a wrong or missing key (401), an unknown path (404); a client that disconnects mid-stream has its
row cancelled.
"""

from __future__ import annotations

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
from tuneforge.serve.engine import Engine, QueueFull, Request

ROLES = ("system", "user", "assistant")
MAX_BODY = 4 * 1024 * 1024


@dataclass
class Limits:
    max_prompt_tokens: int = 4096
    max_tokens: int = 1024
    default_max_tokens: int = 256
    timeout: float = 600.0  # seconds a request may wait for its answer


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
    """What the HTTP handlers call: request checking, prompt encoding and the engine."""

    def __init__(self, engine: Engine, tokenizer, system_prompt: str | None, limits: Limits,
                 api_key: str | None = None):
        self.engine, self.tok, self.system = engine, tokenizer, system_prompt
        self.limits, self.api_key = limits, api_key
        self.created = int(time.time())

    def check_key(self, header: str | None) -> None:
        if not self.api_key:
            return
        given = (header or "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), self.api_key.encode()):
            raise ApiError(401, "Incorrect API key provided" if given else "No API key provided: send "
                           "'Authorization: Bearer KEY'", code="invalid_api_key")

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": n, "object": "model", "created": self.created,
                                            "owned_by": "tuneforge"} for n in self.engine.names]}

    def request(self, body: dict, chat: bool) -> tuple[Request, bool]:
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise ApiError(400, "missing 'model': one of " + ", ".join(self.engine.names), param="model")
        if model not in self.engine.names:
            raise ApiError(404, f"The model '{model}' does not exist; served: {', '.join(self.engine.names)}",
                           param="model", code="model_not_found")
        if body.get("n", 1) != 1:
            raise ApiError(400, "only n=1 is supported", param="n")
        if chat:
            ids = encode_prompts(self.tok, [self._messages(body.get("messages"))], self.system)[0]
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            if not isinstance(prompt, str) or not prompt:
                raise ApiError(400, "'prompt' must be a non-empty string", param="prompt")
            ids = self.tok(prompt, add_special_tokens=False)["input_ids"]
        lim = self.limits
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
        seed = _number(body, "seed", None, 0, 2 ** 63 - 1, True)
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise ApiError(400, "'stream' must be true or false", param="stream")
        return Request(model, ids, int(max_tokens), float(temperature), float(top_p) or 1.0, seed), stream

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

    def submit(self, request: Request) -> Request:
        try:
            return self.engine.submit(request)
        except QueueFull as exc:
            raise ApiError(429, f"the server is busy: {exc}; retry later", type_="rate_limit_error",
                           code="queue_full") from None


def _chunk(rid: str, created: int, model: str, chat: bool, delta: str | None = None, role: bool = False,
           finish: str | None = None) -> dict:
    if chat:
        d = {"role": "assistant", "content": ""} if role else ({"content": delta} if delta is not None else {})
        choice = {"index": 0, "delta": d, "finish_reason": finish}
        return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [choice]}
    choice = {"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}
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

        def do_GET(self):  # noqa: N802 - the http.server name
            def work():
                if self.path.rstrip("/") == "/v1/models":
                    return self._send(200, service.models())
                raise ApiError(404, f"no route {self.path}", code="not_found")
            self._guard(work)

        def do_POST(self):  # noqa: N802
            def work():
                path = self.path.rstrip("/")
                if path not in ("/v1/chat/completions", "/v1/completions"):
                    self._body()  # read it, so the connection stays usable
                    raise ApiError(404, f"no route {self.path}", code="not_found")
                chat = path == "/v1/chat/completions"
                request, stream = service.request(self._body(), chat)
                service.submit(request)
                (self._stream if stream else self._whole)(request, chat)
            self._guard(work)

        def _events(self, request: Request):
            deadline = time.monotonic() + service.limits.timeout
            while True:
                try:
                    event = request.events.get(timeout=max(deadline - time.monotonic(), 0.001))
                except queue.Empty:
                    request.cancelled.set()
                    raise ApiError(504, "the answer took longer than the server's timeout", type_="timeout") from None
                if event[0] == "error":
                    raise ApiError(500, event[1], type_="server_error")
                yield event
                if event[0] == "done":
                    return

        def _whole(self, request: Request, chat: bool) -> None:
            rid, created = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex, int(time.time())
            for event in self._events(request):
                if event[0] == "done":
                    _, finish, usage, text = event
            if chat:
                choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                          "logprobs": None}
                obj = "chat.completion"
            else:
                choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
                obj = "text_completion"
            self._send(200, {"id": rid, "object": obj, "created": created, "model": request.model,
                             "choices": [choice], "usage": usage})

        def _write_chunk(self, payload: dict | str) -> None:
            text = payload if isinstance(payload, str) else json.dumps(payload)
            data = f"data: {text}\n\n".encode()
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()

        def _stream(self, request: Request, chat: bool) -> None:
            rid, created = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex, int(time.time())
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            try:
                if chat:
                    self._write_chunk(_chunk(rid, created, request.model, chat, role=True))
                for event in self._events(request):
                    if event[0] == "delta":
                        self._write_chunk(_chunk(rid, created, request.model, chat, delta=event[1]))
                    else:
                        self._write_chunk(_chunk(rid, created, request.model, chat, finish=event[1]))
                self._write_chunk("[DONE]")
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError, OSError):
                request.cancelled.set()  # the client went away: its row stops decoding
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
