"""report.html: written by every run, rebuilt and compared by `tuneforge report`, self-contained, and drawn
in headless Chromium with no console message."""

from __future__ import annotations

import json
import re

import pytest

from helpers.browser import render, screenshot
from helpers.runs import write_instruction_data
from tuneforge.cli import main
from tuneforge.report import curves, load_run, write_report

INJECTION = "</script><script>document.title='pwned'</script><b>bold?</b>"


def _train(tmp_path, tiny_model_dir, name="run", lr=0.003):
    train = write_instruction_data(tmp_path / "train.jsonl", n=16)
    held_out = write_instruction_data(tmp_path / "held_out.jsonl", n=4, seed=1)
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(f"method: sft\nmodel: {{name: {tiny_model_dir}}}\n"
                   f"data: {{train: {train}, eval: {held_out}, cache_dir: {tmp_path / 'cache'}}}\n"
                   f"lora: {{enabled: true, r: 4, alpha: 8}}\n"
                   f"train: {{output_dir: {tmp_path / name}, max_steps: 6, micro_batch_size: 4, lr: {lr}, "
                   f"eval_every: 2, progress: false, tensorboard: false}}\n"
                   f"eval: {{generate: true, max_new_tokens: 6, general_tokens: 512}}\n")
    assert main(["train", str(cfg)]) == 0
    return tmp_path / name


def _charts(dom: str) -> tuple[int, int, int]:
    rendered = int(re.search(r'data-charts-rendered="(\d+)"', dom).group(1))
    expected = int(re.search(r'data-charts-expected="(\d+)"', dom).group(1))
    return rendered, expected, dom.count("<polyline")


def test_every_run_writes_a_report_that_chromium_draws(tmp_path, tiny_model_dir):
    run = _train(tmp_path, tiny_model_dir)
    page = run / "report.html"
    text = page.read_text(encoding="utf-8")
    # self-contained: no script, style, image or link fetched from anywhere
    assert not re.search(r'(src|href)\s*=\s*["\']?(https?:)?//', text)
    assert "<link" not in text and "@import" not in text
    for part in ("Base against tuned", "general-text perplexity", "task accuracy, exact", "Answers before and after",
                 "Resolved config", "Environment", "Data", "held-out loss"):
        assert part in text, part
    titles = [c["title"] for c in curves([load_run(run)])]
    for title in ("training loss", "learning rate", "gradient norm (before clipping)",
                  "throughput, real tokens per second", "held-out loss", "held-out perplexity"):
        assert title in titles, title
    dom, console = render(page)
    rendered, expected, lines = _charts(dom)
    assert rendered == expected == len(titles) > 5 and lines >= rendered
    assert console == []


def test_console_errors_are_seen(tmp_path):
    """The check above can fail: a page whose script throws shows up in the console lines."""
    page = tmp_path / "bad.html"
    page.write_text("<html><body><script>console.log('hello'); notAFunction();</script></body></html>")
    _, console = render(page)
    assert any("notAFunction" in line for line in console) and any("hello" in line for line in console)


def test_texts_from_the_run_stay_text(tmp_path):
    run = tmp_path / "handmade"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"step": 1, "split": "train", "loss": 2.0, "lr": 1e-3, "grad_norm": 1.5, "tokens_per_s": 100.0},
        {"step": 2, "split": "train", "loss": 1.0, "lr": 5e-4, "grad_norm": float("nan"), "tokens_per_s": 110.0},
        {"step": 2, "split": "eval", "loss": 1.5, "perplexity": 4.48}]) + '{"step": 3, "spl')  # a cut last line
    (run / "eval_diff.jsonl").write_text(json.dumps(
        {"index": 0, "change": "improved", "prompt": INJECTION, "reference": "a & b", "base": "<i>x</i>",
         "tuned": "a & b"}) + "\n")
    (run / "results.json").write_text(json.dumps({"eval_before": {"loss": 3.0}, "train": {"eval": {"loss": 1.5}},
                                                  "final_dir": str(run / "final")}))
    (run / "config.yaml").write_text(f"method: sft\nnote: '{INJECTION}'\n")
    page = write_report([run])
    dom, console = render(page)
    rendered, expected, _ = _charts(dom)
    assert rendered == expected == 6 and console == []  # loss, lr, grad norm (one finite point), throughput, 2 held-out
    assert "pwned" not in dom.split("</title>")[0] and "<b>bold?</b>" not in dom
    assert "&lt;/script&gt;&lt;script&gt;" in dom


def test_report_compares_runs_on_one_page(tmp_path, tiny_model_dir, capsys):
    a = _train(tmp_path, tiny_model_dir, "fast", lr=0.003)
    b = _train(tmp_path, tiny_model_dir, "slow", lr=0.0003)
    out = tmp_path / "compare.html"
    capsys.readouterr()
    assert main(["report", str(a), str(b), "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    spec = curves([load_run(a), load_run(b)])
    loss = next(c for c in spec if c["id"] == "train-loss")
    assert [s["name"] for s in loss["series"]] == ["fast", "slow"] and loss["series"][0]["points"] != loss["series"][1]["points"]
    dom, console = render(out)
    rendered, expected, lines = _charts(dom)
    assert rendered == expected and lines >= 2 * rendered and console == []
    assert dom.count('<section class="run">') == 2
    png = screenshot(out, tmp_path / "compare.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000


def test_report_errors(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "no such run folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(Exception, match="not a training output folder"):
        write_report([tmp_path / "empty"])
