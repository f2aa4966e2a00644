"""tuneforge serve: the official openai client against a server on loopback, one tiny base with two adapters.

Greedy answers equal `tuneforge generate` for the base and each adapter; streaming gives the same text;
concurrent requests for different adapters are batched together and none is mixed up; every bad request gets an
OpenAI-style error and its status, and the server goes on serving."""

from __future__ import annotations

import http.client
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import openai
import torch
import pytest

from helpers.lora import lora_model_with_nonzero_b
from tuneforge.cli import main
from tuneforge.serve.engine import Engine
from tuneforge.serve.server import Limits, Server, Service, load_served

PROMPTS = ["Add 2 and 3.", "What is the capital of France?", "Say hello."]
MAX = 8


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    out = {}
    for name, seed in (("alpha", 1), ("beta", 2)):
        model = lora_model_with_nonzero_b(tiny_model_dir, seed=seed)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.data *= 8  # far from the base and from each other
        model.save_pretrained(root / name)
        out[name] = str(root / name)
    return out


def _server(tiny_model_dir, adapters, key=None, limits=None, max_queue=64, start_engine=True):
    model, tok, names, base = load_served(tiny_model_dir, list(adapters.items()), base_name="base")
    engine = Engine(model, tok, names, base, max_batch=8, max_queue=max_queue, batch_wait=0.05)
    if not start_engine:
        engine.close()  # nothing drains the queue
    service = Service(engine, tok, None, limits or Limits(max_prompt_tokens=64, max_tokens=32), key)
    return Server(service, port=0).start()


@pytest.fixture(scope="module")
def server(tiny_model_dir, adapters):
    s = _server(tiny_model_dir, adapters)
    yield s
    s.close()


def client(server, key="unused"):
    return openai.OpenAI(base_url=server.url, api_key=key, max_retries=0, timeout=60)


def chat(c, model, prompt, **kw):
    return c.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                     max_tokens=MAX, temperature=0, **kw)


@pytest.fixture(scope="module")
def generated(tiny_model_dir, adapters):
    """`tuneforge generate`'s greedy replies for the base and each adapter."""
    import contextlib
    import io
    out = {}
    for name, folder in [("base", None), *adapters.items()]:
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            argv = ["generate", "--model", tiny_model_dir, "--max-new-tokens", str(MAX)]
            argv += ["--adapter", folder] if folder else []
            for p in PROMPTS:
                argv += ["--prompt", p]
            assert main(argv) == 0
        out[name] = [json.loads(x)["output"] for x in buf.getvalue().splitlines()]
    return out


def test_models_lists_the_base_and_every_adapter(server):
    assert [m.id for m in client(server).models.list()] == ["base", "alpha", "beta"]


def test_greedy_answers_equal_tuneforge_generate(server, generated):
    c = client(server)
    assert generated["alpha"] != generated["beta"] != generated["base"]  # the adapters matter
    for name, want in generated.items():
        got = [chat(c, name, p) for p in PROMPTS]
        assert [g.choices[0].message.content for g in got] == want, name
        for g in got:
            assert g.model == name and g.choices[0].finish_reason in ("stop", "length")
            assert 0 < g.usage.completion_tokens <= MAX and g.usage.prompt_tokens > 0


def test_streaming_gives_the_same_text(server, generated):
    c = client(server)
    for name in ("base", "beta"):
        stream = chat(c, name, PROMPTS[0], stream=True)
        chunks = list(stream)
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks)
        assert text.strip() == generated[name][0]
        assert chunks[0].choices[0].delta.role == "assistant"
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_completions_endpoint(server):
    c = client(server)
    r = c.completions.create(model="alpha", prompt="The sum is", max_tokens=3, temperature=0)
    assert r.object == "text_completion" and r.usage.completion_tokens <= 3
    again = c.completions.create(model="alpha", prompt="The sum is", max_tokens=3, temperature=0)
    assert again.choices[0].text == r.choices[0].text
    parts = list(c.completions.create(model="alpha", prompt="The sum is", max_tokens=3, temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in parts).strip() == r.choices[0].text


def test_concurrent_requests_for_different_adapters_are_batched_and_not_mixed_up(server, generated):
    c = client(server)
    jobs = [(name, i) for _ in range(4) for name in generated for i in range(len(PROMPTS))]
    before = dict(server.service.engine.stats)
    with ThreadPoolExecutor(max_workers=12) as pool:
        answers = list(pool.map(lambda job: chat(c, job[0], PROMPTS[job[1]]).choices[0].message.content, jobs))
    for (name, i), answer in zip(jobs, answers):
        assert answer == generated[name][i], (name, i)
    stats = server.service.engine.stats
    assert stats["rows"] - before["rows"] == len(jobs)
    assert stats["batches"] - before["batches"] < len(jobs)  # several requests, adapters mixed, in one batch
    assert stats["max_rows"] > 1


def _raw(server, method, path, body: bytes | None = None, headers=None):
    conn = http.client.HTTPConnection(server.host, server.port, timeout=30)
    conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
    r = conn.getresponse()
    data = json.loads(r.read())
    conn.close()
    return r.status, data


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, generated):
    c = client(server)
    status, body = _raw(server, "POST", "/v1/chat/completions", b'{"model": "base", "messages": [')
    assert status == 400 and body["error"]["type"] == "invalid_request_error" and "JSON" in body["error"]["message"]
    with pytest.raises(openai.NotFoundError) as e:
        chat(c, "gamma", "hi")
    assert e.value.body["code"] == "model_not_found" and "alpha" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError, match="messages"):
        c.chat.completions.create(model="base", messages=[], max_tokens=4)
    status, body = _raw(server, "POST", "/v1/chat/completions", json.dumps({"model": "base"}).encode())
    assert status == 400 and body["error"]["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as e:
        chat(c, "base", "word " * 200)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="max_tokens is 999, over this server's limit of 32"):
        c.chat.completions.create(model="base", messages=[{"role": "user", "content": "hi"}], max_tokens=999)
    with pytest.raises(openai.BadRequestError, match="role"):
        c.chat.completions.create(model="base", messages=[{"role": "wizard", "content": "hi"}], max_tokens=4)
    status, body = _raw(server, "GET", "/v1/nothing")
    assert status == 404 and body["error"]["code"] == "not_found"
    assert chat(c, "alpha", PROMPTS[0]).choices[0].message.content == generated["alpha"][0]


def test_a_client_that_disconnects_mid_stream_is_cancelled(server, generated):
    conn = http.client.HTTPConnection(server.host, server.port, timeout=30)
    body = {"model": "beta", "messages": [{"role": "user", "content": PROMPTS[1]}], "max_tokens": 32,
            "stream": True, "temperature": 0}
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200 and r.getheader("Content-Type") == "text/event-stream"
    r.fp.readline()  # the first chunk's size line: the stream started
    conn.sock.close()  # gone
    assert chat(client(server), "beta", PROMPTS[1]).choices[0].message.content == generated["beta"][1]


def test_wrong_api_key(tiny_model_dir, adapters):
    s = _server(tiny_model_dir, adapters, key="s3cret")
    try:
        with pytest.raises(openai.AuthenticationError) as e:
            client(s, "wrong").models.list()
        assert e.value.body["code"] == "invalid_api_key"
        status, _ = _raw(s, "GET", "/v1/models")
        assert status == 401
        assert [m.id for m in client(s, "s3cret").models.list()] == ["base", "alpha", "beta"]
    finally:
        s.close()


def test_more_requests_than_the_queue_holds(tiny_model_dir, adapters):
    s = _server(tiny_model_dir, adapters, limits=Limits(max_prompt_tokens=64, max_tokens=32, timeout=2.0),
                max_queue=1, start_engine=False)
    try:
        c = client(s)
        results = {}

        def first():
            try:
                chat(c, "base", "hi")
            except openai.APIStatusError as exc:
                results["first"] = exc.status_code

        t = threading.Thread(target=first)
        t.start()
        while s.service.engine.pending.qsize() < 1:
            t.join(0.01)
        with pytest.raises(openai.RateLimitError) as e:
            chat(c, "base", "again")
        assert e.value.body["code"] == "queue_full"
        t.join()
        assert results["first"] == 504  # nothing decoded it: the wait ends with the server's timeout
    finally:
        s.close()


def test_serve_command_checks_its_arguments(tmp_path, capsys):
    assert main(["serve", "--adapter", "nameless"]) == 2
    assert "NAME=DIR" in capsys.readouterr().err
    assert main(["serve", "--adapter", f"a={tmp_path / 'nope'}"]) == 2
    assert "nope" in capsys.readouterr().err


def test_chat_switches_adapters_without_reloading(tiny_model_dir, adapters, generated, monkeypatch, capsys):
    """tuneforge chat --adapter NAME=DIR ...: /adapter NAME switches; each answers as `generate` with it does."""
    import io
    import sys
    session = f"{PROMPTS[0]}\n/adapter beta\n{PROMPTS[0]}\n/adapter base\n{PROMPTS[0]}\n/adapter\n/adapter zeta\n/quit\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(session))
    argv = ["chat", "--model", tiny_model_dir, "--max-new-tokens", str(MAX), "--no-history",
            "--adapter", f"alpha={adapters['alpha']}", "--adapter", f"beta={adapters['beta']}"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    replies = [line.split("bot> ", 1)[1] for line in out.splitlines() if "bot> " in line]  # after input()'s "you> "
    assert replies == [generated["alpha"][0], generated["beta"][0], generated["base"][0]]
    assert "now answering: beta" in err and "adapters: base (answering), alpha, beta" in err
    assert "no adapter 'zeta'" in err


def test_mixed_lora_rows_equal_each_adapter_alone(tiny_model_dir, adapters):
    """eval/generation.py mixed_lora: a batch whose rows use different adapters (and the base) gives each row
    the logits that adapter alone gives (PEFT's own forward with it active, or with adapters disabled)."""
    from tuneforge.eval.generation import BASE_ADAPTER, mixed_lora
    model, tok, names, _ = load_served(tiny_model_dir, list(adapters.items()), base_name="base")
    ids = tok(["Add 2 and 3.", "Say hello.", "Add 2 and 3.", "Hi"], padding=True, return_tensors="pt")
    rows = ["alpha", BASE_ADAPTER, "beta", "alpha"]
    with torch.no_grad(), mixed_lora(model, rows):
        mixed = model(**ids).logits
    for r, name in enumerate(rows):
        with torch.no_grad():
            if name == BASE_ADAPTER:
                with model.disable_adapter():
                    alone = model(**ids).logits[r]
            else:
                model.set_adapter(name)
                alone = model(**ids).logits[r]
        torch.testing.assert_close(mixed[r], alone, rtol=1e-5, atol=1e-5)
    model.set_adapter("alpha")
    with torch.no_grad(), mixed_lora(model, [BASE_ADAPTER] * 4):  # no adapter in the batch: the base alone
        only_base = model(**ids).logits
    with torch.no_grad(), model.disable_adapter():
        torch.testing.assert_close(only_base, model(**ids).logits, rtol=1e-5, atol=1e-5)


def test_n_choices_and_stop_strings(server, generated):
    c = client(server)
    two = chat(c, "alpha", PROMPTS[0], n=2)
    assert [ch.index for ch in two.choices] == [0, 1]
    assert [ch.message.content for ch in two.choices] == [generated["alpha"][0]] * 2  # greedy: the same answer
    assert two.usage.completion_tokens == 2 * chat(c, "alpha", PROMPTS[0]).usage.completion_tokens
    sampled = [c.chat.completions.create(model="beta", messages=[{"role": "user", "content": PROMPTS[1]}],
                                         max_tokens=MAX, temperature=1.0, n=3, seed=11) for _ in range(2)]
    texts = [[ch.message.content for ch in s.choices] for s in sampled]
    assert texts[0] == texts[1]  # a seed makes the choices reproducible ...
    assert len(set(texts[0])) > 1  # ... and each choice samples its own tokens
    # a stop string taken from the middle of a greedy answer: the text ends before it, finish_reason "stop"
    name, answer = max(((n, a) for n, answers in generated.items() for a in answers), key=lambda x: len(x[1]))
    assert len(answer) >= 6
    prompt = PROMPTS[generated[name].index(answer)]
    stop = answer[len(answer) // 2:len(answer) // 2 + 2]
    want = answer[:answer.find(stop)].strip()
    cut = chat(c, name, prompt, stop=[stop, "never-appears"])
    assert cut.choices[0].message.content == want and cut.choices[0].finish_reason == "stop"
    assert cut.usage.completion_tokens < chat(c, name, prompt).usage.completion_tokens
    streamed = list(chat(c, name, prompt, stop=stop, stream=True, n=2))
    for i in (0, 1):  # the streamed deltas never show the stop string, even when a token ends halfway into it
        text = "".join(ch.choices[0].delta.content or "" for ch in streamed if ch.choices[0].index == i)
        assert text.strip() == want
        assert [ch.choices[0].finish_reason for ch in streamed if ch.choices[0].index == i][-1] == "stop"
    with pytest.raises(openai.BadRequestError, match="stop"):
        chat(c, "base", "hi", stop=["a", "b", "c", "d", "e"])
    with pytest.raises(openai.BadRequestError, match="n must be"):
        chat(c, "base", "hi", n=0)


def test_stream_holds_back_what_may_begin_a_stop_string(tiny_tokenizer):
    """_Stream by hand: the delta stops short of a possible stop string's start; text after a stop is dropped."""
    from tuneforge.serve.engine import Request, _Stream
    ids = tiny_tokenizer("hello world, stop here", add_special_tokens=False)["input_ids"]
    request = Request("base", [1], 32, stop=("wor", "ld, s"))
    stream = _Stream(tiny_tokenizer, request)
    seen = []
    for token in ids:
        stream.push(token)
        while not request.events.empty():
            seen.append(request.events.get()[2])
        assert "wor" not in "".join(seen)
    assert request.stop_hit.is_set() and stream.flush() == "hello"
    assert "".join(seen) + "".join(e[2] for e in list(request.events.queue)) == "hello "
