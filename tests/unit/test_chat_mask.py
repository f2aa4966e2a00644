"""The loss mask: responses only, end-of-turn included, every assistant turn, broken templates refused."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from tuneforge.data.audit import audit_example, format_example
from tuneforge.data.chat import tokenize_chat
from tuneforge.data.collate import collate
from tuneforge.data.records import ChatRecord, InstructionRecord, Message
from tuneforge.errors import AuditError
from tuneforge.models.tiny import make_tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return make_tiny_tokenizer()


def supervised_text(tok, ex):
    return tok.decode([t for t, m in zip(ex.input_ids, ex.loss_mask) if m])


def chat(*pairs):
    msgs = []
    for user, assistant in pairs:
        msgs += [Message("user", user), Message("assistant", assistant)]
    return ChatRecord(msgs)


def test_prompt_masked_response_and_end_of_turn_supervised(tok):
    ex = tokenize_chat(tok, InstructionRecord("Add 2 and 3.", "The sum is 5.").to_chat())
    assert supervised_text(tok, ex) == "The sum is 5.<|im_end|>"
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    assert ex.eot_positions and all(ex.input_ids[p] == eot and ex.loss_mask[p] for p in ex.eot_positions)
    # the default system prompt injected by the template is rendered but not supervised
    assert "tiny helpful assistant" in tok.decode(ex.input_ids)


def test_every_assistant_turn_supervised(tok):
    ex = tokenize_chat(tok, chat(("Hi", "Hello there."), ("And?", "Fine, thanks.")))
    assert supervised_text(tok, ex) == "Hello there.<|im_end|>Fine, thanks.<|im_end|>"
    assert len(ex.eot_positions) == 2
    last = tokenize_chat(tok, chat(("Hi", "Hello there."), ("And?", "Fine, thanks.")), mask="last")
    assert supervised_text(tok, last) == "Fine, thanks.<|im_end|>"
    everything = tokenize_chat(tok, chat(("Hi", "Hello there.")), mask="all")
    assert sum(everything.loss_mask) == len(everything.input_ids) - 1  # all but the first token


def test_padding_never_masks_end_of_turn_even_when_pad_is_eot(tok):
    assert tok.pad_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    short = tokenize_chat(tok, chat(("Hi", "Yo.")))
    long = tokenize_chat(tok, chat(("Hello, how are you today?", "Very well, thank you.")))
    batch = collate([short, long], tok.pad_token_id)
    row = batch["loss_mask"][0]
    for p in short.eot_positions:
        assert row[p] == 1
    assert row[len(short):].sum() == 0 and batch["attention_mask"][0, len(short):].sum() == 0


def test_broken_template_refused(tok):
    broken = make_tiny_tokenizer()
    # renders the final message differently from the same message inside a longer conversation
    broken.chat_template = ("{% for m in messages %}{% if loop.last %}<|im_start|>{{ m['role'] }} LAST\n"
                            "{% else %}<|im_start|>{{ m['role'] }}\n{% endif %}{{ m['content'] }}<|im_end|>\n"
                            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    with pytest.raises(AuditError, match="inconsistent"):
        tokenize_chat(broken, chat(("Hi", "Hello.")))


def test_template_without_end_of_turn_refused():
    tok = make_tiny_tokenizer()
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}")
    ex = tokenize_chat(tok, chat(("Hi", "Hello.")))
    with pytest.raises(AuditError, match="never learn to stop"):
        audit_example(ex, expected_turns=1)


def test_truncation_cuts_prompt_from_left_never_the_response(tok):
    rec = InstructionRecord("word " * 60, "Short answer.").to_chat()
    full = tokenize_chat(tok, rec, max_length=4096)
    limit = len(full) - 10
    assert tokenize_chat(tok, rec, max_length=limit, truncation="drop") is None
    cut = tokenize_chat(tok, rec, max_length=limit, truncation="left")
    assert len(cut) == limit and cut.truncated
    assert supervised_text(tok, cut) == "Short answer.<|im_end|>"
    assert all(cut.loss_mask[p] for p in cut.eot_positions)
    long_answer = InstructionRecord("Q", "word " * 80).to_chat()
    assert tokenize_chat(tok, long_answer, max_length=32, truncation="left") is None  # would cut the response


def test_format_example_marks_supervised_spans(tok):
    ex = tokenize_chat(tok, chat(("Hi", "Hello.")))
    text = format_example(tok, ex)
    assert "[[Hello.<|im_end|>]]" in text and text.count("[[") == 1


@settings(max_examples=40, deadline=None)
@given(st.text(alphabet="abcdefghij XYZ0123456789.,!?'-", min_size=1, max_size=40).filter(
    lambda s: s.strip() == s and s))
def test_mask_matches_response_for_any_text(content):
    tok = _TOK
    ex = tokenize_chat(tok, chat(("Question?", content)))
    assert supervised_text(tok, ex) == content + "<|im_end|>"


_TOK = make_tiny_tokenizer()


def test_conversation_opening_with_an_assistant_turn(tok):
    """Nothing precedes the first turn, but the template still injects its default system prompt and the turn
    header there: they are prompt, not response (found by tests/unit/test_properties.py)."""
    record = ChatRecord([Message("assistant", "Hello, how can I help?"), Message("user", "Add 2 and 3."),
                         Message("assistant", "5")])
    ex = tokenize_chat(tok, record)
    assert supervised_text(tok, ex) == "Hello, how can I help?<|im_end|>5<|im_end|>"
    assert "tiny helpful assistant" in tok.decode(ex.input_ids)


# Llama-3 and Gemma render `message['content'] | trim`; this is the tiny tokenizer's ChatML with the same trim.
TRIM_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
PADDED = ChatRecord([Message("system", "\n Be brief.  "), Message("user", "  Hi there \n"),
                     Message("assistant", "\n  Hello.  \n"), Message("user", "\tAnd?\n"),
                     Message("assistant", " Fine,\n thanks.\n\n")])


def test_trimming_template_masks_exactly_the_trimmed_reply_and_end_of_turn():
    tok = make_tiny_tokenizer()
    tok.chat_template = TRIM_TEMPLATE
    ex = tokenize_chat(tok, PADDED)
    assert supervised_text(tok, ex) == "Hello.<|im_end|>Fine,\n thanks.<|im_end|>"
    assert len(ex.eot_positions) == 2
    audit_example(ex, expected_turns=2)
    assert supervised_text(tok, tokenize_chat(tok, PADDED, mask="last")) == "Fine,\n thanks.<|im_end|>"
    opening = ChatRecord([Message("assistant", "  Welcome!\n"), Message("user", " Q "), Message("assistant", " A ")])
    assert supervised_text(tok, tokenize_chat(tok, opening)) == "Welcome!<|im_end|>A<|im_end|>"


def test_padded_content_under_a_verbatim_template_keeps_its_whitespace(tok):
    ex = tokenize_chat(tok, PADDED)
    assert supervised_text(tok, ex) == "\n  Hello.  \n<|im_end|> Fine,\n thanks.\n\n<|im_end|>"


@pytest.mark.parametrize("template", [
    # trims only the final message, so a turn renders differently once the conversation goes on
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if loop.last %}{{ m['content'] | trim }}{% else %}"
    "{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    # changes the content in a way other than trimming it
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | upper }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
])
def test_templates_that_really_render_inconsistently_are_still_refused(template):
    tok = make_tiny_tokenizer()
    tok.chat_template = template
    with pytest.raises(AuditError, match="inconsistent"):
        tokenize_chat(tok, PADDED)
