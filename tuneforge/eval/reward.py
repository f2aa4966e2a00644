"""Scoring with a trained reward model (the `final/` folder of a `method: reward` run).

`score(model_dir, prompts, responses)` renders each (prompt, response) exactly as the preference builder
rendered training answers (chat template, data.system_prompt from the folder's reward.json, the answer as the
assistant turn with its end of turn), right-pads the batch and reads the reward at each sequence's last real
token by position: the same number tuneforge computed in training, and what
`AutoModelForSequenceClassification` gives for the folder with its tokenizer's padding.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import torch

from tuneforge.errors import TuneforgeError


def reward_folder(model_dir) -> Path:
    """The sequence-classifier folder: `model_dir` itself, or `model_dir/final` for a run folder."""
    path = Path(model_dir).expanduser()
    if not (path / "config.json").is_file() and (path / "final" / "config.json").is_file():
        path = path / "final"
    if not (path / "config.json").is_file():
        raise TuneforgeError(f"{model_dir}: not a reward model folder (no config.json; pass a run's final/)")
    # a causal LM folder would load as a classifier with a fresh random head and score noise without a word
    try:
        architectures = json.loads((path / "config.json").read_text(encoding="utf-8")).get("architectures") or []
    except (OSError, ValueError) as exc:
        raise TuneforgeError(f"{path / 'config.json'}: unreadable: {exc}") from exc
    if not any(str(a).endswith("ForSequenceClassification") for a in architectures):
        raise TuneforgeError(f"{model_dir}: not a reward model folder (config.json names {architectures or 'no'} "
                             "architecture, not a *ForSequenceClassification: pass the final/ of a "
                             "`method: reward` run)")
    return path


def encode_answer(tokenizer, prompt: str, response: str, system_prompt: str | None = None) -> list[int]:
    """The token ids of prompt + response as the preference builder renders one answer (data/builders.py)."""
    from tuneforge.data.chat import prompt_messages, tokenize_chat
    from tuneforge.data.records import ChatRecord, Message
    turns = prompt_messages(ChatRecord([Message("user", prompt), Message("assistant", "")]), system_prompt)
    conversation = ChatRecord([Message(m["role"], m["content"]) for m in turns] + [Message("assistant", response)])
    return tokenize_chat(tokenizer, conversation, "last", sys.maxsize, "drop", None).input_ids


class RewardScorer:
    """A loaded reward model; `scorer(prompts, responses)` -> rewards (float per pair of texts)."""

    def __init__(self, model_dir, device: str | torch.device | None = None):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        folder = reward_folder(model_dir)
        try:
            self.model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1,
                                                                            dtype=torch.float32).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(folder)
        except (OSError, ValueError) as exc:
            raise TuneforgeError(f"{folder}: cannot load the reward model: {exc}") from exc
        if device is not None:
            self.model.to(device)
        meta = folder / "reward.json"
        self.system_prompt = json.loads(meta.read_text(encoding="utf-8")).get("system_prompt") \
            if meta.is_file() else None

    @torch.no_grad()
    def __call__(self, prompts: list[str], responses: list[str], batch_size: int = 8) -> list[float]:
        if len(prompts) != len(responses):
            raise TuneforgeError(f"{len(prompts)} prompts but {len(responses)} responses")
        rows = [encode_answer(self.tokenizer, p, r, self.system_prompt) for p, r in zip(prompts, responses)]
        return self.score_ids(rows, batch_size)

    @torch.no_grad()
    def score_ids(self, rows: list[list[int]], batch_size: int = 8) -> list[float]:
        """Rewards of already rendered answers (token ids of prompt + answer, as the preference builder makes
        them), right-padded, each read at its last real token by position."""
        device = next(self.model.parameters()).device
        out: list[float] = []
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            longest = max(map(len, chunk))
            ids = torch.full((len(chunk), longest), self.tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, row in enumerate(chunk):  # right padding, as in training
                ids[r, :len(row)], mask[r, :len(row)] = torch.tensor(row), 1
            hidden = self.model.base_model(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
            last = torch.tensor([len(row) - 1 for row in chunk], device=device)  # by position, never by token id
            picked = hidden[torch.arange(len(chunk), device=device), last]  # (b, H)
            out += self.model.score(picked.float()).squeeze(-1).tolist()
        return out


def held_out_pairs(scorer: RewardScorer, examples, batch_size: int = 8) -> dict:
    """The held-out metrics of training's evaluation (Bradley-Terry loss per pair, pairwise accuracy, mean
    margin and rewards) for a saved reward model, on preference examples built by the run's own data pipeline
    (the same tokens training scored): `tuneforge eval` of a reward run."""
    from tuneforge.objectives.reward import bradley_terry_loss
    if len(examples) == 0:
        raise TuneforgeError("the held-out split has no preference pairs")
    exs = [examples[i] for i in range(len(examples))]
    rewards = torch.tensor(scorer.score_ids([s.input_ids for ex in exs for s in (ex["chosen"], ex["rejected"])],
                                            batch_size)).view(-1, 2)
    margin = torch.tensor([float((ex.texts or {}).get("margin", 0.0)) for ex in exs])
    loss, metrics = bradley_terry_loss(rewards[:, 0], rewards[:, 1], margin)
    out = {"loss": float(loss) / len(exs)}
    out.update({k: s / c for k, (s, c) in metrics.items()})
    out["pairs"] = len(exs)
    return out


@functools.lru_cache(maxsize=2)
def load_scorer(model_dir: str, device: str | None = None) -> RewardScorer:
    """A RewardScorer, loaded once per folder (RL calls `score` every step)."""
    return RewardScorer(model_dir, device)


def score(model_dir, prompts: list[str], responses: list[str], batch_size: int = 8,
          device: str | None = None) -> list[float]:
    """Rewards of `responses` to `prompts` (one each) from the reward model in `model_dir` (a run's final/),
    on `device` (default: where transformers loads it, the CPU)."""
    return load_scorer(str(model_dir), None if device is None else str(device))(prompts, responses, batch_size)
