"""A run stopped (by SIGINT or SIGTERM, mid-run) and resumed ends with weights bit-identical to an uninterrupted
run, for every registered method; online RL also with the same rewards and (ppo) adaptive KL coefficient, and
under full fine-tuning with its reference, the starting model, loaded again from model.name."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from helpers.runs import METHOD_SETUP, make_config, method_config, write_instruction_data
from helpers.runs import all_methods, online_rl_methods, read_metrics
from tuneforge.run import train
from tuneforge.train.checkpoint import list_checkpoints


class _InterruptAfter:
    """The method's own objective, sending `signum` to this process during step `n`: the loop must finish the
    step, save and stop."""

    def __init__(self, inner, n, signum=signal.SIGINT):
        self.inner, self.n, self.calls, self.signum = inner, n, 0, signum

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def prepare(self, module, micro_batches):
        self.calls += 1
        if self.calls == self.n:
            os.kill(os.getpid(), self.signum)
        return self.inner.prepare(module, micro_batches)


def _final_weights(run, lora):
    """Every tensor the run saved in final/ (a reward model under LoRA: the merged model and adapter/)."""
    final = run / "final"
    files = sorted(final.rglob("*.safetensors"))
    assert files and (not lora or any("adapter" in f.name for f in files)), files
    return {f"{f.relative_to(final)}:{k}": v for f in files for k, v in load_file(str(f)).items()}


def _run_with_interrupt(monkeypatch, cfg, n, signum=signal.SIGINT):
    import tuneforge.run as run_mod
    real = run_mod.make_objective
    monkeypatch.setattr(run_mod, "make_objective", lambda c, t=None: _InterruptAfter(real(c, t), n, signum))
    res = train(cfg)
    monkeypatch.undo()
    return res


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("method", all_methods())
def test_resume_is_bit_identical(method, lora, tiny_model_dir, tmp_path, monkeypatch):
    if not lora and METHOD_SETUP.get(method, {}).get("lora"):
        pytest.skip(f"{method}: full fine-tuning's resume is tested with its precomputed reference "
                    "(tests/objectives/test_dpo.py)")
    online = method in online_rl_methods()
    # LoRA dropout > 0: the resumed run must also restore the RNG to draw the same dropout masks (online RL
    # refuses dropout: the ratio must be 1 before an update)
    dropout = 0.1 if lora and not online else 0.0
    kw = dict(max_steps=7, save_every=100, warmup_steps=2, lora=lora, lora_dropout=dropout)
    config = lambda name: method_config(method, tiny_model_dir, tmp_path / "data", tmp_path / name, **kw)  # noqa: E731
    train(config("straight"))
    # SIGINT (Ctrl-C) or SIGTERM (a scheduler's stop): both finish the step and save
    res = _run_with_interrupt(monkeypatch, config("resumed"), 3, signal.SIGTERM if lora else signal.SIGINT)
    assert res["train"]["interrupted"] and res["train"]["steps"] == 3
    assert [p.name for p in list_checkpoints(tmp_path / "resumed")] == ["step-00000003"]
    resumed = train(config("resumed"), resume=True)
    assert resumed["train"]["steps"] == 7 and resumed["train"]["steps_this_run"] == 4
    a, b = _final_weights(tmp_path / "straight", lora), _final_weights(tmp_path / "resumed", lora)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    if online:  # the resumed steps sampled, scored and (ppo) controlled the KL as the straight run did
        keys = ("loss", "reward", "reward_std", "kl_coef", "completion_length")
        rows = lambda name: [tuple(r.get(k) for k in ("step",) + keys)  # noqa: E731
                             for r in read_metrics(tmp_path / name) if r["split"] == "train"]
        straight, resumed_rows = rows("straight"), rows("resumed")
        assert len(straight) == len(resumed_rows) == 7 and straight == resumed_rows
        assert method != "ppo" or len({r[4] for r in straight}) > 2  # the adaptive coefficient moved
        samples = lambda name: (tmp_path / name / "samples.jsonl").read_text().splitlines()  # noqa: E731
        assert samples("straight") == samples("resumed")


def test_resume_refuses_a_changed_run(tiny_model_dir, tmp_path, monkeypatch):
    """Resuming with another schedule or data set would replay or skip data: a clear error instead."""
    import pytest

    from tuneforge.errors import TuneforgeError
    data = write_instruction_data(tmp_path / "d.jsonl")
    train(make_config(tiny_model_dir, data, tmp_path / "run", max_steps=2, save_every=1))
    with pytest.raises(TuneforgeError, match="total_steps: 2 -> 5"):
        train(make_config(tiny_model_dir, data, tmp_path / "run", max_steps=5), resume=True)
