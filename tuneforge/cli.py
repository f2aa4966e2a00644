"""The `tuneforge` command: train | data inspect | data mine-negatives | generate | chat | eval | report | serve | rank |
merge | score."""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import sys
from pathlib import Path

from tuneforge.errors import TuneforgeError


def _config(args, extra_inputs=()):
    """The run config, after every path the command will read (data, a local model, flags) is checked."""
    from tuneforge import preflight
    from tuneforge.config import load_config
    from tuneforge.rl.rewards import check_reward_sources
    cfg = load_config(args.config, args.overrides)
    preflight.check_inputs(preflight.config_inputs(cfg) + list(extra_inputs))
    check_reward_sources(cfg)  # online RL: reward functions import, the reward model folder exists
    return cfg


def cmd_train(args) -> int:
    from tuneforge.run import train
    from tuneforge.train.distributed import is_main
    cfg = _config(args)
    command = shlex.join(["tuneforge", "train", args.config, *args.overrides])  # what reproduces the run
    results = train(cfg, resume=args.resume, overwrite=args.overwrite, command=command)
    if is_main():
        _print_comparison(results)
    return 0


def _print_comparison(results: dict) -> None:
    t = results.get("train", {})
    resumed = f" (resumed at step {t['resumed_from']}, {t['steps']} in all)" if t.get("resumed_from") else ""
    print(f"trained {t.get('steps_this_run', t.get('steps'))} steps{resumed} in {t.get('train_seconds')} s, "
          f"{t.get('tokens_per_second')} tokens/s, final loss {t.get('final_loss')}")
    if results.get("forgetting"):
        from tuneforge.run import forgetting_text
        print(forgetting_text(results["forgetting"]))
    if "base" in results and "tuned" in results:
        print()
        print(task_table(results["base"], results["tuned"]))
    if results.get("final_dir"):
        print(f"saved: {results['final_dir']}")


def task_table(base: dict, tuned: dict) -> str:
    """Held-out task accuracy of base and tuned side by side, metric by metric, and the answer-by-answer
    comparison when there is one."""
    names = list(tuned["metrics"])
    width = max(12, *(len(n) + 2 for n in names))
    lines = ["held-out task accuracy".ljust(24) + "".join(n.rjust(width) for n in names)]
    for label, res in (("base model", base), ("tuned model", tuned)):
        lines.append(f"  {label}".ljust(24) + "".join(f"{res['metrics'].get(n, float('nan')):{width}.1%}"
                                                      for n in names))
    if "over_base" in tuned:
        w = tuned["over_base"]
        lines.append(f"  tuned vs base, answer by answer: win rate {w['win_rate']:.1%} ({w['wins']} better, "
                     f"{w['ties']} unchanged, {w['losses']} worse)")
        if w.get("diff_file"):
            lines.append(f"  per-example diff: {w['diff_file']}")
    return "\n".join(lines)


def cmd_data_inspect(args) -> int:
    from tuneforge.data.audit import format_example
    from tuneforge.run import load_tokenizer_of, prepare
    cfg = _config(args)
    tokenizer = load_tokenizer_of(cfg)
    data = prepare(cfg, tokenizer, rebuild=True)
    color = sys.stdout.isatty() and not args.no_color
    for i in range(min(args.n, len(data.train))):
        ex = data.train[i]
        # multi-sequence examples (preference: chosen and rejected; pairs; prompts): each sequence by its role
        parts = [(f"{ex.role(k)} ", seq) for k, seq in enumerate(ex.sequences)] if hasattr(ex, "sequences") \
            else [("", ex)]
        for role, seq in parts:
            print(f"--- example {i} {role}({len(seq)} tokens, {sum(seq.loss_mask)} supervised) ---")
            print(format_example(tokenizer, seq, color=color))
    print("--- supervised tokens are " + ("green" if color else "inside [[ ]]") + " ---")
    print(json.dumps(data.stats, indent=1))
    return 0


def _load_for_inference(args, config: str | None = None, config_overrides: list[str] = ()):
    """Model, tokenizer and system prompt from --run (a training output folder) or --model/--adapter.

    `config` (a run config, with `config_overrides`: what `tuneforge rank CONFIG` takes) gives the model,
    template and system prompt when there is no --run; an --adapter then goes on top of that config's model.
    """
    from tuneforge import preflight
    from tuneforge.config import load_config
    from tuneforge.run import load_model_and_tokenizer
    preflight.check_inputs(
        ([preflight.run_input("--run", args.run)] if args.run else [])
        + ([preflight.adapter_input("--adapter", args.adapter)] if args.adapter else [])
        + (preflight.model_inputs("--model", args.model) if args.model else [])
        + ([preflight.Input("--file", args.file, kind="file")] if getattr(args, "file", None) else []))
    overrides, adapter = list(config_overrides), args.adapter
    cfg_path = config
    if args.run:
        cfg_path = str(Path(args.run) / "config.yaml")
        adapter = adapter or (str(Path(args.run) / "final") if (Path(args.run) / "final" /
                                                               "adapter_config.json").exists() else None)
        if not adapter and (Path(args.run) / "final" / "config.json").exists():
            overrides.append(f"model.name={Path(args.run) / 'final'}")
    if args.model:
        overrides.append(f"model.name={args.model}")
    elif adapter and not args.run and config is None:
        overrides.append(f"model.name={_adapter_base(adapter)}")
    cfg = load_config(cfg_path, overrides)
    preflight.check_inputs(preflight.config_inputs(cfg, data=False))  # a run's config may name a local model
    model, tokenizer = load_model_and_tokenizer(cfg)
    if adapter:
        from tuneforge.adapters.lora import load_adapter
        model = load_adapter(model, adapter)
    system = args.system if args.system is not None else cfg.data.system_prompt
    return model, tokenizer, system


def _adapter_base(adapter: str) -> str:
    """The base an adapter folder records (an embedded name for adapters trained on one), checked to exist."""
    from tuneforge import preflight
    from tuneforge.adapters.lora import adapter_base_model
    base = adapter_base_model(adapter)
    if base is None:
        raise TuneforgeError(f"--adapter {adapter}: its adapter_config.json names no base model "
                             "(base_model_name_or_path): pass --model")
    preflight.check_inputs(preflight.model_inputs(f"--adapter {adapter}: its base model (pass --model)", base))
    return base


def cmd_data_mine(args) -> int:
    from tuneforge.data.mining import mine_for_config
    cfg = _config(args)
    counts = mine_for_config(cfg, args.out, args.k, args.margin)
    print(f"{counts['pairs']} pairs, {counts['negatives']} hard negatives mined among {counts['corpus']} "
          f"documents -> {args.out}")
    return 0


def cmd_generate(args) -> int:
    from tuneforge.eval.generation import generate
    model, tokenizer, system = _load_for_inference(args)
    prompts = list(args.prompt or [])
    if args.file:
        prompts += [line.rstrip("\n") for line in open(args.file, encoding="utf-8-sig") if line.strip()]
    if not prompts:
        raise TuneforgeError("give --prompt TEXT (repeatable) or --file FILE with one prompt per line")
    convs = [[{"role": "user", "content": p}] for p in prompts]
    outs = generate(model, tokenizer, convs, args.max_new_tokens, args.batch_size, system,
                    do_sample=args.temperature > 0, temperature=args.temperature or 1.0)
    for p, o in zip(prompts, outs):
        print(json.dumps({"prompt": p, "output": o}, ensure_ascii=False))
    return 0


def cmd_chat(args) -> int:
    from tuneforge import preflight
    from tuneforge.adapters.lora import load_adapter
    from tuneforge.eval.generation import BASE_ADAPTER, generate
    from tuneforge.repl import chat_loop
    specs = [_named_folder(s) for s in args.adapter or []]
    preflight.check_inputs([preflight.adapter_input(f"--adapter {n}", d) for n, d in specs])
    args.adapter = specs[0][1] if specs else None
    model, tokenizer, system = _load_for_inference(args)
    names = {}  # the name the chat uses -> PEFT's
    if args.run and not specs and lora_loaded(model):
        names[Path(args.run).name] = "default"
    for i, (name, folder) in enumerate(specs):
        if name in names or name == "base":
            raise TuneforgeError(f"--adapter {name}: two adapters named {name!r} ('base' names the base alone)")
        if i:
            model = load_adapter(model, folder, adapter_name=name)
        names[name] = "default" if i == 0 else name
    state = {"name": next(iter(names), "base")}

    def respond(conversation: list[dict]) -> str:
        adapter = names.get(state["name"], BASE_ADAPTER) if len(names) > 1 or state["name"] == "base" else None
        return generate(model, tokenizer, [conversation], args.max_new_tokens, 1, system,
                        do_sample=args.temperature > 0, temperature=args.temperature or 1.0, adapter=adapter)[0]

    def switch(name: str | None) -> str:
        known = ["base", *names]
        if name is None:
            return "adapters: " + ", ".join(f"{n}{' (answering)' if n == state['name'] else ''}" for n in known)
        if name not in known:
            return f"no adapter {name!r}; loaded: {', '.join(known)}"
        state["name"] = name
        return f"now answering: {name}"

    chat_loop(respond, keep_history=not args.no_history, switch=switch if names else None)
    return 0


def _named_folder(spec: str, flag: str = "--adapter", name_required: bool = False) -> tuple[str, str]:
    """(name, folder) of a repeatable `FLAG NAME=DIR`; DIR alone (named after its folder) unless a name is
    required."""
    name, sep, folder = spec.partition("=")
    if sep and name and folder and not Path(spec).exists():
        return name, folder
    if name_required:
        raise TuneforgeError(f"{flag} {spec!r}: write NAME=DIR (the name requests use, then the folder)")
    return Path(spec.rstrip("/")).name or "adapter", spec


def lora_loaded(model) -> bool:
    from tuneforge.eval.generation import lora_model
    return lora_model(model) is not None


def cmd_eval(args) -> int:
    from tuneforge import preflight
    from tuneforge.methods import method_of
    from tuneforge.run import evaluate, evaluate_against_base, tuned_weights
    if args.config is not None and "=" in args.config and not Path(args.config).exists():
        args.overrides, args.config = [args.config, *args.overrides], None  # `eval --run R key=value`
    if args.config is None and not args.run:
        raise TuneforgeError("tuneforge eval needs a run config, or --run RUN_DIR (its config.yaml and final/)")
    if args.run:
        preflight.check_inputs([preflight.run_input("--run", args.run)])
        args.config = args.config or str(Path(args.run) / "config.yaml")
    extra = [preflight.adapter_input("--adapter", args.adapter)] if args.adapter else []
    extra += [preflight.Input("--model", args.model, kind="folder")] if args.model else []
    cfg = _config(args, extra_inputs=extra)
    adapter, model_dir = args.adapter, args.model
    saved_result = method_of(cfg).evaluate_saved is not None  # a reward model: the base has no trained head
    if args.run and not adapter and not model_dir:
        kind, final = tuned_weights(args.run)
        adapter, model_dir = (str(final), None) if kind == "adapter" else (None, str(final))
    with contextlib.redirect_stdout(sys.stderr):  # stdout is the JSON alone (`tuneforge eval cfg | jq`)
        if saved_result or args.no_base or (adapter is None and model_dir is None):
            if model_dir and not saved_result:
                cfg.model.name = model_dir
                model_dir = None
            result = evaluate(cfg, adapter=adapter, model_dir=model_dir)
        else:
            if adapter and model_dir:
                raise TuneforgeError("--adapter and --model both name the tuned model: give one")
            result = evaluate_against_base(cfg, adapter=adapter, model_dir=model_dir,
                                           diff_path=Path(args.diff) if args.diff else None)
            print(comparison_text(result))
    print(json.dumps(result, indent=1, default=str))
    return 0


def comparison_text(result: dict, examples: int = 3) -> str:
    """`tuneforge eval`'s side-by-side view: held-out metrics of base and tuned, task accuracy, and a few of
    the answers tuning improved and regressed."""
    lines = []
    loss = result["comparison"].get("loss") or {}
    if loss:
        lines.append("held-out".ljust(28) + "base".rjust(12) + "tuned".rjust(12) + "change".rjust(12))
        for key, row in loss.items():
            lines.append(f"  {key}".ljust(28) + "".join(f"{row[k]:12.4g}" for k in ("base", "tuned", "change")))
    forgetting = result["comparison"].get("forgetting")
    if forgetting:
        from tuneforge.run import forgetting_text
        lines.append(forgetting_text(forgetting))
    task = result["comparison"].get("task")
    if task:
        lines.append(task_table(result["base"]["task"], {**result["tuned"]["task"], "over_base": task}))
        for kind in ("improved", "regressed"):
            shown = [r for r in task.get("rows") or [] if r["change"] == kind][:examples]
            for r in shown:
                lines.append(f"  {kind}: {_clip(r['prompt'])!r}: base {_clip(r['base'])!r} -> tuned "
                             f"{_clip(r['tuned'])!r} (reference {_clip(r['reference'])!r})")
    return "\n".join(lines)


def _clip(text: str, limit: int = 50) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _served_models(args) -> tuple[str | None, list[tuple[str, str]], list[tuple[str, str]], str | None]:
    """(base, [(served name, adapter folder)], [(served name, embedder folder)], system prompt) from --model,
    --adapter NAME=DIR, --embedder NAME=DIR and --run (a LoRA run: an adapter; a contrastive run: an embedder).
    The base is None when only embedders are served."""
    from tuneforge import preflight
    from tuneforge.config import load_config
    from tuneforge.run import tuned_weights
    adapters, embedders, base, system = [], [], args.model, args.system
    for spec in args.adapter or []:
        name, folder = _named_folder(spec, "--adapter", name_required=True)
        preflight.check_inputs([preflight.adapter_input(f"--adapter {name}", folder)])
        adapters.append((name, folder))
    for spec in args.embedder or []:
        name, folder = _named_folder(spec, "--embedder", name_required=True)
        preflight.check_inputs(preflight.model_inputs(f"--embedder {name}", folder))
        embedders.append((name, folder))
    for run in args.run or []:
        preflight.check_inputs([preflight.run_input("--run", run)])
        cfg = load_config(str(Path(run) / "config.yaml"), [])
        kind, final = tuned_weights(run)
        if cfg.method == "contrastive":  # final/ is a sentence-transformers folder (LoRA merged into it)
            embedders.append((Path(run).name, str(final)))
            continue
        if kind != "adapter":
            raise TuneforgeError(f"--run {run}: its final/ is a whole model (full fine-tuning), not an adapter on a "
                                 f"shared base: serve it as --model {final}")
        if base is not None and base != cfg.model.name:
            raise TuneforgeError(f"--run {run} was trained on {cfg.model.name}, not on {base}: one server serves "
                                 "adapters of one base")
        base = base or cfg.model.name
        system = system if system is not None else cfg.data.system_prompt
        adapters.append((Path(run).name, str(final)))
    if base is None and (adapters or not embedders):
        from tuneforge.adapters.lora import adapter_base_model
        recorded = {adapter_base_model(folder) for _, folder in adapters} - {None}
        base = recorded.pop() if len(recorded) == 1 else "smollm2-135m-instruct"
    if base is not None:
        preflight.check_inputs(preflight.model_inputs("--model", base))
    return base, adapters, embedders, system


def cmd_serve(args) -> int:
    import os

    from tuneforge.serve.embeddings import load_embedder_folder
    from tuneforge.serve.engine import Engine
    from tuneforge.serve.server import Limits, Server, Service, load_served
    base, adapters, embedder_specs, system = _served_models(args)
    engine, tokenizer = None, None
    if base is not None:
        model, tokenizer, names, base_name = load_served(base, adapters, args.base_name, args.threads)
        engine = Engine(model, tokenizer, names, base_name, max_batch=args.max_batch, max_queue=args.max_queue)
    embedders = {}
    for name, folder in embedder_specs:
        if name in embedders or (engine is not None and name in engine.names):
            raise TuneforgeError(f"two models are served as {name!r}: give each its own NAME")
        embedders[name] = load_embedder_folder(name, folder, args.threads)
    key = args.api_key or os.environ.get("TUNEFORGE_API_KEY") or None
    limits = Limits(max_prompt_tokens=args.max_prompt_tokens, max_tokens=args.max_tokens,
                    default_max_tokens=min(256, args.max_tokens))
    service = Service(engine, tokenizer, system, limits, key, embedders)
    server = Server(service, args.host, args.port)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not key:
        print(f"warning: serving on {args.host} without an API key: anyone who can reach it can use it",
              file=sys.stderr)
    print(f"serving {', '.join(service.names)} at {server.url} (OpenAI-compatible; Ctrl-C stops)", flush=True)
    try:
        server.httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.httpd.server_close()
        if engine is not None:
            engine.close()
    return 0


def cmd_report(args) -> int:
    from tuneforge.report import write_report
    path = write_report(args.runs, args.out)
    print(f"report: {path}")
    return 0


def cmd_merge(args) -> int:
    from tuneforge import preflight
    from tuneforge.adapters.lora import merge_to_folder
    from tuneforge.config import load_config
    from tuneforge.run import load_model_and_tokenizer
    preflight.check_inputs((preflight.model_inputs("--model", args.model) if args.model else [])
                           + [preflight.adapter_input("--adapter", args.adapter)])
    cfg = load_config(None, [f"model.name={args.model or _adapter_base(args.adapter)}"])
    model, tokenizer = load_model_and_tokenizer(cfg)
    out = merge_to_folder(model, args.adapter, args.out, tokenizer)
    print(f"merged model written to {out}")
    return 0


def _score_rows(path: str) -> list[dict]:
    """JSONL rows to score: {prompt, response}, or {prompt, chosen, rejected} (both answers scored)."""
    from tuneforge.errors import DataError
    rows = []
    with open(path, encoding="utf-8-sig") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as exc:
                raise DataError(f"not valid JSON: {exc}", path, line_no) from exc
            answers = ("response",) if isinstance(obj, dict) and "response" in obj else ("chosen", "rejected")
            for key in ("prompt", *answers):
                if not isinstance(obj, dict) or not isinstance(obj.get(key), str):
                    raise DataError("expected a string (each line: prompt and response, or prompt, chosen and "
                                    "rejected)", path, line_no, key)
            rows.append({k: obj[k] for k in ("prompt", *answers)})
    return rows


def cmd_score(args) -> int:
    from tuneforge import preflight
    from tuneforge.eval.reward import load_scorer
    preflight.check_inputs([preflight.Input("--model", args.model, kind="folder")]
                           + ([preflight.Input("--data", args.data, kind="file")] if args.data else []))
    texts = (args.prompt is not None, args.response is not None)
    if (args.data and any(texts)) or (not args.data and not all(texts)):
        raise TuneforgeError("give --prompt TEXT --response TEXT, or --data FILE (JSONL)")
    rows = _score_rows(args.data) if args.data else [{"prompt": args.prompt, "response": args.response}]
    with contextlib.redirect_stdout(sys.stderr):  # stdout is the JSON lines alone
        scorer = load_scorer(args.model)
    answers = [k for k in ("response", "chosen", "rejected") if any(k in r for r in rows)]
    scores = {k: scorer([r["prompt"] for r in rows if k in r], [r[k] for r in rows if k in r], args.batch_size)
              for k in answers}
    taken = {k: iter(v) for k, v in scores.items()}
    for row in rows:
        rewards = {("reward" if k == "response" else f"reward_{k}"): next(taken[k]) for k in row if k in taken}
        print(json.dumps({**row, **rewards}, ensure_ascii=False))
    return 0


def cmd_rank(args) -> int:
    from tuneforge.rank import rank_command
    return rank_command(args, _load_for_inference)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tuneforge", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp):
        sp.add_argument("config", help="YAML run config")
        sp.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-4 lora.enabled=true")

    t = sub.add_parser("train", help="fine-tune a model as a config describes")
    with_config(t)
    t.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    t.add_argument("--overwrite", action="store_true",
                   help="replace a finished run in output_dir (its final/, results.json, checkpoints, logs)")
    t.set_defaults(func=cmd_train)

    d = sub.add_parser("data", help="data tools")
    dsub = d.add_subparsers(dest="data_command", required=True)
    di = dsub.add_parser("inspect", help="print rendered examples with the supervised tokens marked, and counts")
    with_config(di)
    di.add_argument("-n", type=int, default=3, help="examples to print")
    di.add_argument("--no-color", action="store_true")
    di.set_defaults(func=cmd_data_inspect)
    dm = dsub.add_parser("mine-negatives", help="contrastive: add hard negatives to the training pairs, mined with "
                                                "the config's model")
    with_config(dm)
    dm.add_argument("--out", required=True, help="pair JSONL to write (anchor, positive, negatives)")
    dm.add_argument("-k", type=int, default=3, help="negatives per pair (default 3)")
    dm.add_argument("--margin", type=float, default=0.05,
                    help="skip candidates scoring above (1 - margin) x the positive's score: likely unlabelled "
                         "positives (default 0.05)")
    dm.set_defaults(func=cmd_data_mine)

    for name, func, helptext in (("generate", cmd_generate, "generate replies to prompts"),
                                 ("chat", cmd_chat, "chat with a model in the terminal")):
        g = sub.add_parser(name, help=helptext)
        g.add_argument("--run", help="a training output folder: its config, template handling and final weights")
        g.add_argument("--model", help="model (embedded name, folder, .gguf, hub id); default: the --adapter's "
                                       "recorded base, else smollm2")
        if name == "generate":
            g.add_argument("--adapter", help="LoRA adapter folder (PEFT format)")
        g.add_argument("--system", default=None, help="system prompt (default: the run's data.system_prompt)")
        g.add_argument("--max-new-tokens", type=int, default=128)
        g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
        if name == "chat":
            g.add_argument("--adapter", action="append", metavar="[NAME=]DIR", dest="adapter",
                           help="a LoRA adapter; repeat it to load several on the base and switch with /adapter NAME")
            g.add_argument("--no-history", action="store_true",
                           help="answer each message alone (default: each reply sees the conversation so far)")
        if name == "generate":
            g.add_argument("--prompt", action="append", help="a user prompt (repeatable)")
            g.add_argument("--file", help="one prompt per line")
            g.add_argument("--batch-size", type=int, default=8)
        g.set_defaults(func=func)

    e = sub.add_parser("eval", help="held-out metrics of a model; given a tuned one, base against tuned on the "
                                    "same data, with what changed answer by answer")
    e.add_argument("config", nargs="?", default=None,
                   help="YAML run config (default with --run: the run's config.yaml)")
    e.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.eval=held_out.jsonl eval.limit=50")
    e.add_argument("--run", help="a training output folder: its config and its final/ as the tuned model")
    e.add_argument("--adapter", help="the tuned model as a LoRA adapter folder on the config's model")
    e.add_argument("--model", help="the tuned model as a model folder (full fine-tuning; method reward: the "
                                   "trained reward model, a run's final/)")
    e.add_argument("--no-base", action="store_true", help="evaluate the tuned model alone")
    e.add_argument("--diff", help="write the per-example diff (base and tuned answers, scores, improved / "
                                  "regressed / unchanged) to this JSON-lines file")
    e.set_defaults(func=cmd_eval)

    sv = sub.add_parser("serve", help="an OpenAI-compatible HTTP API: one base, several adapters, batched")
    sv.add_argument("--model", help="the base model (default: the adapters' or runs' recorded base)")
    sv.add_argument("--adapter", action="append", metavar="NAME=DIR",
                    help="a LoRA adapter served as NAME (repeatable)")
    sv.add_argument("--embedder", action="append", metavar="NAME=DIR",
                    help="an embedding model (a contrastive run's final/, a sentence-transformers folder or "
                         "all-minilm-l6-v2) served on /v1/embeddings as NAME (repeatable)")
    sv.add_argument("--run", action="append", help="a training run served under its folder's name: a LoRA run "
                                                   "as an adapter, a contrastive run as an embedder (repeatable)")
    sv.add_argument("--base-name", help="the name requests use for the base alone (default: --model as given)")
    sv.add_argument("--system", default=None, help="system prompt for chat requests (default: the run's)")
    sv.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1: this machine only")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (or set TUNEFORGE_API_KEY)")
    sv.add_argument("--max-prompt-tokens", type=int, default=4096)
    sv.add_argument("--max-tokens", type=int, default=1024, help="the largest max_tokens a request may ask")
    sv.add_argument("--max-queue", type=int, default=64, help="requests waiting at most; more get 429")
    sv.add_argument("--max-batch", type=int, default=16, help="requests decoded together at most")
    sv.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    sv.set_defaults(func=cmd_serve)

    rp = sub.add_parser("report", help="rebuild a run's report.html, or compare runs on one page")
    rp.add_argument("runs", nargs="+", help="training output folders")
    rp.add_argument("--out", help="the page to write (default: RUN/report.html for one run, ./report.html for "
                                  "several)")
    rp.set_defaults(func=cmd_report)

    sc = sub.add_parser("score", help="rewards from a reward model (method reward), as JSON lines")
    sc.add_argument("--model", required=True, help="the reward model: a run's final/ folder (or the run folder)")
    sc.add_argument("--prompt", help="a user prompt (with --response)")
    sc.add_argument("--response", help="the answer to score")
    sc.add_argument("--data", help="JSONL: prompt and response, or prompt, chosen and rejected, per line")
    sc.add_argument("--batch-size", type=int, default=8)
    sc.set_defaults(func=cmd_score)
    r = sub.add_parser("rank", help="rank sampled answers in the terminal: preference data for dpo/reward")
    with_config(r)
    r.add_argument("--prompts", required=True, help="one prompt per line, or JSONL/JSON/CSV/Parquet with a "
                                                    "prompt field")
    r.add_argument("--out", required=True, help="preference JSONL, appended as you decide; a rerun continues it")
    r.add_argument("--adapter", help="LoRA adapter folder on top of the config's model")
    r.add_argument("--run", help="a training output folder: sample from its model (its config, template, "
                                 "final weights) instead of the config's")
    r.add_argument("--ask-skipped", action="store_true", help="ask again the prompts skipped (s) before")
    r.set_defaults(func=cmd_rank)

    m = sub.add_parser("merge", help="merge a LoRA adapter into its base: a full model folder")
    m.add_argument("--model", help="the base model the adapter was trained on (default: the one it records)")
    m.add_argument("--adapter", required=True)
    m.add_argument("--out", required=True)
    m.set_defaults(func=cmd_merge)
    return p


def main(argv: list[str] | None = None) -> int:
    import warnings
    # PEFT 0.21 calls a transformers 5 property deprecated upstream; the warning is not the user's to act on.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # argparse fills the overrides list once, so `rank CONFIG --out F key=value` leaves key=value over
        if getattr(args, "overrides", None) is None or any(e.startswith("-") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    try:
        return args.func(args)
    except TuneforgeError as exc:
        print(f"tuneforge: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tuneforge: interrupted", file=sys.stderr)
        return 130
    finally:
        from tuneforge.train.distributed import shutdown
        shutdown()  # under torchrun: leave the process group cleanly


if __name__ == "__main__":
    raise SystemExit(main())
