"""A finished run's record (config.yaml, final/, results.json) is never overwritten without an explicit choice,
and config.yaml is written only once the start-up checks passed, so it always matches final/ and results.json."""

from __future__ import annotations

import json
import shutil

import pytest

from helpers.runs import make_config, write_config_yaml, write_instruction_data
from tuneforge.cli import main
from tuneforge.train import checkpoint as ckpt


@pytest.fixture
def finished(tmp_path, tiny_model_dir, capsys):
    """A finished LoRA run in tmp_path/run (4 steps, a checkpoint every 2) and its config file."""
    data = write_instruction_data(tmp_path / "d.jsonl", n=16)
    cfg = write_config_yaml(make_config(tiny_model_dir, data, tmp_path / "run", lora=True, max_steps=4,
                                        save_every=2), tmp_path / "run.yaml")
    assert main(["train", str(cfg)]) == 0
    capsys.readouterr()
    return tmp_path / "run", str(cfg)


def _snapshot(run):
    return {name: (run / name).read_bytes() for name in ("config.yaml", "results.json", "final/README.md",
                                                       "final/adapter_model.safetensors")}


def _bad_data(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": \n')
    return f"data.train={bad}"


def test_a_failed_start_into_a_finished_run_is_refused_and_leaves_its_record(finished, tmp_path, capsys):
    run, cfg = finished
    before = _snapshot(run)
    assert main(["train", cfg, _bad_data(tmp_path)]) == 2
    err = capsys.readouterr().err
    [line] = [line for line in err.splitlines() if line.strip()]
    assert line.startswith(f"tuneforge: error: train.output_dir: {run} holds a finished run (final/, results.json)")
    assert "train.output_dir=" in line and "--overwrite" in line and "--resume" in line
    assert _snapshot(run) == before
    assert main(["train", cfg]) == 2  # a good config too: the choice is the user's
    assert _snapshot(run) == before


def test_resume_of_a_finished_run_with_another_config_is_caught_by_the_resume_checks(finished, capsys):
    run, cfg = finished
    before = _snapshot(run)
    assert main(["train", cfg, "train.max_steps=6", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "cannot resume exactly" in err and "total_steps: 4 -> 6" in err
    assert _snapshot(run) == before
    assert main(["train", cfg, "--resume", "--overwrite"]) == 2  # contradictory choices
    assert "contradict" in capsys.readouterr().err and _snapshot(run) == before


def test_overwrite_replaces_the_whole_record(finished, tmp_path, capsys):
    run, cfg = finished
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step-00000002", "step-00000004"]
    assert main(["train", cfg, "train.max_steps=3", "train.save_every=1", "--overwrite"]) == 0
    capsys.readouterr()
    # no checkpoint of the old run is left for a later --resume to take for the new one's
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step-00000002", "step-00000003"]
    assert ckpt.load_checkpoint(run / "checkpoints" / "step-00000002")[3]["total_steps"] == 3
    assert "max_steps: 3" in (run / "config.yaml").read_text()
    assert json.loads((run / "results.json").read_text())["train"]["steps"] == 3
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3  # the old run's rows went with it


def test_a_failed_start_writes_no_config(tmp_path, tiny_model_dir, capsys):
    data = write_instruction_data(tmp_path / "d.jsonl", n=8)
    cfg = write_config_yaml(make_config(tiny_model_dir, data, tmp_path / "run"), tmp_path / "run.yaml")
    assert main(["train", str(cfg), _bad_data(tmp_path)]) == 2
    assert not (tmp_path / "run" / "config.yaml").exists()


def _unfinished(run):
    """What a killed run leaves: checkpoints and config.yaml, no final/ or results.json."""
    shutil.rmtree(run / "final")
    (run / "results.json").unlink()


def test_resume_that_fails_at_start_keeps_the_unfinished_runs_config(finished, tmp_path, capsys):
    run, cfg = finished
    _unfinished(run)
    saved = (run / "config.yaml").read_bytes()
    assert main(["train", cfg, _bad_data(tmp_path), "--resume"]) == 2
    assert (run / "config.yaml").read_bytes() == saved


def test_resume_with_another_config_is_caught_and_keeps_the_saved_config(finished, capsys):
    run, cfg = finished
    _unfinished(run)
    saved = (run / "config.yaml").read_bytes()
    assert main(["train", cfg, "train.max_steps=6", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "cannot resume exactly" in err and "total_steps: 4 -> 6" in err
    assert (run / "config.yaml").read_bytes() == saved
    assert main(["train", cfg, "--resume"]) == 0  # the same config resumes, and is recorded again
    assert (run / "config.yaml").read_bytes() == saved and (run / "results.json").exists()
