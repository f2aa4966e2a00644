"""DPO through the loop on the tiny model: ln 2 at step 0, the reference check, learning the preference."""

from __future__ import annotations

import math

import pytest
import torch

from helpers.runs import load_for_method, method_config
from tuneforge.errors import TuneforgeError
from tuneforge.run import make_objective, prepare, train
from tuneforge.train.loop import fit


def _config(tiny_model_dir, tmp_path, **kw):
    return method_config("dpo", tiny_model_dir, tmp_path / "data", tmp_path / "run", **kw)


def _collate(tok):
    from tuneforge.data.collate import collate
    return lambda b: collate(b, tok.pad_token_id)


def test_loss_is_ln2_at_step_0_with_lora(tiny_model_dir, tmp_path):
    cfg = _config(tiny_model_dir, tmp_path, max_steps=1)
    model, tok = load_for_method("dpo", tiny_model_dir)
    res = fit(model, make_objective(cfg), prepare(cfg, tok).train, _collate(tok), cfg.train)
    row = res.history[0]
    assert row["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert row["rewards/margin"] == pytest.approx(0.0, abs=1e-6) and row["count"] == 4  # 4 pairs


def test_a_wrong_reference_stops_the_run_before_training(tiny_model_dir, tmp_path):
    """An adapter that is not zero at the start (as if a trained adapter were loaded as the policy) makes the
    reference differ from the policy: refused at the first batch, nothing trained."""
    cfg = _config(tiny_model_dir, tmp_path, max_steps=2)
    model, tok = load_for_method("dpo", tiny_model_dir)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    before = {n: p.clone() for n, p in model.named_parameters() if p.requires_grad}
    with pytest.raises(TuneforgeError, match="reference check at step 0"):
        fit(model, make_objective(cfg), prepare(cfg, tok).train, _collate(tok), cfg.train)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)


def test_a_reference_variant_without_any_reference_says_what_to_do(tiny_model_dir, tmp_path):
    """Driving the objective on a full model without the run's precomputed reference: a clear error."""
    cfg = _config(tiny_model_dir, tmp_path, max_steps=1, lora=False)
    from tuneforge.models.load import load_causal_lm
    model, tok = load_causal_lm(str(tiny_model_dir))
    with pytest.raises(TuneforgeError, match="lora.enabled=true.*precomputes"):
        fit(model, make_objective(cfg), prepare(cfg, tok).train, _collate(tok), cfg.train)


def test_dpo_learns_the_preference_on_held_out_pairs(tiny_model_dir, tmp_path):
    """A preference a 2-layer random model can pick up (a random one cannot learn sums): answers opening with
    "Yes" are preferred to answers opening with "No"."""
    import json
    import random
    rng, path = random.Random(1), tmp_path / "yes_no.jsonl"
    with open(path, "w") as f:
        for _ in range(48):
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            f.write(json.dumps({"prompt": f"Add {a} and {b}.", "chosen": f"Yes, {a + b}.",
                                "rejected": f"No, {a + b}."}) + "\n")
    from helpers.runs import make_config
    cfg = make_config(tiny_model_dir, path, tmp_path / "run", method="dpo", lora=True, max_steps=12, lr=1e-2)
    cfg.data.eval_fraction, cfg.eval.loss, cfg.dpo.beta = 0.25, True, 0.5
    res = train(cfg)
    before, after = res["eval_before"], res["train"]["eval"]
    assert before["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert after["loss"] < before["loss"]
    assert after["rewards/accuracy"] > 0.5 and after["rewards/margin"] > 0


@pytest.mark.parametrize("variant", ["simpo", "orpo"])
def test_reference_free_variants_train_without_lora(variant, tiny_model_dir, tmp_path):
    cfg = _config(tiny_model_dir, tmp_path, max_steps=3, lora=False)
    cfg.dpo.loss = variant
    res = train(cfg)
    assert res["train"]["steps"] == 3 and math.isfinite(res["train"]["final_loss"])


def test_full_fine_tuning_precomputes_the_reference(tiny_model_dir, tmp_path):
    """No second model: the reference log-probs are computed once before the first update, kept in the run
    folder, and carried by the batches; loss ln 2 at step 0; a resume reads the same reference and ends
    bit-identical to an uninterrupted run."""
    from safetensors.torch import load_file
    kw = dict(max_steps=4, lora=False, save_every=2, lr=1e-3)
    straight = _config(tiny_model_dir, tmp_path, **kw)
    straight.data.eval_fraction, straight.eval.loss = 0.25, True
    res = train(straight)
    assert res["eval_before"]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    ref = load_file(str(tmp_path / "run" / "reference_logps.safetensors"))
    assert ref["train"].shape[1] == 2 and ref["eval"].shape[0] == res["eval_before"]["count"]
    from helpers.runs import read_metrics
    rows = [r for r in read_metrics(tmp_path / "run") if r["split"] == "train"]
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert rows[-1]["loss"] < rows[0]["loss"] and rows[-1]["rewards/margin"] > 0  # it learns its training pairs

    # interrupted after step 2 (checkpoint), resumed: the same final weights
    import shutil
    resumed_dir = tmp_path / "resumed"
    cfg = method_config("dpo", tiny_model_dir, tmp_path / "data", resumed_dir, **{**kw, "max_steps": 4})
    cfg.data.eval_fraction, cfg.eval.loss = 0.25, True
    train(cfg)
    shutil.rmtree(resumed_dir / "final")
    (resumed_dir / "results.json").unlink()
    shutil.rmtree(resumed_dir / "checkpoints" / "step-00000004")
    again = train(cfg, resume=True)
    assert again["train"]["resumed_from"] == 2
    a = load_file(str(tmp_path / "run" / "final" / "model.safetensors"))
    b = load_file(str(resumed_dir / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_nll_coef_adds_the_chosen_answers_mean_token_nll(tiny_model_dir, tmp_path):
    """RPO: loss = DPO loss + nll_coef x (-log p(chosen) / chosen tokens), per pair, averaged over pairs; the
    DPO terms and metrics are unchanged."""
    from tuneforge.data.collate import collate
    from tuneforge.models.heads import as_train_module
    from tuneforge.objectives.functional import pair_index, sequence_logps
    cfg = _config(tiny_model_dir, tmp_path)
    model, tok = load_for_method("dpo", tiny_model_dir)
    model = as_train_module(model)
    batch = collate(prepare(cfg, tok).train[:4], tok.pad_token_id)
    plain = make_objective(cfg)
    cfg.dpo.nll_coef = 0.5
    rpo = make_objective(cfg)
    with torch.no_grad():
        a, b = plain.loss(model, batch), rpo.loss(model, batch)
        logps, counts = sequence_logps(model, batch)
        chosen, _ = pair_index(batch)
        nll = (-logps[chosen] / counts[chosen]).sum()
    assert float(b.loss_sum) == pytest.approx(float(a.loss_sum) + 0.5 * float(nll), rel=1e-6)
    assert b.metrics["nll/chosen"][0] == pytest.approx(float(nll), rel=1e-6)
    assert b.metrics["rewards/margin"] == a.metrics["rewards/margin"]
