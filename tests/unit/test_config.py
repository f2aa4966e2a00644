"""Config: every shipped recipe validates; bad values are errors naming the key; overrides are typed."""

from __future__ import annotations

from pathlib import Path

import pytest

from tuneforge.config import load_config, parse_overrides
from tuneforge.errors import ConfigError

RECIPES = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))


def test_there_are_recipes():
    assert len(RECIPES) >= 4


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_recipe_validates_and_documents_its_command(path):
    cfg = load_config(str(path))
    assert cfg.train.lr > 0
    header = path.read_text().splitlines()[:6]
    assert any(line.startswith("#") and "tuneforge " in line for line in header), "header must show the command"
    train = cfg.data.train if isinstance(cfg.data.train, list) else [cfg.data.train]
    assert all(Path(p).exists() for p in train), f"{path.name}: data path missing: {train}"


def test_overrides_are_typed_and_nested():
    assert parse_overrides(["train.lr=1e-4", "lora.enabled=true", "data.fields.output=answer"]) == {
        "train": {"lr": 1e-4}, "lora": {"enabled": True}, "data": {"fields": {"output": "answer"}}}
    cfg = load_config(None, ["lora.enabled=true", "train.micro_batch_size=2"])
    assert cfg.lora.enabled and cfg.train.micro_batch_size == 2


def test_method_defaults_for_learning_rate():
    assert load_config(None, ["lora.enabled=true"]).train.lr == 2e-4
    assert load_config(None, []).train.lr == 1e-5
    assert load_config(None, ["train.lr=0.5"]).train.lr == 0.5


@pytest.mark.parametrize("override,key", [("train.lrr=1", "train.lrr"), ("train.micro_batch_size=0",
                                          "train.micro_batch_size"), ("data.mask=some", "data.mask"),
                                          ("method=nope", "method")])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=f"key {key}"):
        load_config(None, [override])


def test_bad_yaml_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {lr: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(str(bad))
    bad.write_text("train:\n  epochs: -1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml, key train.epochs"):
        load_config(str(bad))


def test_a_method_section_for_another_method_is_an_error():
    import pytest

    from tuneforge.config.load import config_from_dict
    from tuneforge.errors import ConfigError
    with pytest.raises(ConfigError, match=r"dpo\.\* is set, but the dpo section is read by method dpo, not by "
                                          r"method sft") as info:
        config_from_dict({"method": "sft", "dpo": {"beta": 0.2}})
    assert "Value error" not in str(info.value)
    assert config_from_dict({"method": "sft", "dpo": {"beta": 0.1}}).dpo.beta == 0.1  # the default: a saved config


@pytest.mark.parametrize("override,message", [
    ("contrastive.temprature=0.1", r"key contrastive.temprature: unknown key \(did you mean contrastive.temperature\?\); "
                                   r"contrastive takes: pooling, normalize, temperature"),
    ("tarin.lr=0.1", r"key tarin: unknown key \(did you mean train\?\); the top level takes: method, model"),
    ("train.zzz=1", r"key train.zzz: unknown key; train takes: output_dir, seed"),
])
def test_an_unknown_key_names_its_nearest_known_key_and_its_section(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_an_override_error_names_the_command_line_and_a_file_error_the_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  epocs: 2\n")
    with pytest.raises(ConfigError, match=r"run.yaml, key train.epocs: unknown key \(did you mean train.epochs\?\)"):
        load_config(str(path), ["train.lr=1e-4"])
    path.write_text("train:\n  epochs: 2\n")
    with pytest.raises(ConfigError, match=r"command line, key tarin: unknown key") as err:
        load_config(str(path), ["tarin.lr=1e-4"])
    assert "run.yaml" not in str(err.value)
