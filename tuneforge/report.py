"""report.html: one self-contained page per run (and `tuneforge report RUN [RUN ...]` to compare runs).

Everything the run folder records, on a page that opens with no network: curves of the training rows of
metrics.jsonl (loss, learning rate, gradient norm, throughput, and every other number the method logs) and of
every held-out metric, the base-against-tuned tables (held-out loss, task accuracy, the answer-by-answer
comparison, forgetting), samples of answers before and after (eval_diff.jsonl), the resolved config, the data
statistics and the environment. Charts are drawn in the browser by the small script below from the numbers
embedded in the page as JSON (no library, no request): several runs on one page share each chart, one line a
run. The script marks the page with data-charts-rendered="N" once it has drawn N charts (what the headless
browser test reads), and every text from the run is escaped: a prompt holding "</script>" stays text.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

from tuneforge.errors import TuneforgeError
from tuneforge.fsutil import atomic_write_text

REPORT = "report.html"
SAMPLES = 12  # answers shown per run, regressed and improved first
# training-row keys that are bookkeeping, not curves
NOT_CURVES = {"step", "split", "time", "count", "tokens", "skipped", "raw_loss", "raw_grad_norm", "bad_steps",
              "time/prepare_share", "time/update_share", "time/generation_share"}
FIRST = ("loss", "lr", "grad_norm", "tokens_per_s")
TITLES = {"loss": "training loss", "lr": "learning rate", "grad_norm": "gradient norm (before clipping)",
          "tokens_per_s": "throughput, real tokens per second", "time/batch_seconds": "seconds per batch"}


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill mid-write: the rows before it still count
                continue
    return rows


def load_run(run_dir: str | Path) -> dict:
    """What a run folder holds, for the report: name, results, metric rows, diff rows, config text."""
    run = Path(run_dir)
    if not run.is_dir():
        raise TuneforgeError(f"{run}: no such run folder")
    results_path = run / "results.json"
    results = json.loads(results_path.read_text(encoding="utf-8")) if results_path.is_file() else {}
    rows = _read_jsonl(run / "metrics.jsonl")
    config = (run / "config.yaml").read_text(encoding="utf-8") if (run / "config.yaml").is_file() else ""
    if not results and not rows and not config:
        raise TuneforgeError(f"{run}: not a training output folder (no results.json, metrics.jsonl or config.yaml)")
    return {"name": run.name, "path": str(run), "results": results, "rows": rows,
            "diff": _read_jsonl(run / "eval_diff.jsonl"), "config": config}


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def curves(runs: list[dict]) -> list[dict]:
    """Chart specs [{id, title, series: [{name, points: [[step, value]]}]}]: training rows' numbers first
    (FIRST in that order, then the rest by name), then held-out ones ("eval: ...")."""
    charts: dict[str, dict] = {}
    for split, prefix in (("train", ""), ("eval", "held-out ")):
        keys: list[str] = []
        for run in runs:
            for row in run["rows"]:
                if row.get("split") != split:
                    continue
                for key, value in row.items():
                    if key not in NOT_CURVES and _finite(value) and key not in keys:
                        keys.append(key)
        order = [k for k in FIRST if k in keys] + sorted(k for k in keys if k not in FIRST)
        if split == "eval":  # a number measured only before training still gets its curve
            for run in runs:
                for key, value in (run["results"].get("eval_before") or {}).items():
                    if key not in NOT_CURVES and _finite(value) and key not in order:
                        order.append(key)
        for key in order:
            series = []
            for run in runs:
                points = [[row["step"], row[key]] for row in run["rows"]
                          if row.get("split") == split and _finite(row.get(key)) and _finite(row.get("step"))]
                before = (run["results"].get("eval_before") or {}).get(key) if split == "eval" else None
                if _finite(before):  # the held-out numbers before training, at step 0
                    points.insert(0, [0, before])
                if points:
                    series.append({"name": run["name"], "points": points})
            if series:
                cid = f"{split}-{key}"
                name = TITLES.get(key, key.replace("_", " ")) if split == "train" else key.replace("_", " ")
                charts[cid] = {"id": cid, "title": prefix + name, "series": series}
    return list(charts.values())


def _fmt(value) -> str:
    if isinstance(value, bool) or value is None:
        return "-" if value is None else str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _table(head: list[str], rows: list[list], cls: str = "") -> str:
    if not rows:
        return ""
    out = [f'<table class="{cls}"><thead><tr>' + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr></thead><tbody>"]
    for row in rows:
        out.append("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in row) + "</tr>")
    return "".join(out) + "</tbody></table>"


def _pct(value) -> str:
    return f"{100 * value:.1f}%" if _finite(value) else "-"


def comparison_rows(run: dict) -> list[list]:
    """Base against tuned: [metric, base, tuned, change] for what the run measured."""
    r = run["results"]
    rows = []
    before, after = r.get("eval_before") or {}, ((r.get("train") or {}).get("eval") or {})
    for key in sorted(set(before) | set(after)):
        if key == "count" or not (_finite(before.get(key)) or _finite(after.get(key))):
            continue
        b, a = before.get(key), after.get(key)
        change = a - b if _finite(a) and _finite(b) else None
        rows.append([f"held-out {key}", b, a, change])
    forgot = r.get("forgetting") or {}
    if _finite(forgot.get("after")):
        change = forgot.get("change")
        rows.append([f"general-text perplexity (forgetting, {forgot.get('tokens')} tokens)", forgot.get("before"),
                     forgot["after"], f"{100 * change:+.1f}%" if _finite(change) else None])
    base, tuned = r.get("base") or {}, r.get("tuned") or {}
    for key in (tuned.get("metrics") or base.get("metrics") or {}):
        b, t = (base.get("metrics") or {}).get(key), (tuned.get("metrics") or {}).get(key)
        change = f"{100 * (t - b):+.1f} points" if _finite(b) and _finite(t) else None
        rows.append([f"task accuracy, {key} (n={tuned.get('n') or base.get('n')})", _pct(b), _pct(t), change])
    over = tuned.get("over_base") or {}
    if over:
        rows.append(["answers: improved / regressed / unchanged", "",
                     f"{over.get('improved', over.get('wins'))} / {over.get('regressed', over.get('losses'))} / "
                     f"{over.get('unchanged', over.get('ties'))}", f"win rate {_pct(over.get('win_rate'))}"])
    return rows


def samples(run: dict) -> list[dict]:
    """Answers before and after: the diff's rows, regressed and improved ones first."""
    order = {"regressed": 0, "improved": 1, "unchanged": 2}
    rows = sorted(run["diff"], key=lambda d: (order.get(d.get("change"), 3), d.get("index", 0)))
    return rows[:SAMPLES]


def _samples_html(run: dict) -> str:
    rows = samples(run)
    if not rows:
        return ""
    out = ['<table class="samples"><thead><tr><th>change</th><th>prompt</th><th>reference</th><th>base</th>'
           '<th>tuned</th></tr></thead><tbody>']
    for d in rows:
        cls = html.escape(str(d.get("change", "")))
        cells = [d.get("change", ""), d.get("prompt", ""), d.get("reference", ""), d.get("base", ""), d.get("tuned", "")]
        out.append(f'<tr class="{cls}">' + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    n = len(run["diff"])
    return "".join(out) + f"</tbody></table><p class=note>{len(rows)} of {n} held-out answers (eval_diff.jsonl)</p>"


def _kv(d: dict) -> list[list]:
    return [[k, json.dumps(v) if isinstance(v, (list, dict)) else v] for k, v in d.items()]


def _run_section(run: dict) -> str:
    r = run["results"]
    t = r.get("train") or {}
    status = ("interrupted" if t.get("interrupted") else "finished" if r.get("final_dir") else
              "running or stopped" if run["rows"] else "not started")
    facts = [["folder", run["path"]], ["status", status], ["steps", t.get("steps")],
             ["final training loss", t.get("final_loss")], ["real tokens per second", t.get("tokens_per_second")],
             ["training seconds", t.get("train_seconds")], ["command", r.get("command")]]
    parts = [f'<section class="run"><h2>{html.escape(run["name"])}</h2>',
             _table(["", ""], [f for f in facts if f[1] is not None], "facts")]
    comp = comparison_rows(run)
    if comp:
        parts += ["<h3>Base against tuned</h3>", _table(["", "base", "tuned", "change"], comp, "comparison")]
    s = _samples_html(run)
    if s:
        parts += ["<h3>Answers before and after</h3>", s]
    data = r.get("data") or {}
    flat = {k: v for k, v in data.items() if not isinstance(v, (dict, list))}
    splits = {k: v for k, v in data.items() if isinstance(v, dict)}
    if data:
        parts.append("<h3>Data</h3>")
        if splits:
            keys = sorted({k for v in splits.values() for k in v})
            parts.append(_table(["split", *keys], [[name, *[v.get(k) for k in keys]] for name, v in splits.items()]))
        parts.append(_table(["", ""], _kv(flat), "facts"))
    env = r.get("environment") or {}
    if env:
        parts += ["<h3>Environment</h3>", _table(["", ""], _kv(env), "facts")]
    if run["config"]:
        parts += ["<h3>Resolved config</h3>", f'<pre class="config">{html.escape(run["config"])}</pre>']
    return "\n".join(parts) + "</section>"


def render(runs: list[dict]) -> str:
    """The page for one run or several (compared: one line a run in every chart)."""
    charts = curves(runs)
    title = runs[0]["name"] if len(runs) == 1 else "comparison of " + ", ".join(r["name"] for r in runs)
    payload = json.dumps({"charts": charts}, allow_nan=False).replace("</", "<\\/")
    chart_divs = "\n".join(f'<figure class="chart" id="{html.escape(c["id"])}"><figcaption>'
                           f'{html.escape(c["title"])}</figcaption></figure>' for c in charts)
    sections = "\n".join(_run_section(run) for run in runs)
    return (PAGE.replace("@@TITLE@@", html.escape(f"tuneforge report: {title}"))
            .replace("@@CHARTS@@", chart_divs or "<p class=note>no metrics logged yet</p>")
            .replace("@@SECTIONS@@", sections).replace("@@DATA@@", payload)
            .replace("@@COUNT@@", str(len(charts))))


def write_report(run_dirs: list[str | Path], out: str | Path | None = None) -> Path:
    """report.html of one run (default: RUN/report.html) or of several compared (default: ./report.html)."""
    runs = [load_run(d) for d in run_dirs]
    if not runs:
        raise TuneforgeError("tuneforge report needs at least one run folder")
    path = Path(out) if out else (Path(runs[0]["path"]) / REPORT if len(runs) == 1 else Path(REPORT))
    atomic_write_text(path, render(runs))
    return path


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>@@TITLE@@</title>
<style>
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px auto; max-width: 1180px;
       color: #1d2433; padding: 0 16px; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 18px; border-bottom: 1px solid #d8dde6; padding-bottom: 4px; }
h3 { font-size: 15px; margin: 18px 0 6px; }
.note { color: #5b6578; font-size: 12px; }
.charts { display: grid; grid-template-columns: repeat(auto-fill, minmax(360px, 1fr)); gap: 14px; }
figure.chart { margin: 0; border: 1px solid #d8dde6; border-radius: 6px; padding: 8px 8px 4px; }
figcaption { font-weight: 600; font-size: 13px; margin-bottom: 2px; }
svg text { font-size: 10px; fill: #5b6578; }
.legend { font-size: 11px; color: #39414f; }
.legend span { display: inline-block; width: 10px; height: 3px; margin: 0 4px 2px 8px; vertical-align: middle; }
table { border-collapse: collapse; margin: 4px 0 8px; font-size: 13px; }
th, td { border: 1px solid #d8dde6; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f3f5f9; }
table.comparison td:nth-child(n+2) { text-align: right; font-variant-numeric: tabular-nums; }
table.samples td { max-width: 260px; white-space: pre-wrap; overflow-wrap: anywhere; }
tr.improved td:first-child { color: #13795b; font-weight: 600; }
tr.regressed td:first-child { color: #b42318; font-weight: 600; }
pre.config { background: #f6f8fa; padding: 10px; border-radius: 6px; overflow: auto; max-height: 420px; font-size: 12px; }
</style></head>
<body data-charts-expected="@@COUNT@@">
<h1>@@TITLE@@</h1>
<p class="note">Made by tuneforge from the run folder (results.json, metrics.jsonl, eval_diff.jsonl, config.yaml);
opens with no network. Rebuild or compare runs with <code>tuneforge report RUN [RUN ...]</code>.</p>
<h2>Curves</h2>
<div class="charts">@@CHARTS@@</div>
@@SECTIONS@@
<script type="application/json" id="report-data">@@DATA@@</script>
<script>
(function () {
  "use strict";
  var NS = "http://www.w3.org/2000/svg";
  var COLORS = ["#2f6fdf", "#e0662b", "#1a9a6c", "#b83fb3", "#7a6b00", "#d1344f", "#5d6d7e"];
  var data = JSON.parse(document.getElementById("report-data").textContent);
  function el(name, attrs, parent) {
    var node = document.createElementNS(NS, name);
    for (var k in attrs) { node.setAttribute(k, attrs[k]); }
    if (parent) { parent.appendChild(node); }
    return node;
  }
  function label(v) {
    var a = Math.abs(v);
    if (a !== 0 && (a < 1e-2 || a >= 1e5)) { return v.toExponential(1); }
    return String(Math.round(v * 1000) / 1000);
  }
  function ticks(lo, hi, n) {
    if (hi === lo) { return [lo]; }
    var step = Math.pow(10, Math.floor(Math.log10((hi - lo) / n)));
    var err = (hi - lo) / n / step;
    step *= err >= 5 ? 10 : err >= 2 ? 5 : err >= 1.5 ? 2 : 1;
    var out = [];
    for (var t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) { out.push(t); }
    return out;
  }
  function draw(chart) {
    var fig = document.getElementById(chart.id);
    var W = 360, H = 200, L = 50, R = 10, T = 8, B = 24;
    var xs = [], ys = [];
    chart.series.forEach(function (s) { s.points.forEach(function (p) { xs.push(p[0]); ys.push(p[1]); }); });
    var x0 = Math.min.apply(null, xs), x1 = Math.max.apply(null, xs);
    var y0 = Math.min.apply(null, ys), y1 = Math.max.apply(null, ys);
    if (x1 === x0) { x1 = x0 + 1; }
    if (y1 === y0) { var pad = Math.abs(y0) * 0.05 || 1; y0 -= pad; y1 += pad; }
    var sx = function (x) { return L + (x - x0) / (x1 - x0) * (W - L - R); };
    var sy = function (y) { return T + (1 - (y - y0) / (y1 - y0)) * (H - T - B); };
    var svg = el("svg", {viewBox: "0 0 " + W + " " + H, width: "100%", role: "img"}, fig);
    ticks(y0, y1, 4).forEach(function (t) {
      el("line", {x1: L, x2: W - R, y1: sy(t), y2: sy(t), stroke: "#eef0f4"}, svg);
      el("text", {x: L - 4, y: sy(t) + 3, "text-anchor": "end"}, svg).textContent = label(t);
    });
    ticks(x0, x1, 5).forEach(function (t) {
      el("text", {x: sx(t), y: H - 8, "text-anchor": "middle"}, svg).textContent = label(t);
    });
    el("line", {x1: L, x2: L, y1: T, y2: H - B, stroke: "#9aa3b2"}, svg);
    el("line", {x1: L, x2: W - R, y1: H - B, y2: H - B, stroke: "#9aa3b2"}, svg);
    var legend = document.createElement("div");
    legend.className = "legend";
    chart.series.forEach(function (s, i) {
      var color = COLORS[i % COLORS.length];
      var pts = s.points.map(function (p) { return sx(p[0]).toFixed(1) + "," + sy(p[1]).toFixed(1); });
      el("polyline", {points: pts.join(" "), fill: "none", stroke: color, "stroke-width": 1.6, "class": "series"}, svg);
      if (s.points.length <= 60) {
        s.points.forEach(function (p) {
          var dot = el("circle", {cx: sx(p[0]), cy: sy(p[1]), r: 2.2, fill: color}, svg);
          el("title", {}, dot).textContent = s.name + ": step " + p[0] + ", " + label(p[1]);
        });
      }
      var key = document.createElement("span");
      key.style.background = color;
      legend.appendChild(key);
      legend.appendChild(document.createTextNode(s.name));
    });
    fig.appendChild(legend);
  }
  var drawn = 0;
  data.charts.forEach(function (chart) { draw(chart); drawn += 1; });
  document.body.setAttribute("data-charts-rendered", String(drawn));
})();
</script>
</body></html>
"""
