"""Direct preference optimisation and its relatives (`method: dpo`, `dpo.loss` picks the variant).

Per pair the policy's and the reference's summed log-probs of the chosen and the rejected answer go into a
pure loss function (preference_losses.py, each citing its paper and equation). Both answers of a batch run
through ONE forward pass (padded one sequence per row, or packed into shared rows), through the logits-free
path (only answer positions reach the output head, in chunks).

The reference: under LoRA it is the base with the adapter disabled, the same weights in memory (no second
copy); it runs without gradients on the same batch. Under full fine-tuning the run computes every pair's
reference log-probs once before the first update (`precompute_reference`) and the batches carry them: no
second model either. Variants without a reference (simpo, orpo) skip it.
At the start of a fresh run policy and reference are the same model (LoRA's B is zero), so every pair's
log-ratio is zero and the sigmoid loss is exactly ln 2: the first batch checks that, and a run whose
reference is wrong (a policy read as its own reference, a stale adapter, a different base) stops there,
before it costs a run.
"""

from __future__ import annotations

import torch

from tuneforge.errors import TuneforgeError
from tuneforge.models.heads import train_module
from tuneforge.objectives.base import LossOutput, Objective
from tuneforge.objectives.functional import pair_index, sequence_logps
from tuneforge.objectives.preference_losses import REFERENCE_FREE, preference_loss


def _adapter_disabled(tm):
    """The base model's forward: PEFT's context with the adapter off."""
    model = tm.model
    if not hasattr(model, "disable_adapter"):
        raise TuneforgeError("method dpo needs a reference: with lora.enabled=true it is the base with the adapter "
                             "disabled; with full fine-tuning the run precomputes it (tuneforge train does); or use "
                             "dpo.loss simpo or orpo, which need none")
    return model.disable_adapter()


class DPOObjective(Objective):
    unit = "pairs"

    def __init__(self, variant: str = "sigmoid", beta: float = 0.1, label_smoothing: float = 0.0,
                 simpo_gamma: float = 0.5, chunk_size: int = 1024, nll_coef: float = 0.0):
        self.variant, self.chunk_size, self.nll_coef = variant, chunk_size, nll_coef
        self.params = {"beta": beta, "label_smoothing": label_smoothing, "simpo_gamma": simpo_gamma}
        self.needs_reference = variant not in REFERENCE_FREE
        self._check_start = False

    def start(self, module, resumed: bool, step: int = 0) -> None:
        self._check_start = self.needs_reference and not resumed

    @torch.no_grad()
    def reference_logps(self, module, batch: dict) -> torch.Tensor:
        tm = train_module(module)  # no DDP forward: nothing here is back-propagated
        with _adapter_disabled(tm):
            logps, _ = sequence_logps(tm, batch, self.chunk_size)
        return logps

    def loss(self, module, batch: dict) -> LossOutput:
        logps, counts = sequence_logps(module, batch, self.chunk_size)  # (S,)
        chosen, rejected = pair_index(batch)  # (P,) each
        ref = None
        if self.needs_reference:  # precomputed (full fine-tuning) or the base with the adapter disabled (LoRA)
            ref = batch["ref_logps"].to(logps.dtype) if "ref_logps" in batch else self.reference_logps(module, batch)
        if self._check_start:
            self._check_reference(logps.detach(), ref)
        terms = preference_loss(
            self.variant, logps[chosen], logps[rejected],
            ref[chosen] if ref is not None else None, ref[rejected] if ref is not None else None,
            chosen_lengths=counts[chosen], rejected_lengths=counts[rejected], **self.params)
        pairs = float(chosen.numel())
        margin = terms.chosen_rewards - terms.rejected_rewards
        metrics = {
            "rewards/chosen": (float(terms.chosen_rewards.sum()), pairs),
            "rewards/rejected": (float(terms.rejected_rewards.sum()), pairs),
            "rewards/margin": (float(margin.sum()), pairs),
            "rewards/accuracy": (float((margin > 0).float().sum()), pairs),
            "logps/chosen": (float(logps[chosen].detach().sum()), pairs),
            "logps/rejected": (float(logps[rejected].detach().sum()), pairs),
        }
        losses = terms.losses
        if self.nll_coef:  # RPO (Pang et al. 2024): + alpha x the chosen answer's mean token NLL
            nll = -logps[chosen] / counts[chosen].clamp(min=1.0)
            losses = losses + self.nll_coef * nll
            metrics["nll/chosen"] = (float(nll.detach().sum()), pairs)
        return LossOutput(losses.sum(), pairs, metrics)

    def _check_reference(self, policy: torch.Tensor, ref: torch.Tensor) -> None:
        """At the start policy == reference; every pair's loss is then the variant's value at zero log-ratio
        (ln 2 for sigmoid). Checked on the first batch only."""
        self._check_start = False
        gap = float((policy - ref).abs().max()) if policy.numel() else 0.0
        scale = float(ref.abs().max()) if ref.numel() else 1.0
        if gap > 1e-4 * max(1.0, scale):
            raise TuneforgeError(
                f"DPO reference check at step 0: policy and reference log-probs differ by up to {gap:.3g} "
                "(they must coincide before training, which makes the sigmoid loss exactly ln 2). The reference "
                "is not the model being trained: check model.name, and that no adapter was loaded before "
                "training; nothing was trained")


def make_dpo(cfg) -> DPOObjective:
    d = cfg.dpo
    return DPOObjective(d.loss, d.beta, d.label_smoothing, d.simpo_gamma, nll_coef=d.nll_coef)


class WithReference:
    """Preference examples with their reference log-probs attached (`texts["ref_logps"]`, one per sequence),
    which the collators pass on as `batch["ref_logps"]`: full fine-tuning's reference without a second model."""

    def __init__(self, examples, ref: torch.Tensor):
        self.examples, self.ref = examples, ref  # ref: (N, sequences per example)

    def __len__(self) -> int:
        return len(self.examples)

    def length(self, i: int) -> int:
        return self.examples.length(i)

    def lengths(self, share_prompt: bool = False) -> list[int]:
        from tuneforge.data.packing import example_lengths
        return example_lengths(self.examples, share_prompt)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        import dataclasses
        ex = self.examples[i]
        return dataclasses.replace(ex, texts={**(ex.texts or {}), "ref_logps": self.ref[i].tolist()})


@torch.no_grad()
def reference_logps_of(module, examples, pad_id: int, autocast, device, batch_size: int = 8) -> torch.Tensor:
    """(N, 2) summed answer log-probs of every example under `module` as it is now (before training)."""
    from tuneforge.data.collate import collate
    tm = train_module(module)
    was_training = tm.training
    tm.eval()
    out = []
    for start in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[start:start + batch_size], pad_id).items()}
        with autocast():
            logps, _ = sequence_logps(tm, batch, 1024)
        out.append(logps.float().cpu().view(-1, 2))
    tm.train(was_training)
    return torch.cat(out) if out else torch.zeros((0, 2))


def precompute_reference(cfg, module, data, tokenizer, device, autocast, resume: bool):
    """Full fine-tuning with a reference variant: the reference log-probs of every train and held-out pair,
    computed once from the model before its first update and kept in the run folder
    (reference_logps.safetensors, so a resume reads the same ones), attached to the examples. LoRA needs none
    (the reference is the base with the adapter disabled), nor do simpo and orpo."""
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    from tuneforge.train import distributed as dist
    if cfg.lora.enabled or cfg.dpo.loss in REFERENCE_FREE:
        return data
    path = Path(cfg.train.output_dir) / "reference_logps.safetensors"
    splits = {"train": data.train, **({"eval": data.eval} if data.eval is not None else {})}
    if resume and not path.exists():
        raise TuneforgeError(f"{path} is missing: a resumed full fine-tuning DPO run needs the reference "
                             "log-probs its first start computed; start the run again without --resume")
    if not resume:  # a fresh start computes them from the model as it is now, whatever an old file says
        if dist.is_main():
            print("dpo: computing the reference log-probs of every pair once (full fine-tuning)", flush=True)
            refs = {k: reference_logps_of(module, v, tokenizer.pad_token_id, autocast, device)
                    for k, v in splits.items()}
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            save_file(refs, str(tmp))
            tmp.replace(path)
        dist.barrier()
    refs = load_file(str(path))
    for k, v in splits.items():
        if k not in refs or refs[k].shape[0] != len(v):
            raise TuneforgeError(f"{path} does not match this run's {k} data ({len(v)} pairs): start a new "
                                 "train.output_dir")
    data.train = WithReference(data.train, refs["train"])
    if data.eval is not None:
        data.eval = WithReference(data.eval, refs["eval"])
    return data
