"""method: reward end to end on the tiny model: training, held-out metrics, the saved sequence-classifier folder
(loadable by transformers, same scores as tuneforge, right padding with pad == end-of-turn) and `tuneforge score`."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from helpers.runs import method_config, read_metrics, write_preference_data
from tuneforge.data.collate import collate
from tuneforge.eval.reward import encode_answer, score
from tuneforge.models.reward import HEAD, rewards_at, save_reward_model
from tuneforge.objectives.functional import forward
from tuneforge.run import _build_module, load_model_and_tokenizer, make_objective, prepare, train
from tuneforge.train.loop import fit

# the tiny ChatML template without the newline after <|im_end|>: every answer then ENDS with the end-of-turn id,
# which is the pad id, the case where finding the last token by pad id goes wrong
NO_NEWLINE_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_reward_training_end_to_end(tiny_model_dir, tmp_path):
    cfg = method_config("reward", tiny_model_dir, tmp_path / "data", tmp_path / "run", max_steps=16)
    cfg.data.eval_fraction, cfg.eval.loss, cfg.train.eval_every = 0.25, True, 8
    res = train(cfg)
    rows = read_metrics(tmp_path / "run")
    losses = [r["loss"] for r in rows if r["split"] == "train"]
    assert len(losses) == 16 and sum(losses[-4:]) / 4 < losses[0]
    assert losses[0] == pytest.approx(0.693, abs=0.02)  # small head init: rewards near 0, loss near log 2
    evals = [r for r in rows if r["split"] == "eval"]
    assert len(evals) == 2  # step 8 and the final one
    for metrics in (res["eval_before"], res["train"]["eval"], evals[0]):
        assert {"loss", "accuracy", "reward_margin", "reward_chosen", "reward_rejected"} <= set(metrics)
        assert 0.0 <= metrics["accuracy"] <= 1.0
        assert "perplexity" not in metrics  # the unit is pairs, not tokens
    assert res["train"]["eval"]["loss"] < res["eval_before"]["loss"]
    assert res["train"]["eval"]["reward_margin"] > res["eval_before"]["reward_margin"]
    final = tmp_path / "run" / "final"
    assert (final / "config.json").is_file() and not (final / "adapter").exists()
    assert json.loads((final / "config.json").read_text())["architectures"] == ["LlamaForSequenceClassification"]
    card = (final / "README.md").read_text()
    assert "AutoModelForSequenceClassification" in card and "tuneforge score" in card and "generate" not in card


def test_reward_config_section_and_defaults():
    from tuneforge.config.load import config_from_dict
    from tuneforge.errors import ConfigError
    assert config_from_dict({"method": "reward"}).train.lr == 1e-5
    cfg = config_from_dict({"method": "reward", "lora": {"enabled": True}, "reward": {"center_coef": 0.01}})
    assert cfg.train.lr == 1e-4 and cfg.count_unit == "pairs" and cfg.reward.center_coef == 0.01
    with pytest.raises((ConfigError, ValueError), match="read by method reward"):
        config_from_dict({"method": "sft", "reward": {"center_coef": 0.01}})


def test_lora_trains_adapter_and_head_and_freezes_the_base(tiny_model_dir, tmp_path):
    cfg = method_config("reward", tiny_model_dir, tmp_path / "data", tmp_path / "run", max_steps=4, lora=True)
    model, tok = load_model_and_tokenizer(cfg)
    module = _build_module(cfg, model)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n == f"heads.{HEAD}.weight" for n in trainable)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    fit(module, make_objective(cfg), prepare(cfg, tok).train, lambda b: collate(b, tok.pad_token_id), cfg.train)
    after = dict(module.named_parameters())
    assert not torch.equal(after[f"heads.{HEAD}.weight"], before[f"heads.{HEAD}.weight"])
    assert any(not torch.equal(after[n], before[n]) for n in trainable if "lora_B" in n)
    for name in set(before) - trainable:
        assert torch.equal(after[name], before[name]), name


def test_full_fine_tuning_leaves_the_lm_head_out(tiny_model_dir, tmp_path):
    cfg = method_config("reward", tiny_model_dir, tmp_path / "data", tmp_path / "run")
    model, _ = load_model_and_tokenizer(cfg)
    module = _build_module(cfg, model)
    assert not module.output_head.weight.requires_grad  # untied here: not part of a reward model
    assert module.heads[HEAD].weight.requires_grad and module.heads[HEAD].weight.dtype == torch.float32
    assert module.base.get_input_embeddings().weight.requires_grad


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_saved_folder_scores_like_tuneforge(lora, tiny_model_dir, tmp_path):
    """AutoModelForSequenceClassification on final/, its tokenizer right-padding a batch, gives the rewards
    tuneforge computes, although every answer ends with the end-of-turn id == the training pad id."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    data = write_preference_data(tmp_path / "pref.jsonl", n=12)
    cfg = method_config("reward", tiny_model_dir, tmp_path / "data", tmp_path / "run", max_steps=3, lora=lora)
    cfg.data.train, cfg.data.chat_template, cfg.data.system_prompt = str(data), NO_NEWLINE_TEMPLATE, "Be exact."
    model, tok = load_model_and_tokenizer(cfg)
    module = _build_module(cfg, model)
    examples = prepare(cfg, tok).train
    fit(module, make_objective(cfg), examples, lambda b: collate(b, tok.pad_token_id), cfg.train)
    folder = tmp_path / "final"
    save_reward_model(module, tok, folder, system_prompt=cfg.data.system_prompt)

    records = [json.loads(line) for line in data.read_text().splitlines()][:4]
    prompts = [r["prompt"] for r in records for _ in (0, 1)]
    answers = [r[k] for r in records for k in ("chosen", "rejected")]
    ids = [encode_answer(tok, p, a, cfg.data.system_prompt) for p, a in zip(prompts, answers)]
    assert ids[:2] == [examples[0]["chosen"].input_ids, examples[0]["rejected"].input_ids]  # rendered as trained
    assert all(row[-1] == tok.pad_token_id for row in ids) and len({len(r) for r in ids}) > 1  # the trap
    module.eval()
    with torch.no_grad():
        batch = collate(examples[:4], tok.pad_token_id)
        ours = forward(module, batch, lambda h, tm: rewards_at(h, batch["last_index"], tm.heads[HEAD]))

    saved_tok = AutoTokenizer.from_pretrained(folder)
    assert saved_tok.pad_token_id != tok.pad_token_id and saved_tok.padding_side == "right"
    classifier = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1).eval()
    padded = saved_tok.pad({"input_ids": ids}, padding=True, return_tensors="pt")
    assert (padded["input_ids"][:, -1] == saved_tok.pad_token_id).any()  # right padding really happened
    with torch.no_grad():
        theirs = classifier(**padded).logits.squeeze(-1)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.tensor(score(folder, prompts, answers)), ours, rtol=1e-5, atol=1e-5)
    if lora:  # the adapter and the head stay switchable on the base
        adapter = folder / "adapter"
        assert (adapter / "adapter_config.json").is_file()
        torch.testing.assert_close(load_file(str(adapter / "reward_head.safetensors"))["weight"],
                                   module.heads[HEAD].weight.detach())


def test_score_command(tiny_model_dir, tmp_path, capsys):
    from tuneforge.cli import main
    cfg = method_config("reward", tiny_model_dir, tmp_path / "data", tmp_path / "run", max_steps=2)
    train(cfg)
    final = tmp_path / "run" / "final"
    capsys.readouterr()
    assert main(["score", "--model", str(final), "--prompt", "Add 2 and 3.", "--response", "5"]) == 0
    one = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(one) == 1 and one[0]["reward"] == pytest.approx(score(final, ["Add 2 and 3."], ["5"])[0], abs=1e-6)
    data = tmp_path / "score.jsonl"
    data.write_text(json.dumps({"prompt": "Add 2 and 3.", "chosen": "5", "rejected": "6"}) + "\n"
                    + json.dumps({"prompt": "Add 1 and 1.", "response": "2"}) + "\n")
    assert main(["score", "--model", str(tmp_path / "run"), "--data", str(data)]) == 0  # a run folder works too
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rows[0]["reward_chosen"] == pytest.approx(one[0]["reward"], abs=1e-6)
    assert rows[0]["reward_rejected"] == pytest.approx(score(final, ["Add 2 and 3."], ["6"])[0], abs=1e-6)
    assert set(rows[1]) == {"prompt", "response", "reward"}
    data.write_text(json.dumps({"prompt": "Add 2 and 3.", "chosen": 5}) + "\n")
    assert main(["score", "--model", str(final), "--data", str(data)]) == 2
    assert f"{data}, line 1, field 'chosen'" in capsys.readouterr().err
    assert main(["score", "--model", str(final), "--prompt", "only a prompt"]) == 2


@pytest.mark.parametrize("lora", [False, True])
def test_eval_command_scores_the_saved_reward_model(tiny_model_dir, tmp_path, capsys, lora):
    """`tuneforge eval CFG --model RUN/final` gives the held-out metrics training's final evaluation gave (the
    saved classifier on the same held-out pairs); without --model it says what to pass."""
    from tuneforge.cli import main
    cfg = method_config("reward", tiny_model_dir, tmp_path / "data", tmp_path / "run", max_steps=6, lora=lora)
    cfg.data.eval_fraction, cfg.eval.loss = 0.25, True
    res = train(cfg)
    config = tmp_path / "run" / "config.yaml"
    capsys.readouterr()
    assert main(["eval", str(config), "--model", str(tmp_path / "run" / "final")]) == 0
    got = json.loads(capsys.readouterr().out)["loss"]
    want = res["train"]["eval"]
    assert got["pairs"] > 0
    for key in ("loss", "accuracy", "reward_margin", "reward_chosen", "reward_rejected"):
        assert got[key] == pytest.approx(want[key], abs=2e-5), key
    assert main(["eval", str(config)]) == 2
    assert "--model RUN_DIR/final" in capsys.readouterr().err
