"""Rollouts for online RL (PPO, GRPO, RLOO): the policy samples completions to prompts, and each
prompt + completion becomes one training sequence.

Sampling runs on the one decoding core (eval/generation.py `sample_completions`: KV cache, left padding,
per-row stop, temperature and top-p; each row's draws from its own seed, `row_seed`, or from an explicit
torch.Generator). Training
never reuses the sampler's logits: each rollout becomes an `Example` with one "completion" sequence (prompt
then completion, loss mask 1 on the completion tokens, the stop token included), so the collators that batch
every other method (collate_sequences, packing.collate_packed_sequences) batch rollouts too, and the policy's,
the reference's and (PPO) the value head's numbers come from the logits-free path over those rows
(objectives/functional.py `token_logps`). The sampler's own log-probs are kept: they are the same quantity
(log-prob under softmax(logits / temperature)), so the two paths can be checked against each other and the
first PPO epoch's ratio is exactly 1.
"""

from __future__ import annotations

import hashlib
import struct
import time
from dataclasses import dataclass

import torch

from tuneforge.data.chat import TokenizedExample
from tuneforge.data.example import Example
from tuneforge.errors import TuneforgeError
from tuneforge.eval.generation import sample_completions

ROLE_NAMES = ("completion",)


def row_seed(seed: int, step: int, position: int, generation: int) -> int:
    """The seed of one sampled row: train.seed, the step, the prompt's index in the step's GLOBAL batch of data
    and the generation index, hashed (blake2b) to 63 bits. Nothing else enters, so 1 rank and 2 ranks, any
    rl.rollout_batch_size or micro-batch split, and a resumed run all draw the same tokens for that row."""
    digest = hashlib.blake2b(struct.pack("<4q", seed, step, position, generation), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The sampling generator of a run, on the policy's device. A checkpoint saves `generator.get_state()` (a
    uint8 tensor, storable in safetensors) and a resume restores it with `set_state`, so sampling continues
    exactly where it stopped."""
    return torch.Generator(device=device).manual_seed(seed)


@dataclass
class Rollouts:
    """Completions sampled for a list of prompts, `num_generations` consecutive rollouts per prompt."""

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    """The stop token included when one was hit, nothing after it."""
    logps: list[torch.Tensor]
    """(n_i,) float32 per completion: log-prob of each sampled token under softmax(logits / temperature)."""
    stopped: list[bool]
    """False where rl.max_new_tokens cut the completion (a reward may want to penalise it)."""
    group: list[int]
    """The index (in the prompts given) of the prompt each rollout continues: GRPO/RLOO's groups."""
    texts: list[dict]
    """The prompt example's texts (prompt, reference answer) for each rollout, for reward functions."""
    seconds: float
    """Wall time spent sampling: generation throughput is logged apart from training's."""

    def __len__(self) -> int:
        return len(self.completion_ids)

    @property
    def num_tokens(self) -> int:
        """Sampled tokens (prompts not counted)."""
        return sum(map(len, self.completion_ids))

    def completion_texts(self, tokenizer) -> list[str]:
        """Decoded completions, special tokens cut (what reward functions score)."""
        return [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in self.completion_ids]

    def examples(self, share_prompt: bool = False) -> list[Example]:
        """Training Examples: each rollout a sequence prompt + completion, loss mask 1 on the completion (its
        stop token included: found by position, so a pad id equal to it changes nothing). One Example per
        rollout, or with `share_prompt` one per prompt holding its consecutive rollouts (a GRPO group) with the
        prompt as `shared_prefix`, so that a packed row under tuneforge_varlen attention computes the prompt
        once: [prompt + c1][c2]...[cG] (data/packing.py), the sequences in rollout order either way. `texts`
        keeps the prompt's texts plus "rollouts", the indices of the Example's rollouts (see `sampled_logps`)."""
        out: list[Example] = []
        for i, (p, c, t) in enumerate(zip(self.prompt_ids, self.completion_ids, self.texts)):
            seq = TokenizedExample(p + c, [0] * len(p) + [1] * len(c))
            last = out[-1] if out else None
            if share_prompt and last is not None and self.group[i] == self.group[i - 1]:
                last.sequences.append(seq)
                last.roles.append(0)
                last.texts["rollouts"].append(i)
                continue
            out.append(Example([seq], [0], ROLE_NAMES, {**t, "rollouts": [i]},
                               shared_prefix=len(p) if share_prompt else 0))
        return out


def rollout(module, prompts: list[Example], *, max_new_tokens: int, stop_ids: list[int], pad_id: int,
            num_generations: int = 1, temperature: float = 1.0, top_p: float = 1.0,
            generator: torch.Generator | None = None, batch_size: int = 16, greedy: bool = False,
            seeds: list[list[int]] | None = None) -> Rollouts:
    """Sample `num_generations` completions for each prompt example (data/builders.py PromptBuilder: one
    "prompt" sequence), `batch_size` rows per decoding batch, the copies of a prompt side by side.

    Works on the policy as it is (LoRA active, or full weights); for the reference under LoRA, call it inside
    the PEFT model's `disable_adapter()`. The module is put in eval mode while sampling and restored.
    `seeds[k][g]`: the seed of prompt k's generation g (`row_seed`), in place of `generator`: each row then
    samples the same whatever decoding batch it lands in."""
    if num_generations < 1:
        raise TuneforgeError(f"rl.num_generations must be at least 1, got {num_generations}")
    if seeds is not None and (len(seeds) != len(prompts) or any(len(g) != num_generations for g in seeds)):
        raise TuneforgeError(f"rollout: seeds must give {num_generations} per prompt for {len(prompts)} prompts")
    flat_seeds = [s for per_prompt in seeds for s in per_prompt] if seeds is not None else None
    prompt_ids, group, texts = [], [], []
    for k, ex in enumerate(prompts):
        ids = list(ex.sequences[0].input_ids)
        if not ids:
            where = f"{ex.source}: " if ex.source is not None else ""
            raise TuneforgeError(f"{where}prompt {k} has no tokens")
        prompt_ids += [ids] * num_generations
        group += [k] * num_generations
        texts += [dict(ex.texts or {})] * num_generations
    completions, logps, stopped = [], [], []
    start = time.perf_counter()
    for at in range(0, len(prompt_ids), batch_size):
        out = sample_completions(module, prompt_ids[at:at + batch_size], max_new_tokens, stop_ids, pad_id,
                                 temperature=temperature, top_p=top_p, do_sample=not greedy, generator=generator,
                                 seeds=flat_seeds[at:at + batch_size] if flat_seeds is not None else None)
        completions += out.tokens
        logps += out.logps
        stopped += out.stopped
    return Rollouts(prompt_ids, completions, logps, stopped, group, texts, time.perf_counter() - start)


def sampled_logps(rollouts: Rollouts, examples: list[Example]) -> torch.Tensor:
    """The sampler's log-probs for a batch built from `examples` (rollout examples, in the order the batch holds
    them: for packed rows, row by row), flattened in the order `token_logps` returns its (N,) log-probs: sequence
    by sequence, each sequence's completion tokens in order."""
    return torch.cat([rollouts.logps[i] for ex in examples for i in ex.texts["rollouts"]])
