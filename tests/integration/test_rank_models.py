"""`tuneforge rank` samples from the model asked for: the config's base, the base + --adapter, or a --run's
final weights (through the loader generate and chat use), and records which in every record."""

from __future__ import annotations

import io
import json
import sys

from helpers.runs import make_config, write_config_yaml, write_instruction_data
from tuneforge.cli import main


def _rank(monkeypatch, tmp_path, name: str, *flags: str) -> list[dict]:
    """The records one prompt ranked `1` writes, as the command runs in this process (stdin piped)."""
    monkeypatch.setattr(sys, "stdin", io.StringIO("1\n"))
    out = tmp_path / f"{name}.jsonl"
    assert main(["rank", str(tmp_path / "run.yaml"), "--prompts", str(tmp_path / "p.txt"), "--out", str(out),
                 *flags, "rank.max_new_tokens=6", "rank.temperature=0.5"]) == 0
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_base_adapter_and_run_answers(monkeypatch, tmp_path, tiny_model_dir, capsys):
    data = write_instruction_data(tmp_path / "d.jsonl", n=8)
    cfg = make_config(tiny_model_dir, data, tmp_path / "run", lora=True, max_steps=4, lr=5e-2)
    assert main(["train", str(write_config_yaml(cfg, tmp_path / "run.yaml"))]) == 0
    (tmp_path / "p.txt").write_text("Add 1 and 2.\n")
    base = _rank(monkeypatch, tmp_path, "base")
    adapter = _rank(monkeypatch, tmp_path, "adapter", "--adapter", str(tmp_path / "run" / "final"))
    run = _rank(monkeypatch, tmp_path, "run", "--run", str(tmp_path / "run"))
    answers = [records[0]["rank"]["answers"] for records in (base, adapter, run)]
    assert answers[1] == answers[2]  # the same model and seed, reached either way
    assert answers[0] != answers[1]  # the trained adapter is on
    assert base[0]["rank"]["model"] == str(tiny_model_dir) and base[0]["rank"]["adapter"] is None
    assert adapter[0]["rank"]["adapter"] == str(tmp_path / "run" / "final")
    assert run[0]["rank"]["run"] == str(tmp_path / "run") and run[0]["rank"]["model"] is None
