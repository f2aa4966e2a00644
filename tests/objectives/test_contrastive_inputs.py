"""method contrastive, its inputs: SimCSE on text records (two rows of one text that differ only by dropout),
query/document prefixes (in the tokens, the cache key and the saved sentence-transformers prompts), a pair's
`score` (read, validated, Spearman on held-out pairs), an extra retrieval corpus and the model-guided
false-negative margin."""

from __future__ import annotations

import json

import pytest
import torch

from helpers.runs import write_config_yaml, write_pair_data
from tuneforge.config.load import config_from_dict
from tuneforge.data.builders import BuildStats, PairBuilder
from tuneforge.data.collate import collate_sequences
from tuneforge.data.readers import read_records
from tuneforge.errors import DataError
from tuneforge.models.embedder import embed
from tuneforge.models.heads import TrainModule
from tuneforge.models.tiny import make_tiny_bert_dir
from tuneforge.objectives.contrastive import ContrastiveObjective, retrieval_sums, spearman_sums
from tuneforge.train.loop import accumulate_update, make_autocast

NONE = make_autocast("none", torch.device("cpu"))


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return make_tiny_bert_dir(str(tmp_path_factory.mktemp("tiny_bert")))


@pytest.fixture(scope="module")
def tokenizer(bert_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(bert_dir)


class _Sink:
    def __init__(self):
        self.examples = []

    def add(self, ex):
        self.examples.append(ex)


def _build(tokenizer, records, **options):
    data = config_from_dict({"method": "contrastive", "model": {"name": "x"},
                             "data": {"train": "x", "max_length": 32}}).data
    sink = _Sink()
    builder = PairBuilder(tokenizer, data, sink, BuildStats(), options)
    for record in records:
        builder.add(record)
    return sink.examples


def _records(tmp_path, rows, name="rows.jsonl", kind="auto"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return read_records(path, kind=kind).records


def _batch(tokenizer, examples):
    return {**collate_sequences(examples, tokenizer.pad_token_id), "texts": [ex.texts for ex in examples]}


def _module(bert_dir):
    from tuneforge.models.load import load_embedding_model
    model, _ = load_embedding_model(bert_dir)
    return TrainModule(model)


# -- SimCSE -----------------------------------------------------------------------------------------------------

def test_a_text_record_is_a_simcse_example_of_one_text_twice(tmp_path, tokenizer):
    records = _records(tmp_path, [{"text": "the cat sat on the mat"}, {"text": "a dog ran"}])
    examples = _build(tokenizer, records)
    assert [ex.roles for ex in examples] == [[0, 1], [0, 1]]
    for ex, record in zip(examples, records):
        assert ex["anchor"].input_ids == ex["positive"].input_ids == tokenizer(record.text)["input_ids"]
        assert ex.texts == {"anchor": record.text, "positive": record.text, "negatives": []}


def test_simcse_rows_differ_only_by_dropout(tmp_path, tokenizer, bert_dir):
    module = _module(bert_dir)
    examples = _build(tokenizer, _records(tmp_path, [{"text": f"sentence number {i} here"} for i in range(4)]))
    batch = _batch(tokenizer, examples)
    role = batch["sequence_role"]
    module.eval()
    with torch.no_grad():
        plain = embed(module, batch, "mean", True)
    torch.testing.assert_close(plain[role == 0], plain[role == 1], rtol=0, atol=0)  # same tokens, same vector
    module.train()  # the tiny BERT has dropout 0.1: two masks, two vectors of each text
    with torch.no_grad():
        noisy = embed(module, batch, "mean", True)
    assert not torch.allclose(noisy[role == 0], noisy[role == 1], atol=1e-4)
    similarity = (noisy[role == 0] * noisy[role == 1]).sum(-1)
    assert bool((similarity > 0.9).all())  # still close: only dropout apart


def test_simcse_cached_mini_batches_train_with_dropout_and_the_texts_are_not_false_negatives(
        tmp_path, tokenizer, bert_dir):
    module = _module(bert_dir)
    module.train()
    rows = [{"text": f"sentence number {i} about topic {i % 3}"} for i in range(6)]
    examples = _build(tokenizer, _records(tmp_path, rows))
    objective = ContrastiveObjective()
    totals = accumulate_update(module, objective, [_batch(tokenizer, examples[:3]), _batch(tokenizer, examples[3:])],
                               NONE)
    assert totals.count == 6 and torch.isfinite(torch.tensor(totals.loss_sum))
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    assert grads and all(bool(torch.isfinite(g).all()) for g in grads)
    # each text's positive is its own second row, never masked although its text equals the anchor's; the
    # other texts are negatives
    from tuneforge.objectives.contrastive_losses import false_negative_mask
    texts = [ex.texts["anchor"] for ex in examples]
    assert not false_negative_mask(texts, texts, list(range(6))).any()
    duplicated = texts[:5] + texts[:1]  # the same sentence twice in a batch: a false negative of each other
    assert false_negative_mask(duplicated, duplicated, list(range(6))).sum() == 2


def test_held_out_text_records_give_a_loss_but_no_trivial_retrieval(tmp_path, tokenizer, bert_dir):
    module = _module(bert_dir)
    texts = _build(tokenizer, _records(tmp_path, [{"text": f"sentence {i}"} for i in range(4)]))
    pairs = _build(tokenizer, _records(tmp_path, [{"anchor": f"q {i}", "positive": f"doc {i}"} for i in range(3)],
                                       name="pairs.jsonl"))
    objective = ContrastiveObjective()
    only_texts = objective.evaluate(module, [_batch(tokenizer, texts)], NONE)
    assert "loss" in only_texts and "recall@1" not in only_texts
    mixed = objective.evaluate(module, [_batch(tokenizer, texts), _batch(tokenizer, pairs)], NONE)
    assert mixed["recall@1"][1] == 3  # the three real pairs are the queries


# -- prefixes ---------------------------------------------------------------------------------------------------

def test_prefixes_go_before_queries_and_documents_and_the_kept_texts_are_the_records(tmp_path, tokenizer):
    records = _records(tmp_path, [{"anchor": "how to sort", "positive": "sorted() sorts", "negatives": ["len()"]}])
    ex = _build(tokenizer, records, query_prefix="query: ", document_prefix="passage: ")[0]
    assert ex["anchor"].input_ids == tokenizer("query: how to sort")["input_ids"]
    assert ex["positive"].input_ids == tokenizer("passage: sorted() sorts")["input_ids"]
    assert ex.sequences[2].input_ids == tokenizer("passage: len()")["input_ids"]
    assert ex.texts["anchor"] == "how to sort" and ex.texts["negatives"] == ["len()"]
    simcse = _build(tokenizer, _records(tmp_path, [{"text": "a b c"}], name="t.jsonl"), query_prefix="query: ",
                    document_prefix="passage: ")[0]
    assert simcse["anchor"].input_ids == simcse["positive"].input_ids == tokenizer("passage: a b c")["input_ids"]


def _config(bert_dir, train, out, contrastive=None, steps=4, **data):
    return config_from_dict({
        "method": "contrastive", "model": {"name": str(bert_dir)},
        "data": {"train": str(train), "eval_fraction": 0.25, "max_length": 64, **data},
        "train": {"output_dir": str(out), "max_steps": steps, "micro_batch_size": 4, "grad_accum": 2, "lr": 2e-3,
                  "progress": False, "tensorboard": False, "autocast": "none", "warmup_ratio": 0.0},
        "contrastive": {"temperature": 0.1, **(contrastive or {})}})


def test_prefixes_change_the_token_cache_key(tmp_path, bert_dir, tokenizer):
    from tuneforge.run import prepare
    data = write_pair_data(tmp_path / "pairs.jsonl", n=16)
    plain = prepare(_config(bert_dir, data, tmp_path / "run"), tokenizer)
    prefixed = prepare(_config(bert_dir, data, tmp_path / "run", {"query_prefix": "query: "}), tokenizer)
    assert plain.train.folder != prefixed.train.folder
    first = prefixed.train[0]
    assert first["anchor"].input_ids == tokenizer("query: " + first.texts["anchor"])["input_ids"]
    assert plain.train[0]["anchor"].input_ids == tokenizer(plain.train[0].texts["anchor"])["input_ids"]


def test_the_saved_folder_carries_the_prefixes_as_sentence_transformers_prompts(tmp_path, bert_dir):
    import sentence_transformers as st

    from tuneforge.run import train
    data = write_pair_data(tmp_path / "pairs.jsonl", n=16)
    train(_config(bert_dir, data, tmp_path / "run", {"query_prefix": "query: ", "document_prefix": "passage: "},
                  steps=2))
    final = tmp_path / "run" / "final"
    saved = json.loads((final / "config_sentence_transformers.json").read_text())
    assert saved["prompts"] == {"query": "query: ", "document": "passage: "}
    model = st.SentenceTransformer(str(final), device="cpu")
    with_prompt = model.encode(["What is 2 plus 2?"], prompt_name="query", convert_to_tensor=True)
    spelled = model.encode(["query: What is 2 plus 2?"], convert_to_tensor=True)
    torch.testing.assert_close(with_prompt, spelled, rtol=1e-5, atol=1e-5)


# -- scores -----------------------------------------------------------------------------------------------------

def test_a_pair_score_is_read_and_bad_scores_are_named(tmp_path):
    good = _records(tmp_path, [{"anchor": "a", "positive": "b", "score": 4.5}, {"anchor": "c", "positive": "d"}])
    assert [r.score for r in good] == [4.5, None]
    csv = tmp_path / "rows.csv"
    csv.write_text("anchor,positive,score\na,b,3\nc,d,\n")
    assert [r.score for r in read_records(csv, kind="pair").records] == [3.0, None]
    for bad, message in (("high", "expected a number"), (True, "expected a number"), (float("nan"), "finite")):
        path = tmp_path / "bad.jsonl"
        path.write_text(json.dumps({"anchor": "a", "positive": "b"}) + "\n"
                        + json.dumps({"anchor": "a", "positive": "b", "score": bad}) + "\n")
        with pytest.raises(DataError) as info:
            read_records(path, kind="pair")
        text = str(info.value)
        assert "bad.jsonl" in text and "line 2" in text and "score" in text and message in text, text


def test_spearman_of_scored_pairs_against_hand_ranks():
    # cosines of the four pairs: 1, 0.8, 0, -0.6; scores ranked 2, 1, 4, 3 (1 lowest), so with the cosine ranks
    # 4, 3, 2, 1: d = (2, 2, -2, -2), rho = 1 - 6 * 16 / (4 * 15) = -0.6
    anchors = torch.tensor([[1.0, 0.0]] * 4)
    positives = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-0.6, 0.8]])
    out = spearman_sums(anchors, positives, [2.0, 1.0, 5.0, 3.0, ])
    assert out["spearman"][1] == 4 and abs(out["spearman"][0] / 4 - (-0.6)) < 1e-12
    # unscored pairs are left out; fewer than two scores, or one value, give nothing
    out = spearman_sums(torch.cat([anchors, anchors[:1]]), torch.cat([positives, positives[:1]]),
                        [2.0, 1.0, 5.0, 3.0, None])
    assert out["spearman"][1] == 4
    assert spearman_sums(anchors, positives, [None, None, 1.0, None]) == {}
    assert spearman_sums(anchors, positives, [1.0, 1.0, 1.0, 1.0]) == {}


def test_a_run_on_scored_pairs_reports_held_out_spearman(tmp_path, bert_dir):
    from tuneforge.run import train
    path = tmp_path / "scored.jsonl"
    with open(path, "w") as f:
        for i in range(24):
            f.write(json.dumps({"anchor": f"What is {i % 10} plus {i // 10}? ({i})",
                                "positive": f"{i % 10} plus {i // 10} makes {i % 10 + i // 10}.",
                                "score": float(i % 5)}) + "\n")
    res = train(_config(bert_dir, path, tmp_path / "run", steps=2))
    for result in (res["eval_before"], res["train"]["eval"]):
        assert -1.0 <= result["spearman"] <= 1.0


# -- extra corpus -----------------------------------------------------------------------------------------------

def test_extra_corpus_documents_are_candidates_but_never_relevant():
    anchors = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    positives = torch.tensor([[0.9, 0.1], [0.1, 0.9]])
    plain = retrieval_sums(anchors, positives, ["q0", "q1"], ["d0", "d1"])
    assert plain["recall@1"] == (2.0, 2.0)
    # a distractor closer to q0 than its positive pushes d0 to rank 2; one equal to a positive's text is dropped
    extra = (["noise", "d1"], torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    out = retrieval_sums(anchors, positives, ["q0", "q1"], ["d0", "d1"], extra)
    assert out["recall@1"] == (1.0, 2.0)
    assert out["mrr@10"] == (0.5 + 1.0, 2.0)


def test_a_corpus_file_is_read_deduplicated_prefixed_and_used_in_held_out_retrieval(tmp_path, bert_dir, tokenizer):
    from tuneforge.objectives.contrastive import corpus_documents
    from tuneforge.run import train
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("one doc", " one doc ", "another doc")))
    data = write_pair_data(tmp_path / "pairs.jsonl", n=24)
    cfg = _config(bert_dir, data, tmp_path / "run", {"corpus": str(corpus), "document_prefix": "passage: "}, steps=2)
    texts, ids = corpus_documents(cfg, tokenizer)
    assert texts == ["one doc", "another doc"]
    assert ids[0] == tokenizer("passage: one doc")["input_ids"]
    res = train(cfg)
    assert 0.0 <= res["train"]["eval"]["recall@1"] <= 1.0
    bad = tmp_path / "bad_corpus.jsonl"
    bad.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"txt": "typo"}) + "\n")
    with pytest.raises(DataError) as info:
        corpus_documents(_config(bert_dir, data, tmp_path / "run", {"corpus": str(bad)}), tokenizer)
    assert "bad_corpus.jsonl" in str(info.value) and "line 2" in str(info.value)


def test_mining_searches_the_corpus_too(tmp_path, bert_dir):
    from tuneforge.cli import main
    corpus = tmp_path / "corpus.jsonl"
    distractors = [f"{a} plus {b} makes {a + b + 10}." for a in range(3) for b in range(3)]
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in distractors))
    data = write_pair_data(tmp_path / "pairs.jsonl", n=16)
    cfg = _config(bert_dir, data, tmp_path / "run", {"corpus": str(corpus)})
    out = tmp_path / "mined.jsonl"
    assert main(["data", "mine-negatives", str(write_config_yaml(cfg, tmp_path / "c.yaml")), "--out", str(out),
                 "-k", "20", "--margin", "0"]) == 0
    mined = {n for line in out.read_text().splitlines() for n in json.loads(line)["negatives"]}
    assert mined & set(distractors)


def test_mining_refuses_simcse_text_records(tmp_path, bert_dir):
    from tuneforge.cli import main
    path = tmp_path / "texts.jsonl"
    path.write_text("".join(json.dumps({"text": f"sentence {i}"}) + "\n" for i in range(8)))
    cfg = _config(bert_dir, path, tmp_path / "run")
    rc = main(["data", "mine-negatives", str(write_config_yaml(cfg, tmp_path / "c.yaml")), "--out",
               str(tmp_path / "m.jsonl")])
    assert rc != 0 and not (tmp_path / "m.jsonl").exists()


# -- the model-guided false-negative margin ----------------------------------------------------------------------

def test_score_margin_reaches_the_loss(tmp_path, tokenizer, bert_dir):
    from tuneforge.objectives.contrastive import make_contrastive
    data = write_pair_data(tmp_path / "pairs.jsonl", n=8)
    cfg = _config(bert_dir, data, tmp_path / "run", {"score_margin": 0.0})
    objective = make_contrastive(cfg, tokenizer)
    assert objective.score_margin == 0.0
    module = _module(bert_dir)
    module.eval()
    examples = _build(tokenizer, read_records(data, kind="pair").records)
    batch = _batch(tokenizer, examples)
    guided = objective.loss(module, batch).loss_sum
    plain = ContrastiveObjective(temperature=0.1).loss(module, batch).loss_sum
    # an untrained model scores many negatives above the positives: masking them lowers the loss
    assert float(guided) < float(plain)


# -- padding-free batches for decoders ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    from tuneforge.models.tiny import make_tiny_model_dir
    return make_tiny_model_dir(str(tmp_path_factory.mktemp("tiny_llama")))


def _decoder(llama_dir, attention="varlen"):
    from tuneforge.models.embedder import load_embedder
    cfg = config_from_dict({"method": "contrastive", "model": {"name": str(llama_dir)}, "data": {"train": "x"}})
    model, tok = load_embedder(cfg)
    if attention != "varlen":
        model.set_attn_implementation(attention)
    return TrainModule(model), tok


def _grads(module, objective, batches):
    module.zero_grad(set_to_none=True)
    totals = accumulate_update(module, objective, batches, NONE)
    return totals, {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def test_a_decoder_body_gets_varlen_attention_and_packed_batches_only_there(llama_dir, bert_dir):
    from tuneforge.errors import ConfigError
    from tuneforge.models.attention import NAME
    from tuneforge.models.embedder import embedding_layout
    decoder, _ = _decoder(llama_dir)
    assert decoder.base.config._attn_implementation == NAME
    assert embedding_layout(decoder, "auto") == "sorted" and embedding_layout(decoder, True) == "packed"
    assert embedding_layout(decoder, False) == "padded"
    encoder = _module(bert_dir)
    assert embedding_layout(encoder, "auto") == "sorted" and embedding_layout(encoder, False) == "padded"
    with pytest.raises(ConfigError, match="data.packing"):
        embedding_layout(encoder, True)


def _uneven_examples(tmp_path, tok, n=20):
    rows = [{"anchor": f"question {i} " + "word " * (i * 3 % 17), "positive": f"answer {i}",
             "negatives": [f"answer {i + 1} " + "x " * (i % 5)]} for i in range(n)]
    return _build(tok, _records(tmp_path, rows))


def _same_update(module, tok, examples, layouts):
    """Every layout's embeddings, loss and gradients (direct and cached) equal the padded batch's."""
    batch = _batch(tok, examples)
    assert bool((batch["attention_mask"] == 0).any())  # there is padding to save
    pooling = "last"
    with torch.no_grad():
        padded = embed(module, batch, pooling, True, layout="padded")
        for layout in layouts:
            torch.testing.assert_close(embed(module, batch, pooling, True, layout=layout), padded, rtol=1e-5,
                                       atol=1e-5, msg=layout)
    half = len(examples) // 2
    for batches in ([batch], [_batch(tok, examples[:half]), _batch(tok, examples[half:])]):  # direct and cached
        loss_a, g_a = _grads(module, ContrastiveObjective(pooling, packing=False), batches)
        for setting in {"sorted": "auto", "packed": True}.keys() & set(layouts):
            loss_b, g_b = _grads(module, ContrastiveObjective(pooling, packing={"sorted": "auto",
                                                                                "packed": True}[setting]), batches)
            assert abs(loss_a.loss_sum - loss_b.loss_sum) < 1e-5 * max(1.0, abs(loss_a.loss_sum))
            assert g_a.keys() == g_b.keys() and g_a
            for name in g_a:
                torch.testing.assert_close(g_b[name], g_a[name], rtol=1e-4, atol=5e-5)  # summation order


def test_sorted_and_packed_layouts_equal_the_padded_batch_for_a_decoder(tmp_path, llama_dir):
    module, tok = _decoder(llama_dir)
    module.train()
    _same_update(module, tok, _uneven_examples(tmp_path, tok), ("sorted", "packed"))


def test_the_sorted_layout_equals_the_padded_batch_for_an_encoder(tmp_path, bert_dir, tokenizer):
    from tuneforge.models.load import load_embedding_model
    model, _ = load_embedding_model(bert_dir)
    for m in model.modules():  # dropout off: the layouts draw their masks in another order
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    module = TrainModule(model).train()
    _same_update(module, tokenizer, _uneven_examples(tmp_path, tokenizer), ("sorted",))


@pytest.mark.parametrize("pooling", ["mean", "cls", "last"])
def test_every_pooling_reads_the_same_tokens_in_every_layout(tmp_path, llama_dir, pooling):
    module, tok = _decoder(llama_dir)
    module.eval()
    batch = _batch(tok, _uneven_examples(tmp_path, tok, n=6))
    with torch.no_grad():
        padded = embed(module, batch, pooling, False, layout="padded")
        for layout in ("sorted", "packed"):
            torch.testing.assert_close(embed(module, batch, pooling, False, layout=layout), padded, rtol=1e-5,
                                       atol=1e-5)


def test_layouts_run_one_forward_of_the_train_module(tmp_path, llama_dir, monkeypatch):
    from tuneforge.models.embedder import CHUNK_ROWS
    module, tok = _decoder(llama_dir)
    body_calls, module_calls = [], []
    body = module.body()
    original = body.forward

    def recording(*args, **kwargs):
        body_calls.append((tuple(kwargs["input_ids"].shape), kwargs.get("attention_mask") is None))
        return original(*args, **kwargs)

    monkeypatch.setattr(body, "forward", recording)
    module.register_forward_hook(lambda *a: module_calls.append(1))
    examples = _uneven_examples(tmp_path, tok, n=12)  # 36 sequences: 3 chunks of 16, 16 and 4
    batch = _batch(tok, examples)
    lengths = batch["attention_mask"].sum(1)
    ContrastiveObjective("last", packing=True).loss(module, batch)
    assert body_calls == [((1, int(lengths.sum())), True)] and module_calls == [1]
    body_calls.clear()
    ContrastiveObjective("last", packing="auto").loss(module, batch)
    assert len(module_calls) == 2 and len(body_calls) == -(-36 // CHUNK_ROWS)
    assert sum(rows for (rows, _), _ in body_calls) == 36
    assert sum(rows * width for (rows, width), _ in body_calls) < batch["attention_mask"].numel()


def test_a_text_cut_on_the_right_is_counted_there_once(tmp_path, tokenizer):
    from tuneforge.data.builders import BuildStats
    long = " ".join(f"w{i}" for i in range(80))
    stats = BuildStats()
    data = config_from_dict({"method": "contrastive", "model": {"name": "x"},
                             "data": {"train": "x", "max_length": 32}}).data
    builder = PairBuilder(tokenizer, data, _Sink(), stats)
    records = _records(tmp_path, [{"anchor": long, "positive": "short"}]) + _records(tmp_path, [{"text": long}],
                                                                                     name="texts.jsonl")
    for record in records:
        builder.add(record)
    assert stats.truncated_right == 2 and stats.truncated_left == 0
