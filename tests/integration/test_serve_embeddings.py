"""tuneforge serve --run CONTRASTIVE_RUN: /v1/embeddings with the official openai client.

A served vector equals sentence-transformers' `encode` of the run's final/ folder (and tuneforge's own embedding
of the same text); the query prefix a run trained with is applied on `input_type: query`; token-id input, float
and base64 encodings; bad requests get OpenAI errors; a server of embedders alone answers chat requests with a
clear error."""

from __future__ import annotations

import base64

import numpy as np
import openai
import pytest
import torch

from helpers.runs import write_pair_data
from tuneforge.cli import main
from tuneforge.config.load import config_from_dict
from tuneforge.errors import TuneforgeError
from tuneforge.models.tiny import make_tiny_bert_dir
from tuneforge.serve.embeddings import load_embedder_folder, sentence_transformer_settings
from tuneforge.serve.server import Limits, Server, Service

TEXTS = ["What is 3 plus 4?", "3 plus 4 makes 7, a longer sentence than the other one.", "a"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from tuneforge.run import train
    root = tmp_path_factory.mktemp("embedder_run")
    bert = make_tiny_bert_dir(str(root / "bert"))
    data = write_pair_data(root / "pairs.jsonl", n=24)
    cfg = config_from_dict({
        "method": "contrastive", "model": {"name": bert},
        "data": {"train": str(data), "eval_fraction": 0.25, "max_length": 32},
        "train": {"output_dir": str(root / "run"), "max_steps": 3, "micro_batch_size": 4, "lr": 2e-3,
                  "progress": False, "tensorboard": False, "autocast": "none", "warmup_ratio": 0.0},
        "eval": {"forgetting": False},
        "contrastive": {"temperature": 0.1, "query_prefix": "query: "}})
    train(cfg)
    return root / "run", bert


@pytest.fixture(scope="module")
def server(run_dir):
    final = run_dir[0] / "final"
    s = Server(Service(None, None, None, Limits(max_prompt_tokens=48),
                       embedders={"emb": load_embedder_folder("emb", str(final))}), port=0).start()
    yield s
    s.close()


def client(server):
    return openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=60)


def test_served_vectors_equal_sentence_transformers(server, run_dir):
    import sentence_transformers as st  # a test dependency: never skipped
    final = run_dir[0] / "final"
    theirs = st.SentenceTransformer(str(final), device="cpu")
    c = client(server)
    got = c.embeddings.create(model="emb", input=TEXTS)  # the client asks for base64 and decodes it
    assert [d.index for d in got.data] == [0, 1, 2] and got.model == "emb"
    ours = torch.tensor([d.embedding for d in got.data])
    torch.testing.assert_close(ours, theirs.encode(TEXTS, convert_to_tensor=True), rtol=1e-5, atol=1e-5)
    floats = c.embeddings.create(model="emb", input=TEXTS[0], encoding_format="float")
    torch.testing.assert_close(torch.tensor(floats.data[0].embedding), ours[0])
    queries = c.embeddings.create(model="emb", input=TEXTS[:2], extra_body={"input_type": "query"})
    want = theirs.encode(TEXTS[:2], prompt_name="query", convert_to_tensor=True)  # "query: " before each text
    torch.testing.assert_close(torch.tensor([d.embedding for d in queries.data]), want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(want, ours[:2], atol=1e-4)
    tok = theirs.tokenizer
    ids = tok(TEXTS[1])["input_ids"]
    by_ids = c.embeddings.create(model="emb", input=ids, encoding_format="float")
    torch.testing.assert_close(torch.tensor(by_ids.data[0].embedding), ours[1], rtol=1e-5, atol=1e-5)
    assert got.usage.prompt_tokens == sum(min(len(tok(t)["input_ids"]), 32) for t in TEXTS)  # the tokens embedded


def test_base64_is_little_endian_float32(server):
    import http.client
    import json
    conn = http.client.HTTPConnection(server.host, server.port, timeout=30)
    conn.request("POST", "/v1/embeddings", body=json.dumps({"model": "emb", "input": TEXTS[0],
                                                             "encoding_format": "base64"}))
    raw = json.loads(conn.getresponse().read())["data"][0]["embedding"]
    conn.close()
    vector = np.frombuffer(base64.b64decode(raw), dtype="<f4")
    floats = client(server).embeddings.create(model="emb", input=TEXTS[0], encoding_format="float")
    np.testing.assert_allclose(vector, np.array(floats.data[0].embedding, dtype=np.float32), rtol=0, atol=0)
    assert abs(float(np.linalg.norm(vector)) - 1.0) < 1e-5  # the run's Normalize module


def test_bad_embedding_requests(server):
    c = client(server)
    with pytest.raises(openai.NotFoundError):
        c.embeddings.create(model="nope", input="hi")
    with pytest.raises(openai.BadRequestError, match=r"input\[1\] is empty"):
        c.embeddings.create(model="emb", input=["hi", "  "])
    with pytest.raises(openai.BadRequestError, match="input"):
        c.embeddings.create(model="emb", input=[])
    with pytest.raises(openai.BadRequestError) as e:
        c.embeddings.create(model="emb", input=[list(range(5, 60))])
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="dimensions"):
        c.embeddings.create(model="emb", input="hi", dimensions=3)
    with pytest.raises(openai.BadRequestError, match="input_type"):
        c.embeddings.create(model="emb", input="hi", extra_body={"input_type": "passage"})
    with pytest.raises(openai.BadRequestError, match="embedding model: POST /v1/embeddings"):
        c.chat.completions.create(model="emb", messages=[{"role": "user", "content": "hi"}])
    assert [m.id for m in c.models.list()] == ["emb"]
    assert len(c.embeddings.create(model="emb", input="still serving").data) == 1


def test_folders_that_are_not_embedders_are_refused(run_dir, tmp_path, capsys):
    _, bert = run_dir
    with pytest.raises(TuneforgeError, match="no modules.json"):
        load_embedder_folder("plain", bert)  # a bare transformers encoder: how to pool is unknown
    assert sentence_transformer_settings(run_dir[0] / "final") == {
        "pooling": "mean", "normalize": True, "max_length": 32, "prompts": {"query": "query: "}}
    assert main(["serve", "--embedder", "nameless"]) == 2
    assert "NAME=DIR" in capsys.readouterr().err
    assert main(["serve", "--embedder", f"e={tmp_path / 'missing'}"]) == 2
    assert "missing" in capsys.readouterr().err


def test_serve_command_serves_a_contrastive_run_alone(run_dir, monkeypatch, capsys):
    """`tuneforge serve --run RUN` of a contrastive run: the embedder alone, no generation model loaded."""
    from tuneforge.serve import server as server_module
    started = {}

    def fake_serve_forever(self):
        started["names"] = self.RequestHandlerClass  # the handler was built: the service exists
        raise KeyboardInterrupt

    monkeypatch.setattr(server_module.ThreadingHTTPServer, "serve_forever", fake_serve_forever)
    assert main(["serve", "--run", str(run_dir[0]), "--port", "0"]) == 0
    out = capsys.readouterr().out
    assert f"serving {run_dir[0].name} at http://127.0.0.1:" in out and started
