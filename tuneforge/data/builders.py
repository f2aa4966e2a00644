"""Data builders: one per kind of training data, each turning typed records into cached examples.

A method names the builder its data goes through (the method registry maps method -> builder name); nothing
here knows about methods. Every builder has the same shape: `Builder(tokenizer, data_section, writer, stats)`,
then `add(record)` per record and `close()` at the end. Its class attributes say what it writes:
`example_type` ("tokenized": one TokenizedExample per record; "example": an Example of named sequences),
`role_names` (the fixed role order of its sequences) and `supervised` (whether any token is a target).

  text_blocks  TextRecord          documents joined by the document separator, cut into blocks (clm)
  chat         instruction, chat   the conversation rendered once, loss on the assistant turns (sft)
  preference   PreferenceRecord    chosen and rejected: prompt + answer each, loss on the answer + end of turn;
                                   the pair's margin kept as text
  pair         PairRecord          anchor, positive, negatives as plain text for an embedder, all tokens pooled
  prompt       PromptRecord        the prompt with the generation prompt, no answer; the reference text kept

Masks are derived from renders, never by token id (chat.py); every drop or cut is counted in the stats.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from tuneforge.data.audit import audit_example, summary
from tuneforge.data.chat import (
    RenderStats, TokenizedExample, document_separator, prompt_messages, render, tokenize_chat,
)
from tuneforge.data.example import Example
from tuneforge.data.records import ChatRecord, Message, PairRecord, PreferenceRecord, PromptRecord, TextRecord, as_chat
from tuneforge.errors import DataError


@dataclass
class BuildStats(RenderStats):
    """RenderStats over examples of any shape, plus what only multi-sequence builders do."""
    sequences: int = 0
    truncated_right: int = 0
    """Texts cut on the right to data.max_length (pair data: an embedder reads the start of a text)."""

    def add(self, ex) -> None:
        seqs = ex.sequences if isinstance(ex, Example) else [ex]
        self.examples += 1
        self.sequences += len(seqs)
        self.truncated_left += int(any(s.truncated for s in seqs))
        self.tokens += sum(len(s.input_ids) for s in seqs)
        self.supervised += sum(sum(s.loss_mask) for s in seqs)

    def summary(self) -> dict:
        return {**summary(self), "sequences": self.sequences, "truncated_right": self.truncated_right}


def _field_error(record, field: str, message: str) -> DataError:
    src = record.source
    return DataError(message, path=getattr(src, "path", None), line=getattr(src, "line", None), field=field,
                     index_kind=getattr(src, "index_kind", "line"))


def _expect(record, kind: type, builder: str):
    if not isinstance(record, kind):
        raise _field_error(record, None, f"a {type(record).__name__} record cannot go through the {builder!r} "
                                         f"data builder; it needs {kind.__name__} data (data.kind)")
    return record


def _encode(tokenizer, text: str, **kwargs) -> list[int]:
    # verbose=False: lengths are checked here against data.max_length, so transformers' warning about the
    # model's maximum would be a false alarm (and the tokenizer's maximum is often meaningless).
    return tokenizer(text, verbose=False, **kwargs)["input_ids"]


def _prompt_turns(prompt: str | list[Message], system_prompt: str | None) -> list[dict]:
    """The messages before the answer: [system], user (a prompt string), or the prompt's own messages. Derived
    by chat.prompt_messages from the conversation with an empty answer, so the system prompt is applied
    exactly as for sft (and for generation)."""
    turns = [Message("user", prompt)] if isinstance(prompt, str) else list(prompt)
    return prompt_messages(ChatRecord(turns + [Message("assistant", "")]), system_prompt)


class Builder:
    example_type = "tokenized"
    role_names: tuple[str, ...] = ("text",)
    supervised = True

    def __init__(self, tokenizer, data, writer, stats: BuildStats, options: dict | None = None):
        """`options`: settings of the method's own config section that change the tokens (the method's
        `builder_options`; part of the token cache's key)."""
        self.tok, self.data, self.writer, self.stats = tokenizer, data, writer, stats
        self.options = dict(options or {})

    def _keep(self, ex) -> None:
        self.stats.add(ex)
        self.writer.add(ex)

    def close(self) -> None:
        pass


class TextBlocks(Builder):
    """Continued pre-training: documents joined by the document separator, cut into fixed-length blocks."""

    def __init__(self, tokenizer, data, writer, stats, options=None):
        super().__init__(tokenizer, data, writer, stats, options)
        self.block, self.sep = data.max_length, document_separator(tokenizer, data.doc_separator)
        self.buffer: list[int] = []

    def add(self, record) -> None:
        record = _expect(record, TextRecord, "text_blocks")
        self.buffer.extend(_encode(self.tok, record.text, add_special_tokens=False))
        self.buffer.append(self.sep)
        # Blocks are cut at a moving start and the consumed head is deleted once: each token is copied a
        # bounded number of times (re-slicing the remainder per block was quadratic in the document length).
        start = 0
        while len(self.buffer) - start >= self.block:
            self._emit(self.buffer[start:start + self.block])
            start += self.block
        del self.buffer[:start]

    def _emit(self, ids: list[int]) -> None:
        self._keep(TokenizedExample(ids, [0] + [1] * (len(ids) - 1)))

    def close(self) -> None:
        if len(self.buffer) > 1:  # the tail: a shorter block, padded by the collator
            self._emit(self.buffer)
        self.buffer = []


class ChatBuilder(Builder):
    """Instruction and chat fine-tuning: render, mask, truncate or drop, audit."""

    def add(self, record) -> None:
        chat = as_chat(record)
        d = self.data
        ex = tokenize_chat(self.tok, chat, d.mask, d.max_length, d.truncation, d.system_prompt)
        if ex is None:
            self.stats.dropped_too_long += 1
            return
        turns = None if d.mask == "all" else (1 if d.mask == "last" else
                                               sum(m.role == "assistant" for m in chat.messages))
        audit_example(ex, turns)
        self._keep(ex)


class PreferenceBuilder(Builder):
    """Chosen and rejected answers to one prompt, each sequence = prompt + answer (DPO, reward models).

    The prompt is rendered once (its messages, a plain prompt being one user turn, + the generation prompt;
    the system prompt as for sft, unless the prompt opens with its own); each answer is
    rendered as the assistant turn continuing it and masked by chat.tokenize_chat (answer + end of turn, by
    character spans, as sft). The unsupervised prefix must be the same tokens in both sequences, a prefix of the
    prompt's own tokens: a BPE merge across the seam in one answer only (a template whose generation prompt
    ends in a space, an answer whose first letters join it) would compare the two answers from different
    contexts, so it is refused. A merge in both answers alike only moves the seam token into both answers."""

    example_type = "example"
    role_names = ("chosen", "rejected")

    def add(self, record) -> None:
        rec = _expect(record, PreferenceRecord, "preference")
        for field in self.role_names:
            if not getattr(rec, field).strip():
                raise _field_error(rec, field, "empty answer")
        if rec.chosen == rec.rejected:
            raise _field_error(rec, "rejected", "identical to the chosen answer: the pair prefers nothing")
        d = self.data
        turns = _prompt_turns(rec.messages(), d.system_prompt)
        prompt_ids = _encode(self.tok, render(self.tok, turns, add_generation_prompt=True, where=rec.source),
                             add_special_tokens=False)
        if len(prompt_ids) > d.max_length:
            self.stats.dropped_too_long += 1
            return
        seqs = [self._answer(rec, turns, field) for field in self.role_names]
        shared = _shared_prefix(rec, seqs, prompt_ids, self.role_names)
        cut = max(len(s) for s in seqs) - d.max_length
        if cut > 0:
            # cut the shared prompt from the left, by the same amount in both (the prefix stays shared), keeping
            # one prompt token before the answer; never cut an answer
            if d.truncation != "left" or cut > shared - 1:
                self.stats.dropped_too_long += 1
                return
            seqs = [_cut_left(s, cut) for s in seqs]
            shared -= cut
        kept = None if rec.margin is None else {"margin": rec.margin}  # the collators' batch["margin"]
        self._keep(Example(seqs, [0, 1], self.role_names, kept, rec.source, shared_prefix=shared))

    def _answer(self, rec, turns: list[dict], field: str) -> TokenizedExample:
        conversation = ChatRecord([Message(m["role"], m["content"]) for m in turns]
                                  + [Message("assistant", getattr(rec, field))], rec.source)
        # the system prompt is already in `turns`; length limits are applied above, to both answers at once
        seq = tokenize_chat(self.tok, conversation, "last", sys.maxsize, "drop", None)
        audit_example(seq, 1)  # an end-of-turn token, supervised
        return seq


def _shared_prefix(rec, seqs: list[TokenizedExample], prompt_ids: list[int], fields) -> int:
    """The number of unsupervised leading tokens, checked equal in every sequence and a prefix of the prompt's
    tokens; a DataError naming the answer that breaks it."""
    starts = [seq.loss_mask.index(1) for seq in seqs]  # audited: each sequence supervises its end of turn
    for seq, start, field in zip(seqs, starts, fields):
        if start != starts[0] or seq.input_ids[:start] != prompt_ids[:start]:
            merged = next((f for f, at in zip(fields, starts) if at < len(prompt_ids)), field)
            raise _field_error(rec, merged, "the answer's first characters merge with the end of the prompt into "
                                            "one token in this answer but not in the other, so the two answers "
                                            "would not continue the same prompt tokens; change the answer's "
                                            "first characters or the chat template's generation prompt")
    return starts[0]


def _cut_left(seq: TokenizedExample, cut: int) -> TokenizedExample:
    return TokenizedExample(seq.input_ids[cut:], seq.loss_mask[cut:], seq.source,
                            [p - cut for p in seq.eot_positions], truncated=True)


class PairBuilder(Builder):
    """Contrastive pairs for an embedder: each text tokenised as plain text (the tokenizer's own special
    tokens, e.g. [CLS]/[SEP]; no chat template), cut on the right to data.max_length. The loss mask is all
    ones: pooling reads it. The texts are kept, to find false negatives (a negative equal to a positive), with
    the pair's `score` when it has one (held-out Spearman).

    Options (the contrastive section): `query_prefix` is put before the anchor, `document_prefix` before the
    positive and every negative (instruction prefixes such as E5's "query: " / "passage: "); the kept texts
    are the records' own, without them.

    A `text` record is an unsupervised SimCSE example (Gao et al. 2021): the text is its own positive, the
    same tokens twice (two rows), so the two embeddings differ only by the dropout masks of the forward. Both
    rows carry the document prefix: they must be the same input."""

    example_type = "example"
    role_names = ("anchor", "positive", "negative")

    def add(self, record) -> None:
        if isinstance(record, TextRecord):
            return self._add_text(record)
        rec = _expect(record, PairRecord, "pair")
        query, document = self.options.get("query_prefix") or "", self.options.get("document_prefix") or ""
        texts = [("anchor", "anchor", query, rec.anchor), ("positive", "positive", document, rec.positive)]
        texts += [("negative", f"negatives[{k}]", document, text) for k, text in enumerate(rec.negatives)]
        seqs = [self._encode(rec, field, prefix, text) for _, field, prefix, text in texts]
        roles = [self.role_names.index(role) for role, _, _, _ in texts]
        kept = {"anchor": rec.anchor, "positive": rec.positive, "negatives": list(rec.negatives)}
        if rec.score is not None:
            kept["score"] = rec.score
        self._keep(Example(seqs, roles, self.role_names, kept, rec.source))

    def _add_text(self, rec: TextRecord) -> None:
        seq = self._encode(rec, "text", self.options.get("document_prefix") or "", rec.text)
        kept = {"anchor": rec.text, "positive": rec.text, "negatives": []}
        self._keep(Example([seq, seq], [0, 1], self.role_names, kept, rec.source))

    def _encode(self, rec, field: str, prefix: str, text: str) -> TokenizedExample:
        if not text.strip():
            raise _field_error(rec, field, "empty text")
        ids, truncated = embedder_ids(self.tok, prefix + text, self.data.max_length)
        self.stats.truncated_right += truncated
        return TokenizedExample(ids, [1] * len(ids), rec.source)  # (`truncated` means cut on the left)


def embedder_tokens(tokenizer, text: str, max_length: int) -> tuple[list[int], int]:
    """(token ids, the text's token count before any cut) of one text as an embedder reads it: plain text with
    the tokenizer's own special tokens, cut on the right to max_length by the tokenizer's own truncation (which
    keeps a closing [SEP])."""
    ids = _encode(tokenizer, text, add_special_tokens=True)
    if len(ids) <= max_length:
        return list(ids), len(ids)
    return list(_encode(tokenizer, text, add_special_tokens=True, truncation=True, max_length=max_length)), len(ids)


def embedder_ids(tokenizer, text: str, max_length: int) -> tuple[list[int], bool]:
    """(token ids, cut?) of one text as an embedder reads it (`embedder_tokens`)."""
    ids, count = embedder_tokens(tokenizer, text, max_length)
    return ids, count > len(ids)


class PromptBuilder(Builder):
    """Prompts for generation (RL rollouts): the chat template with the generation prompt, no answer, nothing
    supervised. The prompt and its reference answer are kept as text (for reward functions)."""

    example_type = "example"
    role_names = ("prompt",)
    supervised = False

    def add(self, record) -> None:
        rec = _expect(record, PromptRecord, "prompt")
        if not rec.prompt.strip():
            raise _field_error(rec, "prompt", "empty prompt")
        turns = _prompt_turns(rec.prompt, self.data.system_prompt)
        ids = _encode(self.tok, render(self.tok, turns, add_generation_prompt=True, where=rec.source),
                      add_special_tokens=False)
        if len(ids) > self.data.max_length:
            self.stats.dropped_too_long += 1
            return
        seq = TokenizedExample(list(ids), [0] * len(ids), rec.source)
        self._keep(Example([seq], [0], self.role_names, {"prompt": rec.prompt, "reference": rec.reference},
                           rec.source))


BUILDERS: dict[str, type[Builder]] = {
    "text_blocks": TextBlocks,
    "chat": ChatBuilder,
    "preference": PreferenceBuilder,
    "pair": PairBuilder,
    "prompt": PromptBuilder,
}
