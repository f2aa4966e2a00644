"""A run stopped (by SIGINT, mid-run) and resumed ends with weights bit-identical to an uninterrupted run."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from helpers.runs import METHOD_SETUP, make_config, method_config, write_instruction_data
from helpers.runs import token_batch_methods
from tuneforge.run import train
from tuneforge.train.checkpoint import list_checkpoints


class _InterruptAfter:
    """The method's own objective, sending SIGINT to this process during step `n`: the loop must finish the
    step, save and stop."""

    def __init__(self, inner, n):
        self.inner, self.n, self.calls = inner, n, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def prepare(self, module, micro_batches):
        self.calls += 1
        if self.calls == self.n:
            os.kill(os.getpid(), signal.SIGINT)
        return self.inner.prepare(module, micro_batches)


def _final_weights(run, lora):
    """Every tensor the run saved in final/ (a reward model under LoRA: the merged model and adapter/)."""
    final = run / "final"
    files = sorted(final.rglob("*.safetensors"))
    assert files and (not lora or any("adapter" in f.name for f in files)), files
    return {f"{f.relative_to(final)}:{k}": v for f in files for k, v in load_file(str(f)).items()}


def _run_with_interrupt(monkeypatch, cfg, n):
    import tuneforge.run as run_mod
    real = run_mod.make_objective
    monkeypatch.setattr(run_mod, "make_objective", lambda c, t=None: _InterruptAfter(real(c, t), n))
    res = train(cfg)
    monkeypatch.undo()
    return res


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("method", token_batch_methods())
def test_resume_is_bit_identical(method, lora, tiny_model_dir, tmp_path, monkeypatch):
    if not lora and METHOD_SETUP.get(method, {}).get("lora"):
        pytest.skip(f"{method}: full fine-tuning's resume is tested with its precomputed reference "
                    "(tests/objectives/test_dpo.py)")
    # LoRA dropout > 0: the resumed run must also restore the RNG to draw the same dropout masks
    kw = dict(max_steps=7, save_every=100, warmup_steps=2, lora=lora, lora_dropout=0.1 if lora else 0.0)
    config = lambda name: method_config(method, tiny_model_dir, tmp_path / "data", tmp_path / name, **kw)  # noqa: E731
    train(config("straight"))
    res = _run_with_interrupt(monkeypatch, config("resumed"), 3)
    assert res["train"]["interrupted"] and res["train"]["steps"] == 3
    assert [p.name for p in list_checkpoints(tmp_path / "resumed")] == ["step-00000003"]
    resumed = train(config("resumed"), resume=True)
    assert resumed["train"]["steps"] == 7 and resumed["train"]["steps_this_run"] == 4
    a, b = _final_weights(tmp_path / "straight", lora), _final_weights(tmp_path / "resumed", lora)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_resume_refuses_a_changed_run(tiny_model_dir, tmp_path, monkeypatch):
    """Resuming with another schedule or data set would replay or skip data: a clear error instead."""
    import pytest

    from tuneforge.errors import TuneforgeError
    data = write_instruction_data(tmp_path / "d.jsonl")
    train(make_config(tiny_model_dir, data, tmp_path / "run", max_steps=2, save_every=1))
    with pytest.raises(TuneforgeError, match="total_steps: 2 -> 5"):
        train(make_config(tiny_model_dir, data, tmp_path / "run", max_steps=5), resume=True)
