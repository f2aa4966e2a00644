"""The reward model: a causal LM body with a scalar head, read at each sequence's last real token.

The head is one `nn.Linear(hidden, 1, bias=False)` in float32, registered as an extra head of the TrainModule
(models/heads.py), so it is trained with the model and seen by data-parallel wrappers. No bias: the
Bradley-Terry loss depends only on reward differences, so a bias would get no gradient from it, and
transformers' `*ForSequenceClassification.score` has none either, which makes the export exact.

The reward is read BY POSITION (`last_index`, the flat row * T + col index of each sequence's last real token,
from the collators), never by token id: SmolLM2's pad id is its end-of-turn id.

The saved result is a transformers sequence-classification folder. Its forward finds the last token as the
rightmost token that is not `config.pad_token_id`; with pad == end-of-turn that is the wrong token whenever a
sequence ends with its end-of-turn. So the exported tokenizer pads with a token that never ends a rendered
conversation (its own pad when that is safe, else a new `<|reward_pad|>` with a zero embedding row), and the
config's `pad_token_id` is that token.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from tuneforge.errors import TuneforgeError

HEAD = "reward"
PAD_TOKEN = "<|reward_pad|>"
HEAD_FILE = "reward_head.safetensors"


def make_reward_head(cfg, model) -> dict[str, nn.Module]:
    """{"reward": Linear(hidden, 1)}, float32, on the model's device: the `heads` entry of method reward.

    Init: normal(0, initializer_range) (0.02 by default), what transformers gives a fresh `score` head. Not
    zeros: with a zero head the body's (and LoRA's) gradient d r / d h = w is zero, so the first update would
    train the head alone; small weights keep the first rewards near 0 (loss near log 2) and train all at once.
    Seeded by train.seed with its own generator: every rank and every resume starts from the same head.

    The LM's output head is not part of a reward model; untied, it is frozen so it is neither trained nor
    checkpointed, and DDP does not wait for a gradient it never gets.
    """
    from tuneforge.models.heads import unwrap
    base = unwrap(model)
    config = base.config.get_text_config()
    head = nn.Linear(config.hidden_size, 1, bias=False, dtype=torch.float32)
    gen = torch.Generator().manual_seed(cfg.train.seed)
    with torch.no_grad():
        head.weight.normal_(0.0, getattr(config, "initializer_range", 0.02), generator=gen)
    out_head, in_emb = base.get_output_embeddings(), base.get_input_embeddings()
    if out_head is not None and out_head.weight is not in_emb.weight:
        out_head.weight.requires_grad_(False)
    return {HEAD: head.to(next(base.parameters()).device)}


def rewards_at(hidden: torch.Tensor, last_index: torch.Tensor, head: nn.Module) -> torch.Tensor:
    """(S,) float32 rewards: `head` on the hidden states (B, T, H) at the flat positions `last_index` (S,).

    The head runs in float32 with autocast off: rewards are compared by their differences, which bf16's
    8-bit mantissa would blur."""
    picked = hidden.reshape(-1, hidden.shape[-1])[last_index]  # (S, H)
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        return head(picked.float()).squeeze(-1)


# ---------------------------------------------------------------- the saved folder: a sequence classifier

def _pad_is_safe(tokenizer) -> bool:
    """The tokenizer's pad can be the classifier's pad: set, not eos, and absent from a rendered exchange."""
    pad = tokenizer.pad_token_id
    if pad is None or pad == tokenizer.eos_token_id:
        return False
    from tuneforge.data.chat import render
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    ids = tokenizer(render(tokenizer, msgs), add_special_tokens=False)["input_ids"]
    return pad not in ids


def classifier_tokenizer(tokenizer):
    """A copy of `tokenizer` whose pad token never ends a real sequence (see the module docstring)."""
    tok = copy.deepcopy(tokenizer)
    if not _pad_is_safe(tok):
        tok.add_special_tokens({"pad_token": PAD_TOKEN})
    tok.padding_side = "right"
    return tok


def sequence_classifier(module, tokenizer):
    """(AutoModelForSequenceClassification with num_labels=1, its tokenizer) holding the TrainModule's body
    (LoRA merged into a copy of the base, the training model untouched) and reward head."""
    from transformers import AutoModelForSequenceClassification

    from tuneforge.adapters.lora import is_peft_model
    if HEAD not in module.heads:
        raise TuneforgeError("this model has no reward head (train it with method: reward)")
    model = module.model
    body = copy.deepcopy(model).merge_and_unload() if is_peft_model(model) else model
    tok = classifier_tokenizer(tokenizer)
    config = copy.deepcopy(body.config)
    config.num_labels, config.architectures = 1, None
    param = next(body.parameters())
    classifier = AutoModelForSequenceClassification.from_config(config, dtype=param.dtype,
                                                                attn_implementation="sdpa")
    missing, unexpected = classifier.base_model.load_state_dict(body.base_model.state_dict(), strict=False)
    if missing or not hasattr(classifier, "score"):
        raise TuneforgeError(f"cannot export {type(body).__name__} as a sequence classifier (missing weights "
                             f"{missing[:3]}, or no `score` head)")
    with torch.no_grad():
        classifier.score.weight.copy_(module.heads[HEAD].weight.to(classifier.score.weight.dtype))
    if len(tok) > classifier.get_input_embeddings().weight.shape[0]:
        old = classifier.get_input_embeddings().weight.shape[0]
        classifier.resize_token_embeddings(len(tok), mean_resizing=False)
        with torch.no_grad():  # the pad row is never read by a real token: zeros, deterministic
            classifier.get_input_embeddings().weight[old:].zero_()
    classifier.config.pad_token_id = tok.pad_token_id
    return classifier.eval(), tok


def save_reward_model(module, tokenizer, folder: Path, adapter_base: str | None = None,
                      system_prompt: str | None = None) -> None:
    """`folder`: the sequence-classifier folder (model, tokenizer, reward.json); under LoRA also `adapter/`
    (the PEFT adapter and reward_head.safetensors), so the adapter stays switchable on the base."""
    import json

    from safetensors.torch import save_file

    from tuneforge.adapters.lora import is_peft_model, save_adapter
    classifier, tok = sequence_classifier(module, tokenizer)
    classifier.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    # what scoring needs besides the weights: the system prompt training rendered with
    (Path(folder) / "reward.json").write_text(json.dumps({"system_prompt": system_prompt}, indent=1))
    if is_peft_model(module.model):
        adapter = Path(folder) / "adapter"
        save_adapter(module.model, adapter, base_model=adapter_base)
        save_file({"weight": module.heads[HEAD].weight.detach().cpu().contiguous()}, str(adapter / HEAD_FILE))
