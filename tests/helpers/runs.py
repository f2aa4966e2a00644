"""Small data sets and configs for end-to-end tests on the tiny model."""

from __future__ import annotations

import json
import random
from pathlib import Path

from tuneforge.config.load import config_from_dict


def write_instruction_data(path: Path, n: int = 48, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            f.write(json.dumps({"instruction": f"Add {a} and {b}.", "output": f"The sum is {a + b}."}) + "\n")
    return path


def write_chat_data(path: Path, n: int = 32, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            a = rng.randint(0, 9)
            msgs = [{"role": "user", "content": f"Say {a}."}, {"role": "assistant", "content": f"{a}"},
                    {"role": "user", "content": "Again?"}, {"role": "assistant", "content": f"Yes: {a}."}]
            f.write(json.dumps({"messages": msgs}) + "\n")
    return path


def write_text_data(folder: Path, docs: int = 12, seed: int = 0) -> Path:
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    words = "the quick brown fox jumps over lazy dog and then runs away".split()
    for i in range(docs):
        (folder / f"doc{i:02d}.txt").write_text(" ".join(rng.choice(words) for _ in range(60)) + "\n")
    return folder


def make_config(model_dir, train, out, method="sft", lora=False, lora_dropout=0.0, **train_kw):
    train_section = {"output_dir": str(out), "max_steps": 8, "micro_batch_size": 4, "lr": 3e-3,
                     "progress": False, "tensorboard": False, "warmup_ratio": 0.0,
                     "autocast": "none", **train_kw}  # float32 on every machine: exact invariants
    data = {"train": str(train), "max_length": 64 if method == "clm" else 256}
    return config_from_dict({
        "method": method, "model": {"name": str(model_dir)}, "data": data,
        "lora": {"enabled": lora, "r": 4, "alpha": 8, "dropout": lora_dropout},
        "train": train_section, "eval": {"loss": False},
    })


def write_config_yaml(cfg, path: Path) -> Path:
    """A RunConfig as a YAML file, for tests that go through the command line."""
    import yaml
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    return path
