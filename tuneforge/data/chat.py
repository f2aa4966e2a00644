"""Chat rendering and the loss mask.

A conversation is rendered ONCE with the model's own chat template and tokenised whole; the loss mask comes
from character spans found by rendering prefixes of the same conversation. Tokenising prompt and response
separately and concatenating would let BPE merges across the seam shift the mask; here a token is supervised
when its characters overlap an assistant span (content plus the template's end-of-turn marker).

Convention used everywhere: `loss_mask[t] == 1` means token t is a target, predicted from tokens < t.
Masks are positional; nothing is ever masked by token id (pad can equal end-of-turn, e.g. SmolLM2).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tuneforge.data.records import ChatRecord, Source
from tuneforge.errors import AuditError


@dataclass
class TokenizedExample:
    input_ids: list[int]
    loss_mask: list[int]
    source: Source | None = None
    eot_positions: list[int] = field(default_factory=list)
    """Positions of each supervised turn's end-of-turn token (must stay supervised)."""
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class RenderStats:
    examples: int = 0
    dropped_too_long: int = 0
    truncated_left: int = 0
    tokens: int = 0
    supervised: int = 0

    def add(self, ex: TokenizedExample) -> None:
        self.examples += 1
        self.truncated_left += int(ex.truncated)
        self.tokens += len(ex.input_ids)
        self.supervised += sum(ex.loss_mask)


def with_system_prompt(msgs: list[dict], system_prompt: str | None) -> list[dict]:
    """`msgs` with `system_prompt` as a first system message, unless they open with their own.

    The only place a configured system prompt (data.system_prompt) is inserted: training (tokenize_chat) and
    generation (eval.generation) both call it, so a tuned model is prompted the way it was trained.
    """
    if system_prompt and (not msgs or msgs[0]["role"] != "system"):
        return [{"role": "system", "content": system_prompt}, *msgs]
    return list(msgs)


def _messages(record: ChatRecord, system_prompt: str | None) -> list[dict]:
    return with_system_prompt([{"role": m.role, "content": m.content} for m in record.messages], system_prompt)


def prompt_messages(record: ChatRecord, system_prompt: str | None = None) -> list[dict]:
    """The conversation up to (not including) its last assistant turn: what generation is asked to continue."""
    msgs = _messages(record, system_prompt)
    last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
    return msgs[:last]


def render(tokenizer, msgs: list[dict], add_generation_prompt: bool = False, where: Source | None = None) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise AuditError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template; set data.chat_template")
    from jinja2 import TemplateError  # here, not at the top: only chat templates need jinja2 (as transformers)

    try:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt)
    except TemplateError as exc:
        # Templates run in transformers' Jinja sandbox, so an unsafe one fails here (SecurityError) instead of
        # reaching Python internals; a broken one, or its raise_exception(...), also lands here.
        raise AuditError(f"{where or 'example'}: the chat template (data.chat_template, or the tokenizer's own) "
                         f"failed: {type(exc).__name__}: {exc}") from exc


def assistant_spans(tokenizer, msgs: list[dict], which: str, where: Source | None = None) -> tuple[str, list]:
    """Render `msgs` and return (text, [(start, end, eot_start)]) character spans of the supervised turns.

    A span runs from the end of the generation prompt to the end of the turn's end-of-turn marker (trailing
    whitespace after it, like ChatML's newline, is not part of what the model must produce). `eot_start` is
    where that marker starts (== end if the template adds none). Raises AuditError if prefix renders are not
    prefixes of the whole render: such a template would train one format and prompt another.
    """
    text = render(tokenizer, msgs, where=where)
    turns = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
    if which == "last":
        turns = turns[-1:]
    spans = []
    for i in turns:
        before = generation_prompt(tokenizer, msgs[:i], where)
        upto = render(tokenizer, msgs[: i + 1], where=where).rstrip()
        if not (text.startswith(before) and text.startswith(upto) and upto.startswith(before)):
            raise AuditError(f"{where or 'example'}: the chat template renders inconsistently: the prompt "
                             f"up to assistant turn {i} is not a prefix of the whole conversation")
        at, shown = _rendered_content(upto, msgs[i]["content"], len(before))
        if at < 0:
            raise AuditError(f"{where or 'example'}: the chat template renders inconsistently: the content of "
                             f"assistant turn {i} is not in its render, neither verbatim nor trimmed")
        spans.append((len(before), len(upto), at + shown))
    return text, spans


def _rendered_content(upto: str, content: str, start: int) -> tuple[int, int]:
    """(where, length) of a turn's content in its render, searched from `start`; (-1, 0) if it is not there.

    Verbatim, or trimmed: Llama-3 and Gemma templates render `message['content'] | trim`, so a reply with
    leading or trailing whitespace shows up without it. Then the trimmed text (and its end-of-turn marker) is
    what the model must produce, and the span from the generation prompt to the marker covers exactly that.
    """
    if not content.strip():
        return len(upto), 0
    for shown in (content, content.strip()):  # Jinja's trim is Python's str.strip()
        at = upto.find(shown, start)
        if at >= 0:
            return at, len(shown)
    return -1, 0


_PLACEHOLDER = "\ue000tuneforge-turn\ue001"  # private-use characters: no real content contains them


def generation_prompt(tokenizer, msgs: list[dict], where: Source | None = None) -> str:
    """The render after which the model writes the next assistant turn of `msgs`: what generation feeds the
    model, and in training the text before an assistant turn's supervised span (one function, so both agree).

    With no messages before the turn (a bot that greets first) there is nothing to render, and transformers
    refuses an empty conversation, but the template may still put a preamble there (an injected default
    system prompt, the turn header). Rendering an assistant turn with a placeholder content shows where its
    content starts.
    """
    if msgs:
        return render(tokenizer, msgs, add_generation_prompt=True, where=where)
    probe = render(tokenizer, [{"role": "assistant", "content": _PLACEHOLDER}], where=where)
    if _PLACEHOLDER not in probe:
        raise AuditError(f"{where or 'example'}: the chat template does not render message content verbatim")
    return probe[:probe.index(_PLACEHOLDER)]


def tokenize_chat(tokenizer, record: ChatRecord, mask: str = "assistant", max_length: int = 1024,
                  truncation: str = "drop", system_prompt: str | None = None) -> TokenizedExample | None:
    """Render and tokenise one conversation. Returns None when it is too long and must be dropped."""
    msgs = _messages(record, system_prompt)
    text, spans = assistant_spans(tokenizer, msgs, "last" if mask == "last" else "all", record.source)
    # verbose=False: no "longer than the specified maximum" warning, the length limit is data.max_length
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    if mask == "all":
        loss = [1] * len(ids)
    else:
        loss = [int(any(s < b and e > a for a, b, _ in spans)) for s, e in offsets]
    # The end-of-turn token of each turn: the last token overlapping the turn's marker (if the template has one).
    eots = []
    for a, b, eot_start in spans:
        if b > eot_start:
            eots.append(max(t for t, (s, e) in enumerate(offsets) if s < b and e > eot_start))
    loss[0] = 0  # nothing predicts the first token
    ex = TokenizedExample(list(ids), loss, record.source, eots)
    if len(ids) <= max_length:
        return ex
    return _truncate(ex, max_length, truncation, keep_all=(mask == "all"))


def _truncate(ex: TokenizedExample, max_length: int, truncation: str, keep_all: bool) -> TokenizedExample | None:
    """Cut the prompt from the left, never a supervised token (except in `all` mode, where all are)."""
    if truncation == "drop":
        return None
    cut = len(ex.input_ids) - max_length
    first_supervised = next((t for t, m in enumerate(ex.loss_mask) if m), len(ex.loss_mask))
    if not keep_all and cut > first_supervised - 1:
        return None  # the response itself would lose tokens: drop rather than silently train on a stub
    loss = ex.loss_mask[cut:]
    loss[0] = 0
    eots = [p - cut for p in ex.eot_positions if p >= cut]
    return TokenizedExample(ex.input_ids[cut:], loss, ex.source, eots, truncated=True)


def document_separator(tokenizer, override: str | None = None) -> int:
    """The token that separates documents in continued pre-training. For chat models it is not the
    end-of-turn token (SmolLM2: `<|endoftext|>`, not `<|im_end|>`)."""
    vocab = tokenizer.get_vocab()
    for cand in (override, "<|endoftext|>", "<|end_of_text|>", "</s>", tokenizer.eos_token):
        if cand and cand in vocab:
            return vocab[cand]
    raise AuditError("no document separator token found; set data.doc_separator")
