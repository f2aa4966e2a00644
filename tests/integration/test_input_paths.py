"""Every path a command reads is checked before any model or tokenizer loads: one line naming the config key
(or flag) and the path, with a hint, and exit code 2 (the README's promise), never a FileNotFoundError."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from helpers.runs import make_config, write_config_yaml, write_instruction_data
from tuneforge.cli import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def no_loading(monkeypatch):
    """Loading anything is a failure: the check must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model or tokenizer was loaded before the input paths were checked")
    import tuneforge.models.load as load
    monkeypatch.setattr(load, "load_causal_lm", refuse)
    monkeypatch.setattr(load, "load_tokenizer", refuse)


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    [line] = [line for line in err.splitlines() if line.strip()]
    assert line.startswith("tuneforge: error: ")
    return line


def test_readme_clm_recipe_with_its_placeholder_is_one_line_exit_2():
    """The command printed in configs/clm_lora.yaml, copied as it is, on a fresh clone."""
    r = subprocess.run([sys.executable, "-m", "tuneforge", "train", "configs/clm_lora.yaml",
                        "data.train=path/to/texts/", "train.output_dir=/nonexistent/never-written"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip() == ("tuneforge: error: data.train: path/to/texts/: no such file or folder; "
                                "replace the placeholder with your data (data.train=YOUR_FILE_OR_FOLDER)")


@pytest.fixture
def setup(tmp_path, tiny_model_dir):
    data = write_instruction_data(tmp_path / "train.jsonl", n=8)
    cfg = write_config_yaml(make_config(tiny_model_dir, data, tmp_path / "out", lora=True),
                            tmp_path / "run.yaml")
    return tmp_path, str(cfg), tiny_model_dir


def _cases(tmp: Path, cfg: str, model: str):
    (tmp / "not_a_run").mkdir()
    (tmp / "some_file.txt").write_text("x")
    return [
        (["train", cfg, f"data.train={tmp / 'train.jsnol'}"], "data.train", tmp / "train.jsnol",
         f"no such file or folder; did you mean {tmp / 'train.jsonl'}?"),
        (["train", cfg, f"data.eval={tmp / 'held_out.jsonl'}"], "data.eval", tmp / "held_out.jsonl",
         "no such file or folder"),
        (["train", cfg, f"model.name={tmp / 'models' / 'mine'}"], "model.name", tmp / "models" / "mine",
         "no such file or folder; not an embedded model name either"),
        (["data", "inspect", cfg, "data.train=path/to/texts/"], "data.train", "path/to/texts/",
         "replace the placeholder with your data"),
        (["eval", cfg, "--adapter", str(tmp / "out" / "final")], "--adapter", tmp / "out" / "final",
         "no such folder"),
        (["eval", cfg, f"data.train={tmp / 'nope.jsonl'}"], "data.train", tmp / "nope.jsonl", "no such file"),
        (["generate", "--run", str(tmp / "runs" / "demo"), "--prompt", "hi"], "--run", tmp / "runs" / "demo",
         "no such folder"),
        (["chat", "--run", str(tmp / "not_a_run")], "--run", tmp / "not_a_run",
         "has no config.yaml, so it is not a training output folder"),
        (["generate", "--model", model, "--adapter", str(tmp / "some_file.txt"), "--prompt", "hi"], "--adapter",
         tmp / "some_file.txt", "is a file; expected a PEFT adapter folder"),
        (["generate", "--model", model, "--file", str(tmp / "prompts.txt")], "--file", tmp / "prompts.txt",
         "no such file"),
        (["chat", "--model", str(tmp / "base.gguf")], "--model", tmp / "base.gguf", "no such file or folder"),
        (["merge", "--model", str(tmp / "base"), "--adapter", str(tmp), "--out", str(tmp / "m")], "--model",
         tmp / "base", "no such file or folder"),
        (["merge", "--model", model, "--adapter", str(tmp / "not_a_run"), "--out", str(tmp / "m")], "--adapter",
         tmp / "not_a_run", "has no adapter_config.json, so it is not a PEFT adapter folder"),
    ]


CASE_IDS = ["train-mistyped", "train-eval", "train-model", "inspect-placeholder", "eval-adapter", "eval-data",
            "generate-run", "chat-run-no-config", "generate-adapter-file", "generate-file", "chat-model",
            "merge-model", "merge-adapter"]


@pytest.mark.parametrize("case", range(len(CASE_IDS)), ids=CASE_IDS)
def test_bad_input_path_is_one_line_naming_key_and_path_before_loading(setup, no_loading, capsys, case):
    tmp, cfg, model = setup
    argv, label, path, words = _cases(tmp, cfg, model)[case]
    assert main(argv) == 2
    line = _error_line(capsys)
    assert line.startswith(f"tuneforge: error: {label}: {path}: "), line
    assert words in line, line


def test_good_paths_pass_the_check(setup, capsys):
    """The check refuses nothing that exists: inspect on the same config runs to the end."""
    tmp, cfg, _ = setup
    assert main(["data", "inspect", cfg, "-n", "1", "--no-color"]) == 0
    assert "supervised tokens" in capsys.readouterr().out
