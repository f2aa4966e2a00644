"""Generation that renders prompts exactly as training did: same chat template, same system-prompt
handling, left padding for batches, stop at the end-of-turn token, greedy by default, KV cache on."""

from __future__ import annotations

import torch

from tuneforge.data.chat import generation_prompt, with_system_prompt

END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


def stop_token_ids(tokenizer) -> list[int]:
    """End-of-turn ids: the tokenizer's eos plus any known end-of-turn marker it has."""
    vocab = tokenizer.get_vocab()
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    ids |= {vocab[t] for t in END_OF_TURN_TOKENS if t in vocab}
    return sorted(ids)


def encode_prompts(tokenizer, conversations: list[list[dict]], system_prompt: str | None = None) -> list[list[int]]:
    """The ids each conversation's next assistant turn is generated after: rendered by the functions training
    renders with (system prompt, generation prompt), so inference sees what the model was trained on."""
    return [tokenizer(generation_prompt(tokenizer, with_system_prompt(c, system_prompt)),
                      add_special_tokens=False)["input_ids"] for c in conversations]


@torch.no_grad()
def generate(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int = 64, batch_size: int = 16,
             system_prompt: str | None = None, do_sample: bool = False, temperature: float = 1.0,
             top_p: float = 1.0) -> list[str]:
    """Continue each conversation with one assistant turn; returns the decoded replies (special tokens cut)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    stops = stop_token_ids(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    replies: list[str] = []
    for start in range(0, len(conversations), batch_size):
        rows = encode_prompts(tokenizer, conversations[start:start + batch_size], system_prompt)
        longest = max(map(len, rows))
        ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for r, row in enumerate(rows):  # left padding: every prompt ends where generation starts
            ids[r, longest - len(row):] = torch.tensor(row)
            mask[r, longest - len(row):] = 1
        kwargs = dict(do_sample=do_sample, temperature=temperature, top_p=top_p) if do_sample else \
            dict(do_sample=False)
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                             eos_token_id=stops, pad_token_id=pad_id, use_cache=True, **kwargs)
        for row in out[:, longest:]:
            replies.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    if was_training:
        model.train()
    return replies
