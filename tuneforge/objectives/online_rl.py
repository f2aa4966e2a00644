"""Online RL (`method: grpo`, `rloo`, `ppo`): the policy writes answers, rewards score them, the policy learns.

One batch of data is a batch of prompts. `prepare` turns it into updates, through the loop's contract:
1. rollouts: every prompt sampled `rl.num_generations` times (grpo, rloo) or once (ppo) on the one decoding
   core (KV cache, left padding, stop at end of turn; rl/rollout.py), each sample's draws from its own seed
   (train.seed, step, the prompt's place in the step's global batch, the generation: rollout.row_seed), so 1
   rank and 2, any decoding batch or micro-batch split, and a resumed run sample the same, with no state to
   save;
2. rewards: the reward model and/or functions (rl/rewards.py), checked (a NaN, a wrong count or a raising
   function stops the run naming the function and the sample);
3. log-probs of the sampled tokens under the policy as it is (the "old" policy of the ratio), the reference
   and (ppo) the value head, all through the logits-free path over packed prompt+completion rows
   (objectives/functional.py `token_logps`), never a (batch x length x vocabulary) tensor;
4. advantages: group-normalised (grpo, Shao et al. 2024), leave-one-out (rloo, Ahmadian et al. 2024), or GAE
   over per-token rewards with the KL penalty (ppo, Ziegler et al. 2019 / Ouyang et al. 2022);
5. updates: `rl.epochs` x `rl.mini_batches` optimizer updates over the rollouts, each a list of micro-batches
   (one per loader micro-batch of prompts, all samples of a prompt in the same micro-batch, so a group and a
   sequence never span micro-batches), every one an optimizer step of the one loop.

The reference is the base with the adapter disabled under LoRA; under full fine-tuning a frozen copy of the
starting model, kept by this objective (twice the weights in memory: the only option without an adapter); a
resumed full fine-tuning run loads it again from the config's model (`reference_loader`), as the
uninterrupted run copied it before its first update.
"""

from __future__ import annotations

import copy
import json
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch

from tuneforge.errors import TuneforgeError
from tuneforge.models.heads import train_module
from tuneforge.objectives.base import LossOutput, Objective
from tuneforge.objectives.functional import supervised_positions, token_logps
from tuneforge.objectives.rl_losses import clipped_policy_loss, clipped_value_loss
from tuneforge.rl import advantages as adv
from tuneforge.rl.kl import AdaptiveKLController, FixedKLController, kl_per_token, sequence_kl
from tuneforge.rl.segments import segment_sum
from tuneforge.train import distributed as dist

VALUE_HEAD = "value"
GROUP_METHODS = ("grpo", "rloo")
KL_BUDGET_PATIENCE = 3  # batches over the budget, after the warning, before the run stops


def _short(text: str, n: int = 60) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[:n - 3] + "..."


class OnlineRL(Objective):
    eval_key = "reward"

    def __init__(self, cfg, tokenizer, algorithm: str, reference_loader=None):
        """`reference_loader(device) -> module`: the starting model as a run loads it (methods.py gives
        config's model.name); full fine-tuning's reference on a resume, when the starting weights are gone."""
        from tuneforge.eval.generation import stop_token_ids
        r = cfg.rl
        if algorithm not in (*GROUP_METHODS, "ppo"):
            raise TuneforgeError(f"unknown online RL method {algorithm!r}")
        self.algorithm, self.r = algorithm, r
        self.group = r.num_generations if algorithm in GROUP_METHODS else 1
        self.unit = "tokens" if r.loss_type == "dapo" else "sequences"
        t = cfg.train
        if t.grad_accum % r.mini_batches:
            raise TuneforgeError(f"train.grad_accum ({t.grad_accum}) must be a multiple of rl.mini_batches "
                                 f"({r.mini_batches}): each update takes whole micro-batches of prompts")
        self.updates_per_batch = r.epochs * r.mini_batches
        # grpo with one update per batch of rollouts: the policy of the update is the one that sampled, so the
        # ratio's "old" log-probs are the loss's own, detached (one forward fewer; TRL does the same)
        self.single_pass = algorithm == "grpo" and self.updates_per_batch == 1
        self.tokenizer = tokenizer
        self.stop_ids = stop_token_ids(tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_ids[0]
        self.seed, self.out_dir, self.autocast_mode = t.seed, Path(t.output_dir), t.autocast
        self.full_reference = not cfg.lora.enabled
        self.kl = (AdaptiveKLController(r.kl_coef, r.kl_target, r.kl_horizon) if r.kl_target
                   else FixedKLController(r.kl_coef))
        self.step, self.over_budget = 0, 0
        self._rewards = None
        self._reference = None  # full fine-tuning: the frozen starting model
        self.reference_loader = reference_loader
        self._reference_answers = None  # held-out: the reference's own answers and rewards, computed once

    # ------------------------------------------------------------------ state across a run and a resume
    def start(self, module, resumed: bool, step: int = 0) -> None:
        self.step = step
        if self.full_reference and self._reference is None and self.needs_reference:
            if not resumed:
                reference = copy.deepcopy(train_module(module))
            elif self.reference_loader is not None:  # the module holds the checkpoint's tuned weights now
                reference = self.reference_loader(next(train_module(module).parameters()).device)
            else:
                raise TuneforgeError(
                    "resuming a full fine-tuning online RL run needs its reference, the starting model, and "
                    "this objective was given no reference_loader: the checkpoint holds only the tuned weights")
            self._reference = reference.eval().requires_grad_(False)

    def state_dict(self) -> dict:
        return {"kl": self.kl.state_dict(), "over_budget": self.over_budget}

    def load_state_dict(self, state: dict) -> None:
        if "kl" in state:
            self.kl.load_state_dict(state["kl"])
        self.over_budget = int(state.get("over_budget", 0))

    @property
    def needs_reference(self) -> bool:
        return self.algorithm == "ppo" or self.r.beta > 0

    @property
    def rewards(self):
        if self._rewards is None:
            from tuneforge.rl.rewards import Rewards
            self._rewards = Rewards.from_config(self.r)
        return self._rewards

    # ------------------------------------------------------------------ the pieces
    def _reference_context(self, tm):
        """The reference's forward: the adapter disabled (LoRA), or the frozen copy (full fine-tuning)."""
        if self._reference is not None:
            return nullcontext(self._reference)
        if not hasattr(tm.model, "disable_adapter"):
            raise TuneforgeError("the reference of online RL is the base with the adapter disabled "
                                 "(lora.enabled: true), or a frozen copy under full fine-tuning")
        return _AdapterOff(tm)

    def _is_reference(self, tm) -> bool:
        """Whether the policy still is the reference: before training starts under full fine-tuning (the frozen
        copy is taken then), or a LoRA adapter whose B matrices are all zero (PEFT's initialisation)."""
        if self.full_reference:
            return self._reference is None
        lora_b = [p for n, p in tm.named_parameters() if "lora_B" in n]
        return bool(lora_b) and all(not bool(p.detach().any()) for p in lora_b)

    def _sample(self, tm, prompts: list, seeds=None, greedy: bool = False):
        from tuneforge.rl.rollout import rollout
        from tuneforge.train.loop import make_autocast
        with make_autocast(self.autocast_mode, next(tm.parameters()).device)():  # decode as training computes
            return rollout(tm, prompts, max_new_tokens=self.r.max_new_tokens, stop_ids=self.stop_ids,
                           pad_id=self.pad_id, num_generations=1 if greedy else self.group,
                           temperature=self.r.temperature, top_p=self.r.top_p, seeds=seeds,
                           batch_size=self.r.rollout_batch_size, greedy=greedy)

    def _score(self, rollouts):
        texts = rollouts.completion_texts(self.tokenizer)
        prompts = [t.get("prompt", "") for t in rollouts.texts]
        refs = [t.get("reference") for t in rollouts.texts]
        return self.rewards(prompts, texts, refs), texts, prompts

    def _collate(self, examples: list, device) -> dict:
        from tuneforge.data.packing import collate_packed_sequences
        from tuneforge.train.loop import to_device_batch
        # one packed row: varlen attention isolates the sequences; every model family tuneforge trains on
        # packs that way (run.packing_on), others pad
        if self.packed:
            batch = collate_packed_sequences([examples], self.pad_id, share_prompt=True)
        else:
            from tuneforge.data.collate import collate_sequences
            batch = collate_sequences(examples, self.pad_id)
        return to_device_batch(batch, device)

    @torch.no_grad()
    def _token_numbers(self, tm, batch: dict, autocast) -> dict:
        """old log-probs, reference log-probs and (ppo) values of the sampled tokens, in token_logps order."""
        out = {}
        was_training = tm.training
        tm.eval()  # the numbers the sampler's policy gives (no dropout), as the loss will recompute them
        segments = supervised_positions(batch)[0](batch["sequence_ids"])
        with autocast():
            if self.algorithm == "ppo":
                out["old_logps"], out["old_values"], _ = token_logps(
                    tm, batch, temperature=self.r.temperature, value_head=VALUE_HEAD)
            elif not self.single_pass:  # one update per batch of rollouts: the loss's own detached log-probs
                out["old_logps"], _ = token_logps(tm, batch, temperature=self.r.temperature)
            if self.needs_reference:
                with self._reference_context(tm) as ref:
                    out["ref_logps"], _ = token_logps(ref, batch, temperature=self.r.temperature)
        tm.train(was_training)
        out["segments"] = segments
        return {k: v.float() if v.is_floating_point() else v for k, v in out.items()}

    # ------------------------------------------------------------------ the contract
    def prepare(self, module, micro_batches: list[dict]) -> list[list[dict]]:
        from tuneforge.rl.rollout import row_seed, sampled_logps
        from tuneforge.train.loop import make_autocast
        tm = train_module(module)
        device = next(tm.parameters()).device
        self.packed = getattr(tm.base.config, "_attn_implementation", None) == "tuneforge_varlen"
        autocast = make_autocast(self.autocast_mode, device)
        prompts = [ex for b in micro_batches for ex in b["examples"]]
        per_mb = [len(b["examples"]) for b in micro_batches]
        # each prompt's place in the step's global batch (the loop's step_index; the order given otherwise)
        places = [p for b in micro_batches for p in b.get("step_index", ())]
        places = places if len(places) == len(prompts) else list(range(len(prompts)))
        real = [b.get("is_real", True) for b, n in zip(micro_batches, per_mb) for _ in range(n * self.group)]
        t0 = time.perf_counter()
        seeds = [[row_seed(self.seed, self.step, p, g) for g in range(self.group)] for p in places]
        rollouts = self._sample(tm, prompts, seeds)
        gen_seconds = time.perf_counter() - t0
        scored, texts, prompt_texts = self._score(rollouts)
        scores = scored.total.to(device)  # (S,)
        # under varlen attention a group's prompt is computed once per row: [prompt + c1][c2]...[cG]
        examples = rollouts.examples(share_prompt=self.packed)
        per_example = self.group if self.packed else 1
        t1 = time.perf_counter()
        batches, at = [], 0
        for b, n in zip(micro_batches, per_mb):
            k = n * self.group
            chunk = examples[at // per_example:(at + k) // per_example]
            batch = self._collate(chunk, device)
            batch.update(self._token_numbers(tm, batch, autocast))
            batch["sampled_logps"] = sampled_logps(rollouts, chunk).to(device)  # the sampler's own numbers
            batch["scores"], batch["num_sequences"] = scores[at:at + k], k
            batch["is_real"] = b.get("is_real", True)
            batches.append(batch)
            at += k
        self._advantages(batches)
        prep_seconds = time.perf_counter() - t1
        self._watch_kl(batches)
        if self.r.samples_every and self.step % self.r.samples_every == 0:  # every rank: a collective
            self._write_samples(prompt_texts, texts, scored, rollouts, places, real)
        stats = self._rollout_stats(scored, rollouts, real)
        stats.update({"gen_seconds": (gen_seconds, 1.0), "score_seconds": (prep_seconds, 1.0),
                      "gen_tokens_per_s": (rollouts.num_tokens / max(gen_seconds, 1e-9), 1.0)})
        gaps = [float((b["old_logps"] - b["sampled_logps"]).abs().max()) for b in batches
                if "old_logps" in b and b["old_logps"].numel()]
        stats["logp_gap_max"] = (max(gaps) if gaps else 0.0, 1.0)  # sampler vs training path: precision only
        if self.algorithm == "ppo":
            stats["kl_coef"] = (float(self.kl.coef), 1.0)
        self.step += 1
        per_update = len(batches) // self.r.mini_batches
        updates = []
        for epoch in range(self.r.epochs):
            for m in range(self.r.mini_batches):
                update = [dict(b) for b in batches[m * per_update:(m + 1) * per_update]]
                for i, b in enumerate(update):  # rollout statistics once per update (ranks add them by name)
                    b["stats"] = stats if i == 0 and b["is_real"] else {k: (0.0, 0.0) for k in stats}
                updates.append(update)
        return updates

    def _rollout_stats(self, scored, rollouts, real: list[bool]) -> dict:
        """(sum, count) pairs over this rank's real rollouts (a rank's padding micro-batch counts as nothing),
        which the loop adds over ranks; the reward's std is of the whole step's rewards, from sums over ranks."""
        keep = torch.tensor(real, dtype=torch.bool)
        scores = scored.total.detach().double().cpu()[keep]
        n, total, squares = dist.all_sum([float(scores.numel()), float(scores.sum()), float((scores ** 2).sum())])
        std = ((squares - total * total / n) / (n - 1)) ** 0.5 if n > 1 else 0.0  # unbiased, as torch.std
        share = float(scores.numel()) / max(n, 1.0)  # each rank's part of the std, so the ranks' parts add up
        lengths = [len(c) for c, r in zip(rollouts.completion_ids, real) if r]
        stats = {"reward": (float(scores.sum()), float(scores.numel())),
                 "reward_std": (std * share, share),
                 "completion_length": (float(sum(lengths)), float(len(lengths))),
                 "stopped": (float(sum(s for s, r in zip(rollouts.stopped, real) if r)), float(len(lengths)))}
        for name, values in scored.per_source.items():
            values = values.detach().double().cpu()[keep]
            stats[f"reward/{name}"] = (float(values.sum()), float(values.numel()))
        return stats

    def _advantages(self, batches: list[dict]) -> None:
        r = self.r
        if self.algorithm == "grpo":
            for b in batches:
                a = adv.group_advantages(b["scores"], self.group, r.scale_rewards)
                b["advantages"] = a[b["segments"]]
        elif self.algorithm == "rloo":
            for b in batches:  # the KL penalty in the reward, per sequence (Ahmadian et al. 2024, sec. 2)
                scores = b["scores"]
                if self.needs_reference:
                    kl = sequence_kl(kl_per_token(b["old_logps"], b["ref_logps"], "k1"), b["segments"],
                                     b["num_sequences"])
                    scores = scores - r.beta * kl
                b["advantages"] = adv.rloo_advantages(scores, self.group)[b["segments"]]
        else:  # ppo: per-token rewards with the KL penalty, GAE, whitening over the batch of rollouts
            for b in batches:
                kl = kl_per_token(b["old_logps"], b["ref_logps"], "k1")
                rewards = adv.ppo_token_rewards(kl, b["scores"], b["segments"], self.kl.coef)
                b["advantages"], b["returns"] = adv.gae(rewards, b["old_values"], b["segments"],
                                                        b["num_sequences"], r.gamma, r.lam)
            if r.whiten_advantages:  # over the step's real rollouts on every rank (a padding micro-batch: none)
                flat = torch.cat([b["advantages"] for b in batches])
                real = torch.cat([torch.full_like(b["advantages"], float(b["is_real"])) for b in batches])
                white = adv.whiten(flat, mask=real, all_sum=dist.all_sum)
                at = 0
                for b in batches:
                    n = b["advantages"].numel()
                    b["advantages"], at = white[at:at + n], at + n

    def _watch_kl(self, batches: list[dict]) -> None:
        """Mean KL to the reference per completion: feeds the adaptive controller (ppo) and the budget."""
        if not self.needs_reference:
            return
        kl_sum = sum(float(sequence_kl(kl_per_token(b.get("old_logps", b["sampled_logps"]), b["ref_logps"], "k1"),
                                       b["segments"],
                                       b["num_sequences"]).sum()) for b in batches if b["is_real"])
        n = sum(b["num_sequences"] for b in batches if b["is_real"])
        total = dist.all_sum([kl_sum, float(n)])
        mean_kl = total[0] / max(total[1], 1.0)
        if self.algorithm == "ppo":
            self.kl.update(mean_kl, int(total[1]))
        budget = self.r.kl_budget
        if budget is None:
            return
        if mean_kl > budget:
            self.over_budget += 1
            if self.over_budget == 1 and dist.is_main():
                warnings.warn(f"online RL: KL to the reference {mean_kl:.3g} nats per completion is above "
                              f"rl.kl_budget {budget} at step {self.step}; the run stops if it stays above for "
                              f"{KL_BUDGET_PATIENCE} more batches", stacklevel=2)
            if self.over_budget > KL_BUDGET_PATIENCE:
                raise TuneforgeError(f"online RL stopped: KL to the reference {mean_kl:.3g} nats per completion "
                                     f"stayed above rl.kl_budget {budget} (step {self.step}); the policy is "
                                     "drifting from where it started (raise rl.beta / rl.kl_coef, lower train.lr, "
                                     "or raise the budget). Checkpoints already saved are intact")
        else:
            self.over_budget = 0

    def _write_samples(self, prompts, texts, scored, rollouts, places: list[int], real: list[bool]) -> None:
        """The samples of the step's first 4 prompts (by their place in the step's global batch, whichever
        rank holds them) appended to samples.jsonl by rank 0 alone: the same rows for any number of ranks."""
        rows = []
        for i in range(len(texts)):
            place = places[rollouts.group[i]]
            if not real[i] or place >= 4:
                continue
            row = {"step": self.step, "place": place, "generation": i % self.group, "prompt": prompts[i],
                   "completion": texts[i], "reward": float(scored.total[i]), "stopped": bool(rollouts.stopped[i]),
                   **{f"reward/{k}": float(v[i]) for k, v in scored.per_source.items()}}
            if rollouts.texts[i].get("reference") is not None:
                row["reference"] = rollouts.texts[i]["reference"]
            rows.append(row)
        rows = [row for part in dist.gather_objects(rows) for row in part]
        if not dist.is_main():
            return
        path = self.out_dir / "samples.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            for row in sorted(rows, key=lambda r: (r["place"], r["generation"])):
                f.write(json.dumps(row) + "\n")

    def loss(self, module, batch: dict) -> LossOutput:
        r, n_seq = self.r, batch["num_sequences"]
        if self.algorithm == "ppo":
            logps, values, segments = token_logps(module, batch, temperature=r.temperature,
                                                  value_head=VALUE_HEAD)
        else:
            logps, segments = token_logps(module, batch, temperature=r.temperature)
        beta = r.beta if self.algorithm == "grpo" else 0.0  # rloo and ppo put the KL in the reward
        old = batch["old_logps"] if "old_logps" in batch else logps.detach().float()
        out = clipped_policy_loss(logps.float(), old, batch["advantages"], segments, n_seq,
                                  loss_type=r.loss_type, eps_low=r.clip_range, eps_high=r.clip_range_high,
                                  max_new_tokens=r.max_new_tokens, ref_logps=batch.get("ref_logps"), beta=beta,
                                  kl_estimator=r.kl_estimator)
        loss_sum, metrics = out.loss_sum, dict(out.metrics)
        if self.algorithm == "ppo":
            v = clipped_value_loss(values.float(), batch["old_values"], batch["returns"], segments, n_seq,
                                   clip_range=r.value_clip, loss_type=r.loss_type, max_new_tokens=r.max_new_tokens)
            loss_sum = loss_sum + r.vf_coef * v.loss_sum
            metrics.update({f"value/{k}": m for k, m in v.metrics.items()})
            metrics["value_loss"] = (float(v.loss_sum.detach()), v.count)
        metrics.update(batch.get("stats", {}))
        return LossOutput(loss_sum, out.count, metrics)

    # ------------------------------------------------------------------ held-out: reward of greedy answers
    @torch.no_grad()
    def evaluate(self, module, batches, autocast) -> dict:
        """Greedy answers to the held-out prompts: their mean reward ("reward"), the reference's own answers'
        mean reward ("reward_reference": the baseline), and the policy's KL to the reference on its answers."""
        tm = train_module(module)
        prompts = [ex for b in batches for ex in b["examples"]]
        out = {"reward": [0.0, 0.0]}
        if not prompts:
            return {k: tuple(v) for k, v in out.items()}
        device = next(tm.parameters()).device
        self.packed = getattr(tm.base.config, "_attn_implementation", None) == "tuneforge_varlen"
        rollouts = self._sample(tm, prompts, greedy=True)
        scored, _, _ = self._score(rollouts)
        out["reward"] = [float(scored.total.sum()), float(len(rollouts))]
        for name, values in scored.per_source.items():
            out[f"reward/{name}"] = [float(values.sum()), float(values.numel())]
        out["completion_length"] = [float(rollouts.num_tokens), float(len(rollouts))]
        key = tuple(tuple(ex.sequences[0].input_ids) for ex in prompts)
        untrained = self._is_reference(tm)
        if untrained:  # the policy is still the reference: its answers are the reference's, its KL zero
            self._reference_answers = (key, out["reward"][0], out["reward"][1])
        if self._reference_answers is None or self._reference_answers[0] != key:
            with self._reference_context(tm) as ref:
                ref_roll = self._sample(ref, prompts, greedy=True)
            ref_scored, _, _ = self._score(ref_roll)
            self._reference_answers = (key, float(ref_scored.total.sum()), float(len(ref_roll)))
        out["reward_reference"] = list(self._reference_answers[1:])
        if untrained:
            out["kl"] = [0.0, float(len(rollouts))]
        else:
            batch = self._collate(rollouts.examples(), device)
            with autocast():
                logps, segments = token_logps(tm, batch, temperature=self.r.temperature)
                with self._reference_context(tm) as ref:
                    ref_logps, _ = token_logps(ref, batch, temperature=self.r.temperature)
            kl = segment_sum(kl_per_token(logps.float(), ref_logps.float(), "k1"), segments, len(rollouts))
            out["kl"] = [float(kl.sum()), float(len(rollouts))]
        return {k: tuple(v) for k, v in out.items()}


class _AdapterOff:
    """`with _AdapterOff(tm) as ref`: the TrainModule itself, its PEFT adapter disabled inside the block."""

    def __init__(self, tm):
        self.tm, self.ctx = tm, tm.model.disable_adapter()

    def __enter__(self):
        self.ctx.__enter__()
        return self.tm

    def __exit__(self, *exc):
        return self.ctx.__exit__(*exc)


def make_online_rl(cfg, tokenizer, algorithm: str, reference_loader=None) -> OnlineRL:
    return OnlineRL(cfg, tokenizer, algorithm, reference_loader)


def make_value_head(cfg, model) -> dict:
    """{"value": Linear(hidden, 1)} in float32, zero-initialised: the critic starts at V = 0 everywhere, so the
    first advantages are the plain discounted rewards (and the shared body's first gradient comes from the
    policy alone)."""
    from torch import nn

    from tuneforge.models.heads import unwrap
    base = unwrap(model)
    config = base.config.get_text_config()
    head = nn.Linear(config.hidden_size, 1, bias=True, dtype=torch.float32)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return {VALUE_HEAD: head.to(next(base.parameters()).device)}
