"""Defects a review of the core found, each reproduced through the real entry points."""

from __future__ import annotations

import pytest

from helpers.runs import make_config, method_config, read_metrics, write_instruction_data
from tuneforge.errors import ConfigError, TuneforgeError
from tuneforge.run import evaluate, train


def test_resume_refuses_a_changed_batch_shape(tiny_model_dir, tmp_path):
    """With max_steps fixed, a new micro_batch_size or grad_accum would silently remap which data each step
    sees after the resume."""
    data = write_instruction_data(tmp_path / "d.jsonl")
    train(make_config(tiny_model_dir, data, tmp_path / "run", max_steps=4, save_every=2, micro_batch_size=4))
    for change, words in (({"micro_batch_size": 2}, "micro_batch_size"), ({"grad_accum": 2}, "grad_accum")):
        cfg = make_config(tiny_model_dir, data, tmp_path / "run", max_steps=4, save_every=2,
                          **{"micro_batch_size": 4, **change})
        cfg.data.packing = False  # the shape the user wrote reaches the loop as it is
        with pytest.raises(TuneforgeError, match=f"cannot resume exactly.*{words}"):
            train(cfg, resume=True)


def test_eval_without_held_out_data_is_refused(tiny_model_dir, tmp_path):
    cfg = make_config(tiny_model_dir, write_instruction_data(tmp_path / "d.jsonl"), tmp_path / "run")
    cfg.eval.loss = True
    with pytest.raises(ConfigError, match="data.eval.*no held-out data"):
        evaluate(cfg)
    cfg.data.eval_fraction = 0.25  # a held-out share of the train file is fine
    assert evaluate(cfg)["loss"]["count"] > 0


@pytest.mark.parametrize("method", ["clm", "sft"])
def test_every_run_reports_held_out_loss_before_and_after(method, tiny_model_dir, tmp_path):
    cfg = method_config(method, tiny_model_dir, tmp_path / "data", tmp_path / "run", max_steps=4)
    cfg.data.eval_fraction = 0.25
    cfg.eval.loss = True
    res = train(cfg)
    before, after = res["eval_before"], res["train"]["eval"]
    assert before["count"] == after["count"] > 0 and "perplexity" in before
    assert after["loss"] < before["loss"]


def test_a_resumed_run_counts_only_the_steps_it_ran(tiny_model_dir, tmp_path, capsys):
    from tuneforge.cli import main
    from helpers.runs import write_config_yaml
    data = write_instruction_data(tmp_path / "d.jsonl")
    cfg = make_config(tiny_model_dir, data, tmp_path / "run", max_steps=3, save_every=2)
    train(cfg)  # checkpoints at step 2 only: the resume runs step 3
    capsys.readouterr()
    assert main(["train", str(write_config_yaml(cfg, tmp_path / "c.yaml")), "--resume"]) == 0
    out = capsys.readouterr().out
    assert "trained 1 steps (resumed at step 2, 3 in all)" in out


def test_progress_bar_closes_before_the_final_evaluation(tiny_model_dir, tmp_path, monkeypatch):
    """Its rate would otherwise include the evaluation's time."""
    import tuneforge.train.loop as loop
    events = []
    real_close, real_eval = loop.Progress.close, loop.evaluate
    monkeypatch.setattr(loop.Progress, "close", lambda self: (events.append("close"), real_close(self)))
    monkeypatch.setattr(loop, "evaluate", lambda *a, **k: (events.append("eval"), real_eval(*a, **k))[1])
    cfg = make_config(tiny_model_dir, write_instruction_data(tmp_path / "d.jsonl"), tmp_path / "run", max_steps=2)
    cfg.data.eval_fraction, cfg.eval.loss = 0.25, True
    train(cfg)
    assert events[-2:] == ["close", "eval"]
    assert [r["split"] for r in read_metrics(tmp_path / "run")][-1] == "eval"
