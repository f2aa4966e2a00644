"""Faults during training: a full disk, NaN/inf steps, SIGTERM, damaged or half-written checkpoints.

Each test ends by resuming (or checking that a resume would start) from what is left on disk, and most compare
the final weights bit for bit with an uninterrupted run: surviving a fault means losing nothing but the steps
since the last checkpoint.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import signal

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from helpers.runs import make_config, write_config_yaml, write_instruction_data
import tuneforge.run as run_mod
from tuneforge.cli import main
from tuneforge.errors import TuneforgeError
from tuneforge.models.heads import unwrap
from tuneforge.objectives.sft import SFTObjective
from tuneforge.run import train
from tuneforge.train import checkpoint as ckpt

STEPS = 7


class _Scripted(SFTObjective):
    """SFT with scripted faults by step number: "loss" makes the loss and every gradient NaN, "grad" puts an
    inf into one gradient (an fp16 overflow in backward); `signal_at` sends `signum` to this process during
    that step. Records the trainable weights at the start of each step."""

    def __init__(self, bad=None, first_step=0, signal_at=None, signum=signal.SIGINT):
        super().__init__()
        self.bad, self.step_no, self.signal_at, self.signum = bad or {}, first_step, signal_at, signum
        self.weights_before: dict[int, dict] = {}

    def prepare(self, module, micro_batches):
        self.step_no += 1
        trainable = [(n, p) for n, p in unwrap(module).named_parameters() if p.requires_grad]
        self.weights_before[self.step_no] = {n: p.detach().clone() for n, p in trainable}
        if self.step_no == self.signal_at:
            os.kill(os.getpid(), self.signum)
        if self.bad.get(self.step_no) == "grad":  # inf lands in one gradient after backward
            def overflow(param):
                param.grad.view(-1)[:1].fill_(math.inf)
                handle.remove()
            handle = trainable[0][1].register_post_accumulate_grad_hook(overflow)
        return super().prepare(module, micro_batches)

    def loss(self, module, batch):
        out = super().loss(module, batch)
        if self.bad.get(self.step_no) == "loss":
            out.loss_sum = out.loss_sum * float("nan")
        return out


def _use(monkeypatch, objective):
    monkeypatch.setattr(run_mod, "make_objective", lambda cfg, tokenizer=None: objective)
    return objective


def _config(tmp_path, model_dir, name, **kw):
    data = tmp_path / "d.jsonl"
    if not data.exists():  # written once: its modification time is part of the token cache key
        write_instruction_data(data)
    return make_config(model_dir, data, tmp_path / name, max_steps=STEPS, warmup_steps=2, **kw)


def _final(run):
    return load_file(str(run / "final" / "model.safetensors"))


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def _train_rows(run):
    return [json.loads(line) for line in open(run / "metrics.jsonl") if '"split": "train"' in line]


# ------------------------------------------------------------------------------------------------- full disk

def _fail_safetensors_write(real):
    def save_file(tensors, path, *args, **kwargs):
        if ".step-00000002.tmp-" in str(path):
            with open(path, "wb") as f:  # the disk fills up half-way through the file
                f.write(b"\0" * 64)
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(tensors, path, *args, **kwargs)
    return save_file


def _fail_json_write(real):
    def write_json(path, obj):
        if ".step-00000002.tmp-" in str(path):
            path.write_text('{"step": 2, "optim')
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, obj)
    return write_json


@pytest.mark.parametrize("target, make_failure", [("save_file", _fail_safetensors_write),
                                                  ("_write_json", _fail_json_write)])
def test_full_disk_during_a_checkpoint(tiny_model_dir, tmp_path, monkeypatch, capsys, target, make_failure):
    """ENOSPC while checkpoint 2 is written: exit code 2 with a message naming it, checkpoint 1 intact and
    nothing half-written left; after space is freed, --resume ends bit-identical to a run without the fault."""
    train(_config(tmp_path, tiny_model_dir, "straight"))
    cfg = _config(tmp_path, tiny_model_dir, "full", save_every=1, keep_last=1)  # 1 must survive the failed 2
    monkeypatch.setattr(ckpt, target, make_failure(getattr(ckpt, target)))
    assert main(["train", str(write_config_yaml(cfg, tmp_path / "full.yaml"))]) == 2
    err = capsys.readouterr().err
    assert "could not write checkpoint" in err and "step-00000002" in err and "No space left on device" in err
    assert "step-00000001 is intact" in err and "Traceback" not in err
    monkeypatch.undo()
    root = tmp_path / "full" / "checkpoints"
    assert sorted(os.listdir(root)) == ["step-00000001"]  # the temporary folder went with the error
    assert ckpt.load_checkpoint(root / "step-00000001")[3]["step"] == 1
    assert train(cfg, resume=True)["train"]["steps"] == STEPS
    _assert_same(_final(tmp_path / "straight"), _final(tmp_path / "full"))


def test_full_disk_while_writing_the_final_model(tiny_model_dir, tmp_path, monkeypatch):
    """The last checkpoint holds the finished run: after space is freed, --resume only writes final/ again."""
    from transformers import PreTrainedTokenizerBase
    train(_config(tmp_path, tiny_model_dir, "straight"))
    cfg = _config(tmp_path, tiny_model_dir, "full", save_every=1, keep_last=1)
    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", lambda *a, **k: _raise_enospc())
    with pytest.raises(TuneforgeError, match=r"could not write .*final: .*No space left on device.*intact"):
        train(cfg)
    monkeypatch.undo()
    assert not [p.name for p in (tmp_path / "full").iterdir() if p.name.startswith((".final", "final"))]
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "full")] == [f"step-{STEPS:08d}"]
    assert train(cfg, resume=True)["train"]["steps"] == STEPS
    _assert_same(_final(tmp_path / "straight"), _final(tmp_path / "full"))


def _raise_enospc():
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


# ----------------------------------------------------------------------------------------------- NaN and inf

def test_nonfinite_steps_are_skipped_and_resume_stays_exact(tiny_model_dir, tmp_path, monkeypatch, capsys):
    bad = {3: "loss", 5: "grad"}
    straight = _use(monkeypatch, _Scripted(bad))
    res = train(_config(tmp_path, tiny_model_dir, "straight"))
    assert res["train"]["steps"] == STEPS
    out = capsys.readouterr().out
    assert "step 3: loss nan" in out and "step 5: loss" in out and "gradient norm inf" in out
    assert "update skipped (2 of at most 5)" in out
    # a skipped step leaves weights (and optimizer moments) untouched; a normal step changes them
    for step in (3, 5):
        _assert_same(straight.weights_before[step], straight.weights_before[step + 1])
    assert not torch.equal(*(straight.weights_before[s]["model.norm.weight"] for s in (2, 3)))
    rows = _train_rows(tmp_path / "straight")
    assert [(r["step"], r["bad_steps"]) for r in rows if r["skipped"]] == [(3, 1), (5, 2)]
    assert all(r["loss"] is None for r in rows if r["skipped"]) and all(math.isfinite(r["loss"]) for r in rows
                                                                        if not r["skipped"])
    # stopped during step 4 (after one skipped step), resumed: the skip count and data position carry over
    _use(monkeypatch, _Scripted(bad, signal_at=4))
    assert train(_config(tmp_path, tiny_model_dir, "resumed"))["train"]["steps"] == 4
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "resumed"))[3]
    assert state["step"] == 4 and state["bad_steps"] == 1
    capsys.readouterr()
    _use(monkeypatch, _Scripted({5: "grad"}, first_step=4))
    train(_config(tmp_path, tiny_model_dir, "resumed"), resume=True)
    assert "update skipped (2 of at most 5)" in capsys.readouterr().out
    _assert_same(_final(tmp_path / "straight"), _final(tmp_path / "resumed"))


def test_too_many_nonfinite_steps_stop_the_run_keeping_the_last_good_checkpoint(tiny_model_dir, tmp_path,
                                                                              monkeypatch, capsys):
    _use(monkeypatch, _Scripted({3: "loss", 4: "grad"}))
    cfg = _config(tmp_path, tiny_model_dir, "run", save_every=2, max_bad_steps=1)
    assert main(["train", str(write_config_yaml(cfg, tmp_path / "run.yaml"))]) == 2
    err = capsys.readouterr().err
    assert "step 4" in err and "2 steps had a non-finite loss or gradients" in err and "max_bad_steps=1" in err
    assert "last good checkpoint" in err and "step-00000002" in err
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "run")] == ["step-00000002"]  # no step-4 save
    weights = ckpt.load_checkpoint(tmp_path / "run" / "checkpoints" / "step-00000002")[0]
    assert all(torch.isfinite(t).all() for t in weights.values())
    assert not (tmp_path / "run" / "final").exists()


# --------------------------------------------------------------------------------- signals, damaged checkpoints

def test_sigterm_finishes_the_step_saves_and_exits(tiny_model_dir, tmp_path, monkeypatch):
    train(_config(tmp_path, tiny_model_dir, "straight"))
    _use(monkeypatch, _Scripted(signal_at=3, signum=signal.SIGTERM))
    res = train(_config(tmp_path, tiny_model_dir, "stopped"))
    assert res["train"]["interrupted"] and res["train"]["steps"] == 3
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "stopped")] == ["step-00000003"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is removed again
    monkeypatch.undo()
    train(_config(tmp_path, tiny_model_dir, "stopped"), resume=True)
    _assert_same(_final(tmp_path / "straight"), _final(tmp_path / "stopped"))


def _stopped_run(tmp_path, model_dir, monkeypatch):
    """A straight run, and a run stopped after step 3 with checkpoints 2 and 3 (save_every=1, keep_last=2)."""
    train(_config(tmp_path, model_dir, "straight"))
    _use(monkeypatch, _Scripted(signal_at=3))
    train(_config(tmp_path, model_dir, "stopped", save_every=1))
    monkeypatch.undo()
    root = tmp_path / "stopped" / "checkpoints"
    assert sorted(os.listdir(root)) == ["step-00000002", "step-00000003"]
    return root


def test_leftovers_of_killed_writes_are_ignored_then_removed(tiny_model_dir, tmp_path, monkeypatch):
    """What SIGKILL leaves mid-write (a complete-looking temporary folder that was never renamed) or mid-prune
    (a renamed folder half deleted) is never resumed from, and the next save deletes it."""
    root = _stopped_run(tmp_path, tiny_model_dir, monkeypatch)
    never_renamed = root / ".step-00000004.tmp-killed"
    shutil.copytree(root / "step-00000003", never_renamed)
    state = json.loads((never_renamed / "state.json").read_text())
    (never_renamed / "state.json").write_text(json.dumps({**state, "step": 4}))
    half_deleted = root / ".step-00000001.del-4242"
    half_deleted.mkdir()
    (half_deleted / "state.json").write_text("{}")
    assert ckpt.latest_checkpoint(tmp_path / "stopped").name == "step-00000003"
    train(_config(tmp_path, tiny_model_dir, "stopped", save_every=1), resume=True)
    assert sorted(os.listdir(root)) == [f"step-{STEPS - 1:08d}", f"step-{STEPS:08d}"]
    _assert_same(_final(tmp_path / "straight"), _final(tmp_path / "stopped"))


def test_damaged_newest_checkpoint_falls_back_to_the_one_before(tiny_model_dir, tmp_path, monkeypatch, capsys):
    root = _stopped_run(tmp_path, tiny_model_dir, monkeypatch)
    weights = root / "step-00000003" / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated after the fact (bad copy, bad disk)
    cfg = _config(tmp_path, tiny_model_dir, "stopped")
    assert train(cfg, resume=True)["train"]["steps"] == STEPS
    assert "step-00000003 is unreadable" in capsys.readouterr().out
    _assert_same(_final(tmp_path / "straight"), _final(tmp_path / "stopped"))


def test_no_readable_checkpoint_is_an_error_not_a_silent_restart(tiny_model_dir, tmp_path, monkeypatch):
    root = _stopped_run(tmp_path, tiny_model_dir, monkeypatch)
    for folder in root.iterdir():
        (folder / "state.json").write_text("{not json")
    with pytest.raises(TuneforgeError, match="none of the 2 checkpoints .* is readable"):
        train(_config(tmp_path, tiny_model_dir, "stopped"), resume=True)
