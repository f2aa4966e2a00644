"""Loss agreement of tuneforge's `method: dpo` (sigmoid) and `method: reward` with TRL's DPOTrainer and
RewardTrainer, on identical inputs, in float32.

    python bench/pref_check.py [--pairs 6] [--perturb 0.02] [--tol 1e-5]

Both sides: the embedded SmolLM2-135M-Instruct (`load_causal_lm("smollm2-135m-instruct")`, float32), the first
`--pairs` records of examples/demo_prefs/train.jsonl, LoRA r 16, alpha 32, dropout 0 on all linear layers
(tuneforge's `apply_lora` on one copy of the model, TRL's own `peft_config` on another). After LoRA's B is
set to the SAME random values on both sides (a zero B makes policy == reference, so DPO would be ln 2 on both
sides whatever the code does), the losses must agree to `--tol`.

What is compared
1. Tokenisation: TRL's own dataset preparation (its trainer's train_dataset) against tuneforge's preference
   builder, sequence by sequence: token ids and answer masks (printed: how many match, and how they differ).
2. DPO on identical inputs: tuneforge's sequences are handed to TRL's collator as prompt_ids / chosen_ids /
   rejected_ids (prompt = the unsupervised prefix), and TRL's `compute_loss` (its concatenated forward, the
   reference as the base with the adapter disabled) runs on the batch it builds; tuneforge's
   `DPOObjective.loss` runs on tuneforge's collate of the same sequences. Compared: the loss and every
   per-sequence log-prob sum (policy and reference).
3. Reward on identical inputs: TRL's tokenisation is handed to tuneforge (a sequence classifier reads the
   rightmost non-pad token; SmolLM2's pad is its end-of-turn, so TRL's sequences must end in a non-pad token,
   which its template's trailing newline is) and to TRL's RewardTrainer.compute_loss; the same random reward
   head on both sides (tuneforge's reward head <- TRL's `score`). Compared: the loss and every reward.

Tolerances: losses absolute (`--tol`); log-prob sums and rewards relative to their largest magnitude
(`--tol` * max(1, scale)): a sum of ~60 float32 log-probs reduced in a different order (TRL's fused output
head, tuneforge's chunked answer-only head) differs in its last digits.
The exit status is 1 when a row is off.

Loss scale: TRL returns the mean over the batch's pairs; tuneforge's objective returns the sum and the pair
count (the loop divides by the pairs of the step): compared as sum / count.

TRL is a bench dependency only (not of tuneforge, not of its tests).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch

DATA = ROOT / "examples" / "demo_prefs" / "train.jsonl"
LORA = {"r": 16, "alpha": 32, "dropout": 0.0}
BETA = 0.1


def records(n: int) -> list[dict]:
    with open(DATA) as f:
        return [json.loads(line) for line in f][:n]


def tuneforge_examples(tok, rows: list[dict]):
    """tuneforge's preference builder on the rows (defaults of the data section: no system prompt)."""
    from tuneforge.config.schema import DataSection
    from tuneforge.data.builders import BuildStats, PreferenceBuilder
    from tuneforge.data.records import PreferenceRecord

    class Keep(list):
        add = list.append

    kept = Keep()
    builder = PreferenceBuilder(tok, DataSection(), kept, BuildStats())
    for i, r in enumerate(rows):
        builder.add(PreferenceRecord(r["prompt"], r["chosen"], r["rejected"]))
    builder.close()
    return list(kept)


def conversational(rows: list[dict]) -> list[dict]:
    """The rows in TRL's conversational preference format (explicit prompt)."""
    return [{"prompt": [{"role": "user", "content": r["prompt"]}],
             "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows]


def perturb_lora_b(model, std: float, seed: int = 0) -> dict[str, torch.Tensor]:
    """Set every lora_B weight to normal(0, std) (a fixed generator, sorted names); returns them by name."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, p in sorted(model.named_parameters()):
        if "lora_B" in name:
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=gen) * std)
            out[name] = p.detach().clone()
    return out


def copy_lora(src, dst) -> int:
    """Copy every LoRA tensor of `src` into `dst` by name (after the PEFT wrapper prefix); returns the count
    and refuses a name present on one side only."""
    def lora(m):
        return {n.split("model.", 1)[1] if n.startswith("base_model.model.") else n: p
                for n, p in m.named_parameters() if "lora_" in n}
    a, b = lora(src), lora(dst)
    if set(a) != set(b):
        raise SystemExit(f"LoRA layers differ: only TRL {sorted(set(a) - set(b))[:4]}, "
                         f"only tuneforge {sorted(set(b) - set(a))[:4]}")
    with torch.no_grad():
        for n, p in a.items():
            b[n].copy_(p)
    return len(a)


def compare_tokens(tf_examples, trl_rows) -> list[str]:
    """Per sequence: ids equal? answer masks equal? and a note on the first difference."""
    lines, same_ids, same_masks, total = [], 0, 0, 0
    for ex, row in zip(tf_examples, trl_rows):
        for role, seq in zip(("chosen", "rejected"), ex.sequences):
            ids = row["prompt_ids"] + row[f"{role}_ids"]
            mask = [0] * len(row["prompt_ids"]) + [1] * len(row[f"{role}_ids"])
            total += 1
            same_ids += ids == seq.input_ids
            same_masks += mask == seq.loss_mask
            if ids == seq.input_ids and mask != seq.loss_mask:
                only_trl = [i for i, (a, b) in enumerate(zip(mask, seq.loss_mask)) if a and not b]
                only_tf = [i for i, (a, b) in enumerate(zip(mask, seq.loss_mask)) if b and not a]
                lines.append(f"  {role}: same ids; answer tokens TRL {sum(mask)}, tuneforge {sum(seq.loss_mask)}; "
                             f"supervised by TRL only {_shown(ids, only_trl)}, by tuneforge only "
                             f"{_shown(ids, only_tf)}")
            elif ids != seq.input_ids or mask != seq.loss_mask:
                n = min(len(ids), len(seq.input_ids))
                common = next((i for i in range(n) if ids[i] != seq.input_ids[i]), n)
                lines.append(f"  {role}: TRL {len(ids)} tokens ({sum(mask)} in answer), tuneforge "
                             f"{len(seq.input_ids)} ({sum(seq.loss_mask)}); common prefix {common}; TRL tail "
                             f"{ids[common:]} mask {mask[common:]}, tuneforge tail {seq.input_ids[common:]}")
    head = [f"token ids equal: {same_ids}/{total} sequences; answer masks equal: {same_masks}/{total}"]
    return head + lines[:4] + ([f"  ... {len(lines) - 4} more"] if len(lines) > 4 else [])


def _shown(ids: list[int], positions: list[int]) -> str:
    """Positions with their decoded token, e.g. [59:'\\n']."""
    from tuneforge.models.load import load_tokenizer
    tok = _TOK.get("tok") or _TOK.setdefault("tok", load_tokenizer("smollm2-135m-instruct"))
    return "[" + ", ".join(f"{p}:{tok.decode([ids[p]])!r}" for p in positions) + "]"


_TOK: dict = {}


def _identical_trl_batch(collator, tf_examples) -> dict:
    """tuneforge's sequences through TRL's collator (prompt_ids = the unsupervised prefix, chosen_ids /
    rejected_ids = the rest), then TRL's completion mask replaced by tuneforge's answer mask: tuneforge leaves
    the template's newline after <|im_end|> unsupervised, which TRL's prompt/completion split cannot say.
    Both collators right-pad, so the masks line up position by position."""
    rows = []
    for ex in tf_examples:
        row = {}
        for role, seq in zip(("chosen", "rejected"), ex.sequences):
            start = seq.loss_mask.index(1)
            row["prompt_ids"], row[f"{role}_ids"] = seq.input_ids[:start], seq.input_ids[start:]
        rows.append(row)
    batch = collator(rows)
    seqs = [ex.sequences[k] for k in (0, 1) for ex in tf_examples]  # TRL's order: all chosen, all rejected
    mask = torch.zeros_like(batch["completion_mask"])
    for i, seq in enumerate(seqs):
        mask[i, :len(seq.loss_mask)] = torch.tensor(seq.loss_mask)
    batch["completion_mask"] = mask
    return batch


def trl_args(cls, workdir: str, **kw):
    return cls(output_dir=workdir, per_device_train_batch_size=8, report_to=[], use_cpu=True,
               gradient_checkpointing=False, bf16=False, fp16=False, dataset_num_proc=None, seed=0, **kw)


def dpo_check(rows, pairs: int, std: float, workdir: str) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    from tuneforge.adapters.lora import apply_lora
    from tuneforge.data.collate import collate
    from tuneforge.models.heads import TrainModule
    from tuneforge.models.load import load_causal_lm
    from tuneforge.objectives.dpo import DPOObjective

    base, tok = load_causal_lm("smollm2-135m-instruct", dtype="float32")
    tf_model = apply_lora(copy.deepcopy(base), r=LORA["r"], alpha=LORA["alpha"], dropout=LORA["dropout"])
    peft_cfg = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                          target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=base, args=trl_args(DPOConfig, workdir, beta=BETA, loss_type=["sigmoid"]),
                         train_dataset=Dataset.from_list(conversational(rows)), processing_class=tok,
                         peft_config=peft_cfg)
    tf_examples = tuneforge_examples(tok, rows)
    token_lines = compare_tokens(tf_examples, list(trainer.train_dataset))

    trl_model = trainer.model
    perturb_lora_b(trl_model, std)
    n_lora = copy_lora(trl_model, tf_model)
    trl_model.eval(), tf_model.eval()

    trl_batch = _identical_trl_batch(trainer.data_collator, tf_examples)
    tf_batch = collate(tf_examples, tok.pad_token_id)
    # TRL's rows: [all chosen, all rejected]; tuneforge's: chosen, rejected per example
    reorder = torch.tensor([k for p in range(pairs) for k in (p, pairs + p)])
    same_ids = _rows_equal(trl_batch["input_ids"][reorder], trl_batch["attention_mask"][reorder],
                           tf_batch["input_ids"], tf_batch["attention_mask"])
    same_masks = _rows_equal(trl_batch["completion_mask"][reorder], trl_batch["attention_mask"][reorder],
                             tf_batch["loss_mask"], tf_batch["attention_mask"])
    rows_total = int(tf_batch["input_ids"].shape[0])

    with torch.no_grad():
        trl_loss = float(trainer.compute_loss(trl_model, dict(trl_batch)))
        trl_logps, trl_ref = _trl_logps(trainer, trl_model, trl_batch)
        module = TrainModule(tf_model)
        obj = DPOObjective("sigmoid", beta=BETA)
        out = obj.loss(module, tf_batch)
        from tuneforge.objectives.functional import sequence_logps
        tf_logps, _ = sequence_logps(module, tf_batch, obj.chunk_size)
        tf_ref = obj.reference_logps(module, tf_batch)
    return {"tokens": token_lines, "lora_tensors": n_lora, "ids_match": f"{same_ids}/{rows_total}",
            "masks_match": f"{same_masks}/{rows_total}", "trl_loss": trl_loss,
            "tf_loss": float(out.loss_sum) / out.count,
            "policy_logps_max_diff": float((trl_logps[reorder] - tf_logps).abs().max()),
            "ref_logps_max_diff": float((trl_ref[reorder] - tf_ref).abs().max()),
            "logps_scale": float(tf_logps.abs().max())}


def _rows_equal(a, a_attn, b, b_attn) -> int:
    """How many rows hold the same values at their real (attended) positions."""
    return sum(torch.equal(x[m.bool()], y[n.bool()]) for x, m, y, n in zip(a, a_attn, b, b_attn))


def _trl_logps(trainer, model, batch):
    """TRL's per-sequence answer log-prob sums, policy and reference, through the same forward its
    `_compute_loss` uses (fused_lm_head log_probs, summed over the completion)."""
    from trl.trainer.utils import use_adapter
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    seq_len = batch["completion_mask"].shape[1] - 1
    policy = model(**kwargs, labels=labels, fused_lm_head=True).log_probs[:, -seq_len:].sum(1)
    with use_adapter(model, adapter_name=None):
        ref = model(**kwargs, labels=labels, fused_lm_head=True).log_probs[:, -seq_len:].sum(1)
    return policy, ref


def reward_check(rows, pairs: int, std: float, workdir: str) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    from tuneforge.adapters.lora import apply_lora
    from tuneforge.data.chat import TokenizedExample
    from tuneforge.data.collate import collate
    from tuneforge.data.example import Example
    from tuneforge.models.heads import TrainModule
    from tuneforge.models.load import load_causal_lm
    from tuneforge.objectives.reward import RewardObjective

    base, tok = load_causal_lm("smollm2-135m-instruct", dtype="float32")
    config = copy.deepcopy(base.config)
    config.num_labels = 1
    torch.manual_seed(0)
    seqcls = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
    missing, _ = seqcls.model.load_state_dict(base.model.state_dict(), strict=False)
    assert not missing, missing
    with torch.no_grad():
        seqcls.score.weight.normal_(0.0, 0.02)
    seqcls.config.pad_token_id = tok.pad_token_id
    tf_model = apply_lora(copy.deepcopy(base), r=LORA["r"], alpha=LORA["alpha"], dropout=LORA["dropout"])
    peft_cfg = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                          target_modules="all-linear", task_type="SEQ_CLS")
    trainer = RewardTrainer(model=seqcls, args=trl_args(RewardConfig, workdir), processing_class=tok,
                            train_dataset=Dataset.from_list(conversational(rows)), peft_config=peft_cfg)
    trl_model = trainer.model
    perturb_lora_b(trl_model, std)
    n_lora = copy_lora(trl_model, tf_model)
    score = next(p for n, p in trl_model.named_parameters() if n.endswith(("score.modules_to_save.default.weight",
                                                                               "score.weight")))
    head = torch.nn.Linear(config.hidden_size, 1, bias=False)
    with torch.no_grad():
        head.weight.copy_(score)
    trl_model.eval(), tf_model.eval()

    trl_rows = list(trainer.train_dataset)
    last_tokens = sorted({r[k][-1] for r in trl_rows for k in ("chosen_ids", "rejected_ids")})
    # the same ids on the tuneforge side; the mask only matters to the audit, not to the reward
    tf_examples = [Example([TokenizedExample(r["chosen_ids"], [1] * len(r["chosen_ids"])),
                            TokenizedExample(r["rejected_ids"], [1] * len(r["rejected_ids"]))], [0, 1],
                           ("chosen", "rejected")) for r in trl_rows]
    trl_batch = trainer.data_collator(trl_rows)
    tf_batch = collate(tf_examples, tok.pad_token_id)
    with torch.no_grad():
        trl_loss = float(trainer.compute_loss(trl_model, dict(trl_batch)))
        trl_rewards = trl_model(input_ids=trl_batch["input_ids"], attention_mask=trl_batch["attention_mask"],
                                use_cache=False).logits.squeeze(-1)
        module = TrainModule(tf_model, {"reward": head})
        out = RewardObjective().loss(module, tf_batch)
        from tuneforge.models.reward import rewards_at
        from tuneforge.objectives.functional import forward
        tf_rewards = forward(module, tf_batch, lambda h, tm: rewards_at(h, tf_batch["last_index"], tm.heads["reward"]))
    reorder = torch.tensor([k for p in range(pairs) for k in (p, pairs + p)])
    return {"lora_tensors": n_lora, "last_tokens": [tok.decode([t]) for t in last_tokens],
            "trl_loss": trl_loss, "tf_loss": float(out.loss_sum) / out.count,
            "rewards_max_diff": float((trl_rewards[reorder] - tf_rewards).abs().max()),
            "rewards_scale": float(tf_rewards.abs().max())}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=6)
    p.add_argument("--perturb", type=float, default=0.05, help="std of the random LoRA B values (both sides)")
    p.add_argument("--tol", type=float, default=1e-5)
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    rows = records(args.pairs)
    with tempfile.TemporaryDirectory() as tmp:
        dpo = dpo_check(rows, args.pairs, args.perturb, tmp)
        reward = reward_check(rows, args.pairs, args.perturb, tmp)
    print(f"# tuneforge vs TRL, preference losses on identical inputs ({args.pairs} pairs, float32, "
          f"LoRA B ~ N(0, {args.perturb}) on both sides, tolerance {args.tol:g})\n")
    print("Native tokenisation (TRL's DPOTrainer dataset vs tuneforge's preference builder):")
    print("\n".join(dpo["tokens"]) + "\n")
    print(f"DPO identical inputs: ids {dpo['ids_match']} rows, answer masks {dpo['masks_match']} rows; "
          f"{dpo['lora_tensors']} LoRA tensors copied")
    print(f"Reward: {reward['lora_tensors']} LoRA tensors copied; last tokens of TRL's sequences "
          f"{reward['last_tokens']}\n")
    checks = [("dpo sigmoid loss (mean over pairs)", dpo["trl_loss"], dpo["tf_loss"]),
              ("dpo policy log-prob sums, max |diff|", dpo["logps_scale"], dpo["policy_logps_max_diff"]),
              ("dpo reference log-prob sums, max |diff|", dpo["logps_scale"], dpo["ref_logps_max_diff"]),
              ("reward Bradley-Terry loss (mean)", reward["trl_loss"], reward["tf_loss"]),
              ("rewards, max |diff|", reward["rewards_scale"], reward["rewards_max_diff"])]
    print("| quantity | TRL (or scale) | tuneforge (or diff) | abs diff | ok |")
    print("|---|---|---|---|---|")
    ok_all = True
    for name, a, b in checks:
        diff = abs(a - b) if "diff" not in name else b
        tol = args.tol * max(1.0, abs(a)) if "diff" in name else args.tol
        ok = diff <= tol
        ok_all &= ok
        print(f"| {name} | {a:.8f} | {b:.8f} | {diff:.2e} | {'yes' if ok else 'NO'} |")
    print(f"\nln 2 = {0.6931471805599453:.8f} (the value at LoRA B = 0; the perturbed loss must differ from it)")
    return 0 if ok_all else 1


if __name__ == "__main__":
    sys.exit(main())
