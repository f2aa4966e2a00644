"""The model card (README.md) of a run's `final/` folder: what was trained, on what, how well, and how to redo it.

Why our own: PEFT writes a blank template ("[More Information Needed]" throughout) that names the base by this
machine's cache path. A run knows everything the card should say; `write_model_card` writes it from the config
and the run's results (the dict that also goes to results.json).
"""

from __future__ import annotations

import os
from pathlib import Path

import tuneforge


def write_model_card(folder: str | os.PathLike, cfg, results: dict) -> Path:
    from tuneforge.fsutil import atomic_write_text
    path = Path(folder) / "README.md"
    atomic_write_text(path, model_card(cfg, results))
    return path


def model_card(cfg, results: dict) -> str:
    """Markdown for a run's final folder; sections with nothing to say (no held-out set) are left out."""
    lora = cfg.lora.enabled
    kind = "peft" if lora and cfg.method != "reward" else "transformers"  # a reward model's final/ is merged
    lines = ["---", f"library_name: {kind}", "tags: [tuneforge, " + cfg.method + (", lora" if lora else "") + "]",
             "---", "", f"# {Path(cfg.train.output_dir).name}: {cfg.model.name}, {_method(cfg)}", "",
             "| | |", "|---|---|",
             f"| base model | `{cfg.model.name}` |",
             f"| method | {_method(cfg)} |"]
    if lora:
        lines.append(f"| LoRA | {_lora(cfg.lora)} |")
    lines += [f"| data | {_data(cfg, results.get('data', {}))} |",
              f"| training | {_training(cfg, results.get('train', {}))} |",
              f"| tuneforge | {tuneforge.__version__} |", ""]
    lines += _metrics(results)
    lines += ["## Reproduce", "", "```bash", results.get("command") or f"tuneforge train {_config_path(cfg)}",
              "```", "",
              f"The run's full config is `{_config_path(cfg)}`; `tuneforge train {_config_path(cfg)} "
              "train.output_dir=NEW_DIR` trains the same again.", ""]
    lines += _usage(cfg)
    return "\n".join(lines)


def _method(cfg) -> str:
    what = {"sft": "supervised fine-tuning (loss on responses)", "clm": "continued pre-training (next-token loss)",
            "reward": "reward model (Bradley-Terry loss on preference pairs)"}
    shape = "LoRA adapter (PEFT format)" if cfg.lora.enabled else "full fine-tuning (every parameter)"
    if cfg.method == "reward" and cfg.lora.enabled:
        shape = "LoRA, merged into the saved sequence classifier (the adapter and head also in adapter/)"
    return f"`{cfg.method}`: {what.get(cfg.method, cfg.method)}, {shape}"


def _lora(l) -> str:
    targets = l.target_modules if isinstance(l.target_modules, str) else ", ".join(l.target_modules)
    extra = [name for name, on in (("DoRA", l.use_dora), ("rsLoRA", l.use_rslora)) if on]
    return f"r={l.r}, alpha={l.alpha:g}, dropout={l.dropout:g}, target modules: {targets}" + \
        (f", {' and '.join(extra)}" if extra else "")


def _files(value) -> str:
    items = value if isinstance(value, list) else [value]
    return ", ".join(f"`{p}`" for p in items if p is not None)


def _data(cfg, stats: dict) -> str:
    d = cfg.data
    train, held = stats.get("train", {}), stats.get("eval", {})
    parts = [f"train {_files(d.train)}: {train.get('examples', '?')} examples, {train.get('tokens', '?')} tokens "
             f"({train.get('supervised_tokens', '?')} supervised)"]
    if d.eval:
        parts.append(f"held-out {_files(d.eval)}: {held.get('examples', '?')} examples")
    elif d.eval_fraction:
        parts.append(f"held-out: {d.eval_fraction:g} of the train records (seed {cfg.train.seed}), "
                     f"{held.get('examples', '?')} examples")
    dropped = sum(s.get(k, 0) for s in (train, held) for k in ("dropped_too_long", "truncated_left"))
    if dropped or stats.get("skipped_records"):
        parts.append(f"{dropped} over-long examples dropped or cut, {stats.get('skipped_records', 0)} bad records "
                     "skipped")
    return "; ".join(parts) + f"; max length {d.max_length} tokens" + (", packed" if d.packing else "")


def _training(cfg, t: dict) -> str:
    s = cfg.train
    length = f"max_steps {s.max_steps}" if s.max_steps else f"{s.epochs:g} epochs"
    done = f"ran {t['steps']} steps, final train loss {_num(t.get('final_loss'))}" if "steps" in t else "not run"
    return (f"{length} ({done}), lr {s.lr:g} ({s.schedule}), batch {s.micro_batch_size} x {s.grad_accum} "
            f"accumulated, seed {s.seed}")


def _metrics(results: dict) -> list[str]:
    """Held-out numbers before and after training, where the run measured them."""
    rows = []
    loss = (results.get("train") or {}).get("eval") or {}
    if "loss" in loss:
        rows.append(("held-out loss", "", _num(loss["loss"])))
    if "perplexity" in loss:
        rows.append(("held-out perplexity", "", _num(loss["perplexity"])))
    forgot = results.get("forgetting") or {}
    if "after" in forgot:
        rows.append((f"general-text perplexity ({forgot['tokens']} tokens: forgetting)", _num(forgot.get("before")),
                     _num(forgot["after"])))
    base, tuned = results.get("base") or {}, results.get("tuned") or {}
    names = list((tuned.get("metrics") or base.get("metrics") or {}))
    for key in names:
        rows.append((f"task accuracy, {key}", _pct((base.get("metrics") or {}).get(key)),
                     _pct((tuned.get("metrics") or {}).get(key))))
    if "over_base" in tuned:
        rows.append(("win rate of tuned answers over the base's (rule-judged, ties half)", "",
                     _pct(tuned["over_base"]["win_rate"])))
    if not rows:
        return []
    n = tuned.get("n") or base.get("n")
    head = ["## Held-out results", "", "| metric | base model | tuned |", "|---|---|---|"]
    note = ["", f"Task accuracy on {n} held-out examples, greedy generation, by the run's eval.metrics (exact: "
                "the whitespace-normalised output equal to the reference; contains: the reference inside it, "
                "case-insensitive)."] if n else []
    return head + [f"| {name} | {b or '-'} | {a or '-'} |" for name, b, a in rows] + note + [""]


def _usage(cfg) -> list[str]:
    final = Path(cfg.train.output_dir) / "final"
    if cfg.method == "reward":
        code = [f"tuneforge score --model {final} --prompt \"...\" --response \"...\""]
        py = ["from transformers import AutoModelForSequenceClassification, AutoTokenizer",
              f"model = AutoModelForSequenceClassification.from_pretrained(\"{final}\", num_labels=1)",
              f"tokenizer = AutoTokenizer.from_pretrained(\"{final}\")  # pads with a token of its own",
              "# or: from tuneforge.eval.reward import score; score(folder, prompts, responses)"]
        return ["## Use", "", "```bash", *code, "```", "", "```python", *py, "```", ""]
    if cfg.lora.enabled:
        code = [f"tuneforge generate --run {cfg.train.output_dir} --prompt \"...\"",
                f"tuneforge merge --adapter {final} --out merged/   # a full model folder"]
        py = ["from peft import PeftModel", "# base: the model above (tuneforge loads an embedded name for you)",
              f"model = PeftModel.from_pretrained(base, \"{final}\")"]
    else:
        code = [f"tuneforge generate --run {cfg.train.output_dir} --prompt \"...\""]
        py = ["from transformers import AutoModelForCausalLM, AutoTokenizer",
              f"model = AutoModelForCausalLM.from_pretrained(\"{final}\")",
              f"tokenizer = AutoTokenizer.from_pretrained(\"{final}\")"]
    return ["## Use", "", "```bash", *code, "```", "", "```python", *py, "```", ""]


def _config_path(cfg) -> str:
    return str(Path(cfg.train.output_dir) / "config.yaml")


def _num(value) -> str:
    return f"{value:.4g}" if isinstance(value, (int, float)) else "-"


def _pct(value) -> str:
    return f"{value:.1%}" if isinstance(value, (int, float)) else ""
