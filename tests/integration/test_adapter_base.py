"""A LoRA run on an embedded model records the model's short name as the adapter's base (not this machine's
cache path), and an adapter folder alone is enough to load its base again: generate and merge without --model."""

from __future__ import annotations

import json

import pytest

from helpers.runs import make_config, write_config_yaml, write_instruction_data
from tuneforge.cli import main
from tuneforge.models import embedded


@pytest.fixture
def embedded_tiny(monkeypatch, tiny_model_dir):
    """The tiny model registered as an embedded model (a folder one: no GGUF conversion), named tiny-embedded."""
    # package_path joins the package folder and relpath: an absolute relpath points anywhere
    monkeypatch.setitem(embedded.EMBEDDED, "tiny-embedded", embedded.EmbeddedModel(
        "tiny-embedded", "tuneforge", "tuneforge", str(tiny_model_dir), "folder", "the test suite's tiny Llama"))
    return "tiny-embedded"


def test_adapter_records_the_embedded_name_and_loads_from_it(tmp_path, embedded_tiny, capsys):
    data = write_instruction_data(tmp_path / "d.jsonl", n=8)
    cfg = make_config(embedded_tiny, data, tmp_path / "run", lora=True, max_steps=2, save_every=2)
    assert main(["train", str(write_config_yaml(cfg, tmp_path / "run.yaml"))]) == 0
    final = tmp_path / "run" / "final"
    for folder in (final, tmp_path / "run" / "checkpoints" / "step-00000002" / "adapter"):
        assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny-embedded"
    capsys.readouterr()
    assert main(["generate", "--adapter", str(final), "--prompt", "Add 1 and 2.", "--max-new-tokens", "2"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["prompt"] == "Add 1 and 2."
    assert main(["merge", "--adapter", str(final), "--out", str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "config.json").is_file()


def test_adapter_whose_recorded_base_is_gone_names_it(tmp_path, capsys):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tmp_path / "gone")}))
    assert main(["generate", "--adapter", str(adapter), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert f"--adapter {adapter}: its base model (pass --model): {tmp_path / 'gone'}: no such file or folder" in err
