"""method contrastive: cached mini-batching equals one full-batch pass, dropout replayed, the saved folder loads in
sentence-transformers and transformers with tuneforge's embeddings, bad pair records named by file:line:field, and
a tiny run that learns."""

from __future__ import annotations

import json

import pytest
import torch

from helpers.runs import write_pair_data
from tuneforge.config.load import config_from_dict
from tuneforge.data.collate import collate_sequences
from tuneforge.data.readers import read_records
from tuneforge.errors import DataError
from tuneforge.models.embedder import embed, pool
from tuneforge.models.heads import TrainModule
from tuneforge.models.tiny import make_tiny_bert_dir
from tuneforge.objectives.contrastive import (ContrastiveObjective, _replay, _rng_state, balanced_sizes,
                                              length_groups)
from tuneforge.objectives.contrastive_losses import LearnedTemperature
from tuneforge.train.loop import accumulate_update, make_autocast

NONE = make_autocast("none", torch.device("cpu"))


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return make_tiny_bert_dir(str(tmp_path_factory.mktemp("tiny_bert")))


def _examples(tokenizer, n=8, negatives=True, duplicate=True, long_odd=False):
    """Pair examples as the pair builder makes them (anchor, positive, negatives; texts kept); `long_odd`: the
    odd examples' anchors several times longer (lengths that the loader's order mixes)."""
    from tuneforge.data.chat import TokenizedExample
    from tuneforge.data.example import Example
    out = []
    for i in range(n):
        texts = {"anchor": f"question number {i} about item {i * 7}", "positive": f"answer {i}: item {i * 7}",
                 "negatives": [f"answer {i}: item {i * 7 + 1}"] if negatives and i % 2 else []}
        if long_odd and i % 2:
            texts["anchor"] += " and then some more words about it" * 4
        if duplicate and i == n - 1:  # the same positive text as example 0: a false negative for both
            texts["positive"] = out[0].texts["positive"]
        seqs, roles = [], []
        for role, text in [(0, texts["anchor"]), (1, texts["positive"])] + [(2, t) for t in texts["negatives"]]:
            ids = tokenizer(text)["input_ids"]
            seqs.append(TokenizedExample(ids, [1] * len(ids)))
            roles.append(role)
        out.append(Example(seqs, roles, ("anchor", "positive", "negative"), texts))
    return out


def _batch(tokenizer, examples):
    return {**collate_sequences(examples, tokenizer.pad_token_id), "texts": [ex.texts for ex in examples]}


def _module(bert_dir, dropout_off=True, learned=False, sparse=False):
    """`sparse`: the model's dropout drawn sparsely (train.sparse_dropout, the default of a run)."""
    from tuneforge.models.load import load_embedding_model
    from tuneforge.run import sparse_model_dropout
    model, tok = load_embedding_model(bert_dir)
    if sparse:
        sparse_model_dropout(model)
    if dropout_off:
        model.config.hidden_dropout_prob = 0.0
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        model.config.attention_probs_dropout_prob = 0.0
    heads = {"temperature": LearnedTemperature(0.07)} if learned else None
    module = TrainModule(model, heads)
    module.train()
    return module, tok


def _update(module, objective, batches):
    module.zero_grad(set_to_none=True)
    totals = accumulate_update(module, objective, batches, NONE)
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    return totals, grads


@pytest.mark.parametrize("symmetric,learned", [(False, False), (True, False), (False, True)])
def test_cached_mini_batches_give_the_gradients_of_one_full_batch(bert_dir, symmetric, learned):
    module, tok = _module(bert_dir, learned=learned)
    objective = ContrastiveObjective("mean", True, 0.05, symmetric=symmetric, learn_temperature=learned)
    examples = _examples(tok)
    full, g_full = _update(module, objective, [_batch(tok, examples)])
    cached, g_cached = _update(module, objective, [_batch(tok, examples[i:i + 3]) for i in range(0, 8, 3)])
    assert full.count == cached.count == 8
    assert abs(full.loss_sum - cached.loss_sum) < 1e-5 * max(1.0, abs(full.loss_sum))
    assert g_full.keys() == g_cached.keys() and len(g_full) > 10
    assert not learned or "heads.temperature.log_scale" in g_full
    for name in g_full:
        # the temperature's gradient is one sum of terms over every anchor's logits, so its float32 rounding (which
        # the CPU's kernels decide: 2.3e-5 of 0.71 on an AMD EPYC) scales with the loss; the float64 test below
        # holds it, and every weight, to 1e-10
        atol = 1e-5 * max(1.0, abs(full.loss_sum)) if name.startswith("heads.") else 1e-5
        torch.testing.assert_close(g_cached[name], g_full[name], rtol=1e-5, atol=atol, msg=name)
    for key in ("accuracy", "positive_similarity", "hardest_negative_similarity"):
        assert abs(full.metrics[key][0] - cached.metrics[key][0]) < 1e-4, key


def test_cached_gradients_are_exact_whatever_the_length_groups_in_float64(bert_dir):
    """Texts of mixed lengths: the length groups embed other texts together than the micro-batches hold; in
    float64 the cached update equals one full-batch pass to rounding (float32 leaves ~1e-5 of summation order)."""
    module, tok = _module(bert_dir, learned=True)
    module.double()
    objective = ContrastiveObjective("mean", True, 0.05, symmetric=True, learn_temperature=True)
    examples = _examples(tok, long_odd=True)
    batches = [_batch(tok, examples[i:i + 3]) for i in range(0, 8, 3)]
    groups = length_groups(batches, tok.pad_token_id)  # other texts together: less padding
    assert sum(g["input_ids"].numel() for g in groups) < sum(b["input_ids"].numel() for b in batches)
    full, g_full = _update(module, objective, [_batch(tok, examples)])
    cached, g_cached = _update(module, objective, batches)
    assert abs(full.loss_sum - cached.loss_sum) < 1e-10 * abs(full.loss_sum)
    assert "heads.temperature.log_scale" in g_full and len(g_full) > 10
    for name in g_full:
        torch.testing.assert_close(g_cached[name], g_full[name], rtol=1e-10, atol=1e-10, msg=name)


def test_the_negative_pool_is_the_whole_update_not_one_micro_batch(bert_dir):
    """Per-micro-batch InfoNCE (each micro-batch its own pool) is a different loss: the cached one must not be it."""
    module, tok = _module(bert_dir)
    objective = ContrastiveObjective()
    examples = _examples(tok, duplicate=False)
    cached, _ = _update(module, objective, [_batch(tok, examples[:4]), _batch(tok, examples[4:])])
    separate = sum(_update(module, objective, [_batch(tok, part)])[0].loss_sum
                   for part in (examples[:4], examples[4:]))
    assert cached.loss_sum > separate + 1e-3  # more negatives, a larger loss


@pytest.mark.parametrize("sparse", [False, True])
def test_the_cached_pass_replays_dropout(bert_dir, sparse):
    module, tok = _module(bert_dir, dropout_off=False, sparse=sparse)
    batch = _batch(tok, _examples(tok, n=4))
    state = _rng_state(torch.device("cpu"))
    with torch.no_grad():
        first = embed(module, batch, "mean", True)
        other = embed(module, batch, "mean", True)  # the random state moved on: other dropout masks
    with _replay(state, torch.device("cpu")):
        again = embed(module, batch, "mean", True)
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)


def test_pooling_by_position():
    hidden = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    torch.testing.assert_close(pool(hidden, mask, "mean"), torch.stack([hidden[0, :3].mean(0), hidden[1, :2].mean(0)]))
    torch.testing.assert_close(pool(hidden, mask, "cls"), hidden[:, 0])
    torch.testing.assert_close(pool(hidden, mask, "last"), torch.stack([hidden[0, 2], hidden[1, 1]]))
    with pytest.raises(ValueError, match="pooling"):
        pool(hidden, mask, "max")


@pytest.mark.parametrize("row,field,message", [
    ({"anchor": "a b", "positive": " a b "}, "positive", "same text as the anchor"),
    ({"anchor": "a", "positive": "b", "negatives": ["c", "b"]}, "negatives[1]", "same text as the positive"),
    ({"anchor": "a", "positive": "b", "negative": "b"}, "negative", "same text as the positive"),
    ({"anchor": "a", "positive": "b", "negatives": "c"}, "negatives", "expected a list"),
    ({"anchor": "a", "positive": "b", "negatives": [""]}, "negatives[0]", "non-empty"),
])
def test_bad_pair_records_are_named_by_file_line_and_field(tmp_path, row, field, message):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"anchor": "fine", "positive": "also fine"}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError) as info:
        read_records(path, kind="pair")
    text = str(info.value)
    assert "pairs.jsonl" in text and "line 2" in text and field in text and message in text, text
    skipped = read_records(path, kind="pair", on_error="skip")  # the config's choice: counted skips instead
    assert [r.anchor for r in skipped.records] == ["fine"] and skipped.skipped == 1


def _config(bert_dir, train, out, lora=False, steps=12):
    return config_from_dict({
        "method": "contrastive", "model": {"name": str(bert_dir)},
        "data": {"train": str(train), "eval_fraction": 0.25, "max_length": 64},
        "lora": {"enabled": lora, "r": 4, "alpha": 8},
        "train": {"output_dir": str(out), "max_steps": steps, "micro_batch_size": 4, "grad_accum": 2, "lr": 2e-3,
                  "progress": False, "tensorboard": False, "autocast": "none", "warmup_ratio": 0.0},
        "contrastive": {"temperature": 0.1}})


def _embeddings_from_folder(folder, texts):
    from transformers import AutoModel, AutoTokenizer
    model, tok = AutoModel.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    x = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return torch.nn.functional.normalize(pool(model(**x).last_hidden_state, x["attention_mask"], "mean"), dim=-1)


@pytest.mark.parametrize("lora", [False, True])
def test_a_tiny_run_learns_and_saves_a_folder_both_libraries_load(bert_dir, tmp_path, lora):
    from tuneforge.run import train
    data = write_pair_data(tmp_path / "pairs.jsonl", n=48)
    res = train(_config(bert_dir, data, tmp_path / "run", lora=lora))
    before, after = res["eval_before"], res["train"]["eval"]
    assert after["loss"] < before["loss"]  # held-out InfoNCE
    for key in ("recall@1", "recall@5", "recall@10", "mrr@10", "ndcg@10"):
        assert 0.0 <= after[key] <= 1.0
    final = tmp_path / "run" / "final"
    modules = json.loads((final / "modules.json").read_text())
    assert [m["type"].rsplit(".", 1)[1] for m in modules] == ["Transformer", "Pooling", "Normalize"]
    assert (final / "adapter" / "adapter_config.json").exists() == lora
    texts = ["What is 3 plus 4?", "3 plus 4 makes 7, a longer sentence than the other one."]
    ours = _embeddings_from_folder(final, texts)
    # the tuned weights, not the base: the base folder gives other embeddings
    assert not torch.allclose(ours, _embeddings_from_folder(bert_dir, texts), atol=1e-4)
    import sentence_transformers as st  # a test dependency (pyproject test extra): never skipped
    theirs = st.SentenceTransformer(str(final), device="cpu").encode(texts, convert_to_tensor=True)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sparse", [False, True])
def test_the_objective_re_embeds_each_length_group_with_the_dropout_of_its_cached_pass(bert_dir, monkeypatch,
                                                                                        sparse):
    module, tok = _module(bert_dir, dropout_off=False, sparse=sparse)
    objective = ContrastiveObjective()
    seen = []
    original = ContrastiveObjective._embed

    def recording(self, module, batch):
        vectors, temperature = original(self, module, batch)
        seen.append((batch["input_ids"].clone(), vectors.detach().clone()))
        return vectors, temperature

    monkeypatch.setattr(ContrastiveObjective, "_embed", recording)
    examples = _examples(tok, long_odd=True)
    _update(module, objective, [_batch(tok, examples[:4]), _batch(tok, examples[4:])])
    assert len(seen) == 4  # two cached passes, then two passes with gradients
    # the longest texts' group first, in both passes: the shorter groups' tensors fit in the memory it freed
    assert seen[0][0].shape[1] > seen[1][0].shape[1] and seen[2][0].shape[1] > seen[3][0].shape[1]
    for cached, again in ((seen[0], seen[2]), (seen[1], seen[3])):
        assert torch.equal(again[0], cached[0])  # the same texts
        torch.testing.assert_close(again[1], cached[1], rtol=0, atol=0)  # under the same dropout
    assert not torch.equal(seen[0][1][:2], seen[1][1][:2])


@pytest.mark.parametrize("lengths,parts,sizes", [
    ([5, 5, 5, 5], 2, [2, 2]),
    ([1, 1, 1, 1, 1, 1, 4, 4], 2, [6, 2]),  # 6 and 8 padded tokens, where 4 rows each would hold 4 and 16
    ([3, 3, 9], 3, [1, 1, 1]),
    ([2, 2, 2, 2, 2, 2, 2, 10], 2, [7, 1]),
    ([1, 2, 3, 4, 5, 6], 1, [6]),
    ([4, 4, 4, 4, 4, 4], 4, [1, 1, 2, 2]),  # the greedy fill makes 3 groups of 2; the first one is halved
])
def test_balanced_sizes_deal_ascending_lengths_into_groups_of_the_least_largest_cost(lengths, parts, sizes):
    assert balanced_sizes(lengths, parts) == sizes


def test_balanced_sizes_finds_the_least_largest_cost_of_every_cut():
    """Against every way to cut 10 random lengths into 3 consecutive groups: the least largest cost."""
    import itertools
    import random
    rng = random.Random(0)
    for _ in range(20):
        lengths = sorted(rng.randint(1, 40) for _ in range(10))
        cost = lambda sizes: max(n * lengths[sum(sizes[:k + 1]) - 1] for k, n in enumerate(sizes))  # noqa: E731
        best = min(cost([a, b - a, 10 - b]) for a, b in itertools.combinations(range(1, 10), 2))
        got = balanced_sizes(lengths, 3)
        assert len(got) == 3 and sum(got) == 10 and min(got) >= 1
        assert cost(got) == best


def test_length_groups_sort_every_text_of_the_update_and_cut_each_group_to_its_longest(bert_dir):
    _, tok = _module(bert_dir)
    examples = _examples(tok, long_odd=True)
    batches = [_batch(tok, examples[:4]), _batch(tok, examples[4:])]
    groups = length_groups(batches, tok.pad_token_id)
    rows = [r for b in batches for r, m in zip(b["input_ids"], b["attention_mask"]) for r in [r[m.bool()]]]
    assert len(groups) == 2
    assert sorted(torch.cat([g["rows"] for g in groups]).tolist()) == list(range(len(rows)))  # every row once
    assert len(groups[0]["rows"]) > len(groups[1]["rows"])  # more short texts together than long ones
    lengths = [g["attention_mask"].sum(1) for g in groups]
    assert int(lengths[0].max()) <= int(lengths[1].min())  # the short texts together, then the long ones
    for g, n in zip(groups, lengths):
        assert g["input_ids"].shape[1] == int(n.max())  # each group cut to its own longest text
        for r, length, ids in zip(g["rows"].tolist(), n.tolist(), g["input_ids"]):
            assert torch.equal(ids[:length], rows[r])
    padded = lambda bs: sum(b["input_ids"].numel() for b in bs)  # noqa: E731
    assert padded(groups) < padded(batches)


def test_mine_negatives_writes_pairs_with_k_negatives_that_are_not_the_positive(bert_dir, tmp_path):
    from tuneforge.cli import main
    from tuneforge.config.load import load_config
    from helpers.runs import write_config_yaml
    data = write_pair_data(tmp_path / "pairs.jsonl", n=24)
    cfg = _config(bert_dir, data, tmp_path / "run")
    yaml_path = write_config_yaml(cfg, tmp_path / "c.yaml")
    out = tmp_path / "mined.jsonl"
    # margin 0: skip only what scores above the positive (a random model scores every text alike)
    assert main(["data", "mine-negatives", str(yaml_path), "--out", str(out), "-k", "2", "--margin", "0"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    train = load_config(str(yaml_path), [])
    assert 0 < len(rows) <= 24 and train.data.eval_fraction  # the training split only
    originals = {json.loads(line)["anchor"]: json.loads(line) for line in data.read_text().splitlines()}
    found = 0
    for row in rows:
        source = originals[row["anchor"]]
        assert row["positive"] == source["positive"]
        mined = row["negatives"][len(source.get("negatives", [])):]
        assert len(mined) <= 2 and row["positive"] not in mined and len(set(mined)) == len(mined)
        found += len(mined)
    assert found >= len(rows)
    # the file is pair data a run reads as it is
    assert read_records(out, kind="pair").skipped == 0
