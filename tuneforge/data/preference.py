"""Preference rows into PreferenceRecord: the plain form and the two conversational forms of public data sets.

  plain         prompt, chosen, rejected: strings (the prompt is one user turn)
  explicit      prompt: a message list (or a string); chosen, rejected: the answer turn (a list of one assistant
                message, or a string), or the whole conversation repeating the prompt (HuggingFaceH4's
                ultrafeedback_binarized writes it so)
  implicit      no prompt; chosen, rejected: whole conversations, the messages they share before their last
                assistant turn being the prompt (Anthropic HH in its conversational form)

Each answer is exactly one assistant turn: a pair of multi-turn continuations (several messages after the
prompt) is refused rather than half-read. An optional `margin`, or `score_chosen` and `score_rejected` (margin =
their difference), says how much better the chosen answer is.
"""

from __future__ import annotations


from tuneforge.data.records import (
    Message, PreferenceRecord, Source, _err, _string, _type_name, message_list, number_field,
)


def preference_record(obj: dict, src: Source, cols: dict, tabular: bool) -> PreferenceRecord:
    """The record of one preference row (any of the three forms), or a DataError naming file, line and field.

    CSV/TSV cells are read as strings (the plain form): a cell is not parsed as a message list, since a prompt
    may well start with "[".
    """
    pk, ck, rk = cols["prompt"], cols["chosen"], cols["rejected"]
    margin = _margin(obj, src, cols, tabular)
    if not any(isinstance(obj.get(k), list) for k in (pk, ck, rk)):
        prompt, chosen, rejected = (_string(obj, k, src) for k in (pk, ck, rk))
        if chosen == rejected:
            raise _identical(src, rk)
        return PreferenceRecord(prompt, chosen, rejected, src, margin=margin)
    if obj.get(pk) is not None:
        prompt = _explicit_prompt(obj, pk, src, cols)
        chosen, rejected = (_explicit_answer(obj, k, prompt, src, cols) for k in (ck, rk))
        if chosen == rejected:
            raise _identical(src, rk)
        where = pk
    else:
        prompt, chosen, rejected = _implicit(obj, src, cols)
        where = ck
    _check_prompt(prompt, src, where, cols)
    return PreferenceRecord(prompt[-1].content, chosen, rejected, src, prompt, margin)


def _identical(src: Source, field: str):
    return _err(src, field, "chosen and rejected are identical, so the pair teaches nothing")


def _turns(obj: dict, key: str, src: Source, cols: dict, what: str) -> list[Message]:
    value = obj.get(key)
    if value is None and key not in obj:
        present = ", ".join(map(str, list(obj)[:10])) or "none"
        raise _err(src, key, f"missing required field (present: {present})")
    if not isinstance(value, list) or not value:
        got = "an empty list" if isinstance(value, list) else _type_name(value)
        raise _err(src, key, f"expected {what}, got {got}")
    return message_list(value, key, src, cols)


def _explicit_prompt(obj: dict, key: str, src: Source, cols: dict) -> list[Message]:
    if isinstance(obj[key], str):
        return [Message("user", _string(obj, key, src))]
    return _turns(obj, key, src, cols, "a string or a non-empty list of messages")


def _ends_with_assistant(msgs: list[Message], key: str, src: Source, cols: dict) -> None:
    if msgs[-1].role != "assistant":
        raise _err(src, f"{key}[{len(msgs) - 1}].{cols['role']}", f"the answer must end with an assistant turn, "
                   f"not a {msgs[-1].role} turn")


def _explicit_answer(obj: dict, key: str, prompt: list[Message], src: Source, cols: dict) -> str:
    """The answer text at `key`: a string, one assistant message, or the prompt's messages then the answer."""
    if isinstance(obj.get(key), str):
        return _string(obj, key, src)
    msgs = _turns(obj, key, src, cols, "a string or a non-empty list of messages")
    _ends_with_assistant(msgs, key, src, cols)
    if len(msgs) == 1 or msgs[:-1] == prompt:
        return msgs[-1].content
    shared = _common_length(msgs, prompt)
    if shared == len(msgs):
        raise _err(src, key, f"the conversation ends inside the prompt (it is the first {shared} messages of "
                   f"{cols['prompt']}): the answer must follow the whole prompt")
    if shared == len(prompt):
        raise _multi_turn(src, key, len(msgs) - shared, "the prompt")
    raise _differs(src, key, shared, msgs, prompt, cols, f"{cols['prompt']}[{shared}]")


def _implicit(obj: dict, src: Source, cols: dict) -> tuple[list[Message], str, str]:
    """(prompt, chosen answer, rejected answer) of two whole conversations."""
    ck, rk = cols["chosen"], cols["rejected"]
    what = f"a non-empty list of messages (with no {cols['prompt']!r} field, chosen and rejected are whole " \
           "conversations)"
    chosen, rejected = _turns(obj, ck, src, cols, what), _turns(obj, rk, src, cols, what)
    for key, msgs in ((ck, chosen), (rk, rejected)):
        _ends_with_assistant(msgs, key, src, cols)
    if chosen == rejected:
        raise _identical(src, rk)
    shared = _common_length(chosen, rejected)
    prompt_end = min(shared, len(chosen) - 1, len(rejected) - 1)  # the prompt never holds a last turn
    if prompt_end == len(chosen) - 1 == len(rejected) - 1:
        return chosen[:prompt_end], chosen[-1].content, rejected[-1].content
    if shared < min(len(chosen), len(rejected)) - 1:  # they part before either's last turn: other prompts
        raise _differs(src, rk, shared, rejected, chosen, cols, f"{ck}[{shared}]")
    key, msgs = (ck, chosen) if len(chosen) > len(rejected) else (rk, rejected)
    raise _multi_turn(src, key, len(msgs) - prompt_end, "the prompt it shares with the other answer")


def _common_length(a: list[Message], b: list[Message]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _differs(src: Source, key: str, at: int, msgs: list[Message], other: list[Message], cols: dict,
             other_name: str):
    field = cols["role"] if at < len(other) and msgs[at].role != other[at].role else cols["content"]
    return _err(src, f"{key}[{at}].{field}", f"differs from {other_name}: chosen and rejected must answer the "
                "same prompt (every message before the answer's assistant turn the same)")


def _multi_turn(src: Source, key: str, count: int, after: str):
    return _err(src, key, f"{count} messages follow {after}: only one assistant turn per answer is supported "
                "(multi-turn answers are not; end each conversation at its first differing assistant turn)")


def _check_prompt(prompt: list[Message], src: Source, key: str, cols: dict) -> None:
    """The prompt (at field `key`, or the first messages of the conversations there) ends with a user turn."""
    if not prompt:
        raise _err(src, key, "no prompt: the two conversations share no message before their answers")
    if prompt[-1].role != "user":
        raise _err(src, f"{key}[{len(prompt) - 1}].{cols['role']}", "the prompt must end with a user turn, not "
                   f"a {prompt[-1].role} turn")


# ------------------------------------------------------------------------------------------------------ margin

def _margin(obj: dict, src: Source, cols: dict, tabular: bool) -> float | None:
    """`margin` if given, else score_chosen - score_rejected if both are given, else None. Never negative:
    a pair whose own scores prefer the rejected answer is mislabelled, and training on it would teach the
    opposite of the label with extra weight."""
    mk, sck, srk = cols["margin"], cols["score_chosen"], cols["score_rejected"]
    margin = number_field(obj, mk, src, tabular)
    if margin is not None:
        if margin < 0:
            raise _err(src, mk, f"negative margin {margin}: the chosen answer must be the better one")
        return margin
    chosen, rejected = number_field(obj, sck, src, tabular), number_field(obj, srk, src, tabular)
    if chosen is None and rejected is None:
        return None
    if chosen is None or rejected is None:
        given, absent = (srk, sck) if chosen is None else (sck, srk)
        raise _err(src, absent, f"missing while {given} is given: a margin needs both scores")
    if chosen < rejected:
        raise _err(src, srk, f"{rejected} is higher than {sck} {chosen}: the scores prefer the rejected answer")
    return chosen - rejected
