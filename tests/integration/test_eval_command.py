"""`tuneforge eval`, base against tuned in one command: the held-out metrics side by side, task accuracy by
eval.metrics, and what changed answer by answer, equal to what training measured on the same data."""

from __future__ import annotations

import json

import pytest

from helpers.runs import write_instruction_data
from tuneforge.cli import main


def _run(tmp_path, tiny_model_dir, lora: bool, metrics: str = "[exact, contains]"):
    train = write_instruction_data(tmp_path / "train.jsonl", n=16)
    held_out = write_instruction_data(tmp_path / "held_out.jsonl", n=4, seed=1)
    out = tmp_path / ("lora" if lora else "full")
    cfg = tmp_path / f"{out.name}.yaml"
    cfg.write_text(f"method: sft\nmodel: {{name: {tiny_model_dir}}}\n"
                   f"data: {{train: {train}, eval: {held_out}, cache_dir: {tmp_path / 'cache'}}}\n"
                   f"lora: {{enabled: {str(lora).lower()}, r: 4, alpha: 8}}\n"
                   f"train: {{output_dir: {out}, max_steps: 4, micro_batch_size: 4, lr: 0.003, progress: false, "
                   f"tensorboard: false}}\n"
                   f"eval: {{generate: true, max_new_tokens: 6, metrics: {metrics}}}\n")
    assert main(["train", str(cfg)]) == 0
    return cfg, out, json.loads((out / "results.json").read_text())


@pytest.mark.parametrize("lora", [True, False])
def test_eval_run_gives_base_and_tuned_as_training_measured_them(tmp_path, tiny_model_dir, capsys, lora):
    cfg, out, results = _run(tmp_path, tiny_model_dir, lora)
    # training wrote the per-example diff beside results.json, and counted it
    rows = [json.loads(x) for x in (out / "eval_diff.jsonl").read_text().splitlines()]
    over = results["tuned"]["over_base"]
    assert len(rows) == 4 and over["diff_file"] == str(out / "eval_diff.jsonl")
    assert sum(over[k] for k in ("improved", "regressed", "unchanged")) == 4
    assert over["wins"] == over["improved"] and over["losses"] == over["regressed"]
    capsys.readouterr()

    assert main(["eval", "--run", str(out), "--diff", str(tmp_path / "diff.jsonl")]) == 0
    captured = capsys.readouterr()
    got = json.loads(captured.out)
    # the same greedy answers and held-out losses as training's before and after measurements
    assert got["base"]["task"]["metrics"] == results["base"]["metrics"]
    assert got["tuned"]["task"]["metrics"] == results["tuned"]["metrics"]
    assert got["base"]["loss"]["loss"] == pytest.approx(results["eval_before"]["loss"], rel=1e-5)
    assert got["tuned"]["loss"]["loss"] == pytest.approx(results["train"]["eval"]["loss"], rel=1e-5)
    loss = got["comparison"]["loss"]["loss"]
    assert loss["change"] == pytest.approx(loss["tuned"] - loss["base"]) and loss["change"] < 0  # it learned
    assert "perplexity" in got["comparison"]["loss"]
    task = got["comparison"]["task"]
    assert [r["change"] for r in task["rows"]] == [r["change"] for r in rows]
    assert [json.loads(x) for x in (tmp_path / "diff.jsonl").read_text().splitlines()] == task["rows"]
    assert task["metrics"]["exact"]["tuned"] == results["tuned"]["metrics"]["exact"]
    # forgetting: general-text perplexity of base and tuned, as training measured it before and after
    forgot, trained = got["comparison"]["forgetting"], results["forgetting"]
    assert trained["tokens"] == forgot["tokens"] > 0 and trained["general_text"] == "tuneforge's general text"
    for key in ("before", "after", "change"):
        assert forgot[key] == pytest.approx(trained[key], rel=1e-5), key
    assert trained["change"] == pytest.approx(trained["after"] / trained["before"] - 1)
    assert "held-out task accuracy" in captured.err and "base model" in captured.err and "perplexity" in captured.err


def test_eval_with_a_user_metric_and_an_override_after_run(tmp_path, tiny_model_dir, capsys, monkeypatch):
    (tmp_path / "my_metric.py").write_text(
        "def has_digit(prompts, completions, references):\n"
        "    return [float(any(ch.isdigit() for ch in c)) for c in completions]\n")
    monkeypatch.chdir(tmp_path)
    cfg, out, results = _run(tmp_path, tiny_model_dir, True, "[my_metric:has_digit, exact]")
    assert list(results["tuned"]["metrics"]) == ["has_digit", "exact"]
    other = write_instruction_data(tmp_path / "other.jsonl", n=3, seed=7)
    capsys.readouterr()
    assert main(["eval", "--run", str(out), f"data.eval={other}", "eval.metrics=[contains]"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["tuned"]["task"]["n"] == 3 and list(got["tuned"]["task"]["metrics"]) == ["contains"]
    assert main(["eval", "--run", str(out), "--no-base"]) == 0
    alone = json.loads(capsys.readouterr().out)
    assert set(alone) == {"loss", "general", "task"} and alone["task"]["metrics"] == results["tuned"]["metrics"]


def test_eval_errors_name_what_is_missing(tmp_path, tiny_model_dir, capsys):
    assert main(["eval"]) == 2
    assert "--run RUN_DIR" in capsys.readouterr().err
    assert main(["eval", "--run", str(tmp_path / "nope")]) == 2
    assert "nope" in capsys.readouterr().err
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / "config.yaml").write_text(
        f"method: sft\nmodel: {{name: {tiny_model_dir}}}\n"
        f"data: {{train: {write_instruction_data(tmp_path / 't.jsonl', n=4)}, eval_fraction: 0.5}}\n")
    assert main(["eval", "--run", str(tmp_path / "unfinished")]) == 2
    assert "no trained model" in capsys.readouterr().err


@pytest.mark.parametrize("method,lora,key", [("contrastive", True, "recall@1"), ("clm", False, "perplexity")])
def test_eval_run_compares_the_methods_own_metrics(tmp_path, tiny_model_dir, capsys, method, lora, key):
    """An embedder's final/ is a model folder (merged under LoRA): eval --run scores it against the base by
    retrieval on the held-out pairs; a text run by held-out perplexity. Both equal training's numbers."""
    from helpers.runs import method_config
    from tuneforge.run import train
    cfg = method_config(method, tiny_model_dir, tmp_path / "data", tmp_path / "run", max_steps=3, lora=lora)
    cfg.data.eval_fraction, cfg.eval.loss, cfg.eval.forgetting = 0.25, True, True
    results = train(cfg)
    capsys.readouterr()
    assert main(["eval", "--run", str(tmp_path / "run")]) == 0
    got = json.loads(capsys.readouterr().out)
    assert "loss" in got["comparison"], got
    row = got["comparison"]["loss"][key]
    assert row["base"] == pytest.approx(results["eval_before"][key], rel=1e-5)
    assert row["tuned"] == pytest.approx(results["train"]["eval"][key], rel=1e-5)
    assert "task" not in got["comparison"]
    assert ("forgetting" in got["comparison"]) == (method == "clm")  # an embedder has no next-token perplexity
    assert main(["eval", "--run", str(tmp_path / "run"), "eval.loss=false", "eval.forgetting=false"]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err
