"""final/README.md is a real model card, not PEFT's blank template: base model, method, LoRA settings or full,
data files and counts, held-out numbers before and after, the command that reproduces the run, the version."""

from __future__ import annotations

import tuneforge
from helpers.runs import make_config, write_config_yaml, write_instruction_data, write_text_data
from tuneforge.cli import main


def test_lora_run_card(tmp_path, tiny_model_dir, capsys):
    data = write_instruction_data(tmp_path / "d.jsonl", n=16)
    held_out = write_instruction_data(tmp_path / "held_out.jsonl", n=4, seed=1)
    cfg = write_config_yaml(make_config(tiny_model_dir, data, tmp_path / "run", lora=True, max_steps=2),
                            tmp_path / "run.yaml")
    argv = ["train", str(cfg), f"data.eval={held_out}", "eval.loss=true", "eval.generate=true",
            "eval.max_new_tokens=4"]
    assert main(argv) == 0
    capsys.readouterr()
    card = (tmp_path / "run" / "final" / "README.md").read_text()
    assert "More Information Needed" not in card
    assert f"| base model | `{tiny_model_dir}` |" in card
    assert "`sft`: supervised fine-tuning" in card and "LoRA adapter (PEFT format)" in card
    assert "| LoRA | r=4, alpha=8, dropout=0, target modules: all-linear |" in card
    assert f"train `{data}`: 16 examples" in card and f"held-out `{held_out}`: 4 examples" in card
    assert "max_steps 2 (ran 2 steps, final train loss" in card
    assert "| held-out loss | - | " in card  # measured after training only
    [exact] = [line for line in card.splitlines() if line.startswith("| task accuracy, exact |")]
    assert exact.count("%") == 2  # base and tuned
    assert f"tuneforge train {cfg} data.eval={held_out} eval.loss=true eval.generate=true" in card
    assert f"| tuneforge | {tuneforge.__version__} |" in card and "PeftModel.from_pretrained" in card


def test_full_run_card(tmp_path, tiny_model_dir, capsys):
    texts = write_text_data(tmp_path / "texts", docs=6)
    cfg = write_config_yaml(make_config(tiny_model_dir, texts, tmp_path / "full", method="clm", max_steps=2),
                            tmp_path / "full.yaml")
    assert main(["train", str(cfg)]) == 0
    capsys.readouterr()
    card = (tmp_path / "full" / "final" / "README.md").read_text()
    assert "`clm`: continued pre-training" in card and "full fine-tuning (every parameter)" in card
    assert "| LoRA |" not in card and "Held-out results" not in card  # no held-out set: nothing made up
    assert f"train `{texts}`: " in card and "AutoModelForCausalLM.from_pretrained" in card
    assert f"tuneforge train {cfg}\n" in card
