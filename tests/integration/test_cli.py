"""The command line: clear errors with file and line, data inspect, generate with an adapter, merge."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
from transformers import AutoModelForCausalLM

from helpers.runs import write_instruction_data
from tuneforge.cli import main


def _config(tmp_path, model_dir, train, extra=""):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"method: sft\nmodel: {{name: {model_dir}}}\ndata: {{train: {train}}}\n"
                   f"lora: {{enabled: true, r: 4, alpha: 8}}\n"
                   f"train: {{output_dir: {tmp_path / 'out'}, max_steps: 4, micro_batch_size: 4, lr: 0.003, "
                   f"progress: false, tensorboard: false}}\n{extra}")
    return str(cfg)


def test_malformed_jsonl_line_reported_with_line_number(tmp_path, tiny_model_dir, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": "d"}\n{"instruction": \n')
    assert main(["train", _config(tmp_path, tiny_model_dir, bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl, line 3" in err and "Traceback" not in err


def test_data_inspect_marks_supervised_tokens(tmp_path, tiny_model_dir, capsys):
    data = write_instruction_data(tmp_path / "d.jsonl", n=4)
    assert main(["data", "inspect", _config(tmp_path, tiny_model_dir, data), "-n", "1", "--no-color"]) == 0
    out = capsys.readouterr().out
    assert "[[The sum is" in out and "<|im_end|>]]" in out
    assert '"supervised_share"' in out


def test_data_inspect_shows_each_sequence_of_a_preference_example(tmp_path, tiny_model_dir, capsys):
    from helpers.runs import write_preference_data
    data = write_preference_data(tmp_path / "p.jsonl", n=4)
    cfg = tmp_path / "dpo.yaml"
    cfg.write_text(f"method: dpo\nmodel: {{name: {tiny_model_dir}}}\ndata: {{train: {data}}}\n"
                   f"lora: {{enabled: true}}\ntrain: {{output_dir: {tmp_path / 'out'}}}\n")
    assert main(["data", "inspect", str(cfg), "-n", "1", "--no-color"]) == 0
    out = capsys.readouterr().out
    assert "--- example 0 chosen (" in out and "--- example 0 rejected (" in out
    assert out.count("<|im_end|>]]") == 2  # each answer supervised with its end-of-turn token


def test_train_generate_and_merge(tmp_path, tiny_model_dir, capsys):
    data = write_instruction_data(tmp_path / "d.jsonl")
    assert main(["train", _config(tmp_path, tiny_model_dir, data)]) == 0
    capsys.readouterr()
    assert main(["generate", "--run", str(tmp_path / "out"), "--prompt", "Add 1 and 2.",
                 "--max-new-tokens", "4"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["prompt"] == "Add 1 and 2." and isinstance(line["output"], str)
    merged = tmp_path / "merged"
    assert main(["merge", "--model", str(tiny_model_dir), "--adapter", str(tmp_path / "out" / "final"),
                 "--out", str(merged)]) == 0
    model = AutoModelForCausalLM.from_pretrained(str(merged))
    from peft import PeftModel
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)),
                                    str(tmp_path / "out" / "final"))
    ids = torch.tensor([[3, 8, 20, 7]])
    torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-5)
    assert (merged / "tokenizer_config.json").exists() or (merged / "tokenizer.json").exists()


def test_eval_stdout_is_the_json_alone(tmp_path, tiny_model_dir):
    """`tuneforge eval cfg | jq` works: the human lines (task accuracy) go to stderr."""
    data = write_instruction_data(tmp_path / "d.jsonl", n=8)
    held_out = write_instruction_data(tmp_path / "held_out.jsonl", n=3, seed=1)
    cfg = _config(tmp_path, tiny_model_dir, data, "eval: {generate: true, max_new_tokens: 4}\n")
    r = subprocess.run([sys.executable, "-m", "tuneforge", "eval", cfg, f"data.eval={held_out}"],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(r.stdout)
    assert set(result) == {"loss", "general", "task"} and result["task"]["n"] == 3
    assert "[model] held-out task accuracy" in r.stderr
