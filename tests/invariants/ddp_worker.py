"""Run by test_data_parallel.py under torchrun: one rank's loss turns NaN at step 2. Every rank must skip that
update (the check is agreed by all ranks) and the ranks must end with identical weights. Rank 0 prints JSON."""

from __future__ import annotations

import json
import sys

import torch

from helpers.runs import make_config, write_chat_data
from tuneforge.data.collate import collate
from tuneforge.models.load import load_causal_lm
from tuneforge.objectives.sft import SFTObjective
from tuneforge.run import prepare
from tuneforge.train import distributed as dist
from tuneforge.train.loop import fit


class _NaNOnRank1(SFTObjective):
    def __init__(self):
        super().__init__()
        self.step = 0

    def prepare(self, module, micro_batches):
        self.step += 1
        return super().prepare(module, micro_batches)

    def loss(self, module, batch):
        out = super().loss(module, batch)
        if self.step == 2 and dist.rank() == 1:
            out.loss_sum = out.loss_sum * float("nan")
        return out


def main(model_dir: str, work: str) -> None:
    from pathlib import Path
    device = dist.init_from_env()
    torch.manual_seed(0)
    work = Path(work)
    data = work / "c.jsonl"
    if dist.is_main():
        write_chat_data(data)
    dist.barrier()
    cfg = make_config(model_dir, data, work / "run", max_steps=4, micro_batch_size=2, grad_accum=1, threads=1)
    cfg.data.packing = False
    model, tok = load_causal_lm(model_dir)
    train = prepare(cfg, tok).train
    res = fit(model, _NaNOnRank1(), train, lambda b: collate(b, tok.pad_token_id), cfg.train, device=device)
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    sums = dist.all_sum([float(flat.double().sum()), float(flat.double().abs().sum())])
    same = all(abs(s / dist.world_size() - float(v)) < 1e-9 * max(1.0, abs(float(v)))
               for s, v in zip(sums, (flat.double().sum(), flat.double().abs().sum())))
    if dist.is_main():
        print(json.dumps({"skipped": [row["skipped"] for row in res.history], "same_weights": same,
                          "finite": bool(torch.isfinite(flat).all())}))
    dist.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
