"""Multi-sequence examples through the token cache, padded and packed batches with per-sequence bookkeeping."""

from __future__ import annotations

import json

import pytest
import torch

from helpers.runs import make_config
from tuneforge.data import builders as builders_mod, readers
from tuneforge.data.collate import collate
from tuneforge.data.dataset import prepare_data
from tuneforge.data.example import Example
from tuneforge.data.packing import PackedExamples, collate_packed


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _preference_rows(n=10):
    return [{"prompt": f"Add {i} and {i + 1}.", "chosen": f"The sum is {2 * i + 1}.",
             "rejected": "I do not know" + "!" * (i % 4)} for i in range(n)]


def _pair_rows(n=6):
    return [{"anchor": f"query {i}", "positive": f"the answer to query {i}",
             "negatives": [f"unrelated text {j}" for j in range(i % 3)]} for i in range(n)]


def _prepare(tmp_path, tok, model_dir, builder, rows, **data_kw):
    path = tmp_path / "d.jsonl"
    if not path.exists():
        _write(path, rows)
    cfg = make_config(model_dir, path, tmp_path / "run")
    for k, v in data_kw.items():
        setattr(cfg.data, k, v)
    return prepare_data(cfg, tok, builder), cfg


def _content(examples):
    return [(ex.roles, ex.role_names, [(s.input_ids, s.loss_mask, s.eot_positions) for s in ex.sequences],
             ex.texts) for ex in examples]


class _ListWriter(list):
    add = list.append


@pytest.mark.parametrize("builder, rows", [("preference", _preference_rows()), ("pair", _pair_rows()),
                                           ("prompt", [{"prompt": f"Q{i}?", "reference": f"A{i}"} for i in range(5)])])
def test_multi_sequence_examples_round_trip_through_the_cache(tmp_path, tiny_model_dir, tiny_tokenizer,
                                                              monkeypatch, builder, rows):
    data, cfg = _prepare(tmp_path, tiny_tokenizer, tiny_model_dir, builder, rows)
    cls = builders_mod.BUILDERS[builder]
    built = _ListWriter()
    direct = cls(tiny_tokenizer, cfg.data, built, builders_mod.BuildStats())
    for rec in readers.iter_records(cfg.data.train):
        direct.add(rec)
    cached = [data.train[i] for i in range(len(data.train))]
    assert all(isinstance(ex, Example) for ex in cached) and len(cached) == len(built) == len(rows)
    assert _content(cached) == _content(built)
    assert [data.train.length(i) for i in range(len(cached))] == [len(ex) for ex in built]
    assert data.stats["train"]["sequences"] == sum(len(ex.sequences) for ex in built)
    # reused from the cache: no builder runs again
    monkeypatch.setattr(cls, "add", lambda *a: pytest.fail("rebuilt"))
    again, _ = _prepare(tmp_path, tiny_tokenizer, tiny_model_dir, builder, rows)
    assert again.train.folder == data.train.folder and _content(again.train[:]) == _content(cached)


def test_the_cache_key_covers_the_builder(tmp_path, tiny_model_dir, tiny_tokenizer):
    rows = [{"instruction": f"Q{i}", "output": f"A{i}"} for i in range(4)]
    chat, cfg = _prepare(tmp_path, tiny_tokenizer, tiny_model_dir, "chat", rows)
    with pytest.raises(Exception, match="'preference' data builder"):
        prepare_data(cfg, tiny_tokenizer, "preference")  # not served from the chat entry
    assert len(chat.train) == 4
    with pytest.raises(ValueError, match="unknown data builder"):
        prepare_data(cfg, tiny_tokenizer, "dpo")


def _rows_tokens(batch, n_seq):
    """Each sequence's (tokens, loss mask), read back through sequence_ids."""
    ids, mask, seq_ids = batch["input_ids"], batch["loss_mask"], batch["sequence_ids"]
    return [(ids[seq_ids == s].tolist(), mask[seq_ids == s].tolist()) for s in range(n_seq)]


def test_padded_and_packed_batches_carry_the_same_sequences(tmp_path, tiny_model_dir, tiny_tokenizer):
    data, _ = _prepare(tmp_path, tiny_tokenizer, tiny_model_dir, "preference", _preference_rows(8))
    examples = [data.train[i] for i in range(len(data.train))]
    pad = tiny_tokenizer.pad_token_id
    padded = collate(examples, pad)
    seqs = [s for ex in examples for s in ex.sequences]
    S, T = len(seqs), padded["input_ids"].shape[1]
    assert padded["input_ids"].shape[0] == S  # one sequence per row
    assert padded["sequence_example"].tolist() == [e for e in range(len(examples)) for _ in range(2)]
    assert padded["sequence_role"].tolist() == [0, 1] * len(examples)
    assert padded["last_index"].tolist() == [r * T + len(s) - 1 for r, s in enumerate(seqs)]
    assert padded["input_ids"].flatten()[padded["last_index"]].tolist() == [s.input_ids[-1] for s in seqs]
    assert int(padded["num_real"]) == sum(len(s) for s in seqs) == int(padded["attention_mask"].sum())

    capacity = 3 * max(len(ex) for ex in examples)
    packed_rows = PackedExamples(data.train, capacity)
    rows = [packed_rows[i] for i in range(len(packed_rows))]
    assert len(rows) < len(examples)  # several examples per row
    order = [ex for row in rows for ex in row]  # the batch's example order: row by row
    packed = collate_packed(rows, pad)
    B, Tp = packed["input_ids"].shape
    # an example's sequences sit in one row, whole, chosen then rejected
    row_of = packed["last_index"] // Tp
    for e in range(len(order)):
        mine = (packed["sequence_example"] == e).nonzero().flatten()
        assert len(set(row_of[mine].tolist())) == 1 and packed["sequence_role"][mine].tolist() == [0, 1]
    assert (packed["input_ids"].flatten()[packed["last_index"]] ==
            torch.tensor([s.input_ids[-1] for ex in order for s in ex.sequences])).all()
    # positions restart at every sequence; padding belongs to no sequence
    for s in range(len(seqs)):
        where = packed["sequence_ids"] == s
        assert packed["position_ids"][where].tolist() == list(range(int(where.sum())))
    assert int(packed["num_real"]) == int((packed["sequence_ids"] >= 0).sum()) == sum(len(s) for s in seqs)
    # the same tokens and masks per sequence as the padded batch of the same examples in the same order
    assert _rows_tokens(packed, S) == _rows_tokens(collate(order, pad), S)


def test_a_packed_example_never_splits_across_rows(tmp_path, tiny_model_dir, tiny_tokenizer):
    data, _ = _prepare(tmp_path, tiny_tokenizer, tiny_model_dir, "pair", _pair_rows(9), max_length=32)
    sizes = [data.train.length(i) for i in range(len(data.train))]
    packed = PackedExamples(data.train, max(sizes))
    assert sorted(i for row in packed.rows for i in row) == list(range(len(sizes)))
    assert all(sum(sizes[i] for i in row) <= max(sizes) for row in packed.rows)
    with pytest.raises(ValueError, match="all its sequences together"):
        PackedExamples(data.train, max(sizes) - 1)
    batch = collate_packed([packed[i] for i in range(len(packed))], tiny_tokenizer.pad_token_id)
    # pair masks are kept whole (pooling), the first token of a sequence included
    assert int(batch["loss_mask"].sum()) == int(batch["num_real"])


def test_packed_preference_logits_equal_padded(tmp_path, tiny_model_dir, tiny_tokenizer):
    """Each sequence sees only itself in a packed row: its logits equal those of its own padded row."""
    from tuneforge.models.load import load_causal_lm
    model, tok = load_causal_lm(str(tiny_model_dir))
    model.eval()
    data, _ = _prepare(tmp_path, tok, tiny_model_dir, "preference", _preference_rows(4))
    examples = [data.train[i] for i in range(len(data.train))]
    padded, packed = collate(examples, tok.pad_token_id), collate_packed([examples], tok.pad_token_id)
    with torch.no_grad():
        a = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
        b = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits
    for s in range(len(padded["last_index"])):
        torch.testing.assert_close(b[packed["sequence_ids"] == s], a[padded["sequence_ids"] == s],
                                   atol=1e-5, rtol=1e-4)


def test_the_cache_key_covers_the_data_code(monkeypatch):
    """A changed builder (its source) never reuses an entry an older one built."""
    from tuneforge.data import cache
    parts = {"builder": "pair", "data": {"max_length": 8}}
    before = cache.cache_key(**parts)
    assert cache.cache_key(**parts) == before  # stable
    monkeypatch.setattr(cache, "code_fingerprint", lambda: "another-version")
    assert cache.cache_key(**parts) != before
