"""bench/contrastive_run.py's own pieces: the one held-out evaluation both sides get, the step summary, the
ratio and flatness lines, and both children run for a step on a few pairs (so the harness cannot rot)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))  # the script imports its neighbours common.py and run.py
    import contrastive_run
    yield contrastive_run
    for name in ("contrastive_run", "common", "run"):
        sys.modules.pop(name, None)


def test_held_out_retrieval_ranks_the_deduplicated_positives(bench):
    vectors = {"q0": [1.0, 0.0], "q1": [0.0, 1.0], "q2": [1.0, 0.1], "d0": [0.9, 0.1], "d1": [0.1, 0.9]}
    pairs = [{"anchor": "q0", "positive": "d0"}, {"anchor": "q1", "positive": "d1"},
             {"anchor": "q2", "positive": "d1"}]  # q2 is closest to d0 but its positive is d1: rank 2
    seen = []

    def encode(texts):
        seen.append(list(texts))
        return torch.tensor([vectors[t] for t in texts])

    out = bench.held_out_retrieval(encode, pairs)
    assert seen[1] == ["d0", "d1"]  # the corpus: d1 once
    assert out["recall@1"] == pytest.approx(2 / 3) and out["mrr@10"] == pytest.approx((1 + 1 + 0.5) / 3)


def test_summary_times_only_the_steps_after_warm_up(bench):
    res = {"starts": [0.0, 10.0, 12.0, 14.0], "end": 16.0, "pairs": [8, 8, 8, 8], "train_peak_kb": 2**20}
    s = bench.summary(res, warmup=1)
    assert s["timed_steps"] == 3 and s["seconds"] == 6.0 and s["pairs_s"] == 4.0 and s["peak_rss_gb"] == 1.0
    with pytest.raises(SystemExit):
        bench.summary(res, warmup=4)


def test_ratio_and_flatness_lines(bench):
    rows = [{"side": "tf", "batch": 64, "pairs_s": 30.0, "peak_rss_gb": 1.0},
            {"side": "st", "batch": 64, "pairs_s": 10.0, "peak_rss_gb": 1.25},
            {"side": "tf-cached", "batch": 64, "pairs_s": 10.0, "peak_rss_gb": 1.0},
            {"side": "tf-cached", "batch": 1024, "pairs_s": 10.0, "peak_rss_gb": 1.3},
            {"side": "st-cached", "batch": 64, "error": "exit 1"}]
    assert bench.ratios(rows) == ["- tf / st, batch 64: throughput 3.00x, peak RSS 0.80x (target >= 1.5x at <= 1x: "
                                  "MET)"]
    [line] = bench.flatness(rows)
    assert "+30.0%" in line and "not met" in line


@pytest.mark.parametrize("side", ["tf-cached", "st"])
def test_a_child_trains_a_step_and_evaluates(bench, tmp_path, side):
    rows = [{"anchor": f"What does function number {i} compute?", "positive": f"It returns {i} squared."}
            for i in range(12)]
    for name, part in (("train.jsonl", rows[:8]), ("eval.jsonl", rows[8:])):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in part))
    spec = {"side": side, "train": str(tmp_path / "train.jsonl"), "eval": str(tmp_path / "eval.jsonl"),
            "workdir": str(tmp_path / "work"), "threads": 1, "batch": 4, "mini": 2, "max_length": 32, "lr": 1e-5,
            "steps": 1, "warmup": 1, "evaluate": True}
    res = bench.child(spec)
    assert len(res["starts"]) == 2 and res["pairs"] == [4, 4] and res["train_peak_kb"] > 0
    assert 0.0 <= res["retrieval"]["recall@1"] <= 1.0 and res["retrieval"]["queries"] == 4
