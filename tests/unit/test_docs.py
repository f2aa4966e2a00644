"""The docs name things as the code names them: a user who copies a path from the README finds it on disk."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from tuneforge.train import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[2]


def test_readme_names_checkpoint_folders_as_they_are_written(tmp_path):
    weight = torch.nn.Parameter(torch.zeros(2))
    written = ckpt.save_checkpoint(tmp_path, 2, {"w": weight}, torch.optim.AdamW([weight]), {}).name
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    named = re.findall(r"checkpoints/(step-[^/`\s]*)", text)
    assert named, "README.md should say where checkpoints go"
    for name in named:
        assert re.fullmatch(r"step-\d{8}", name), f"README.md names a checkpoint {name!r}; it is {written!r}"
    assert written in text  # the example shown is the folder step 2 really writes
