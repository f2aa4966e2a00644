"""Load test of `tuneforge serve`: C clients x R requests each over three adapters and the base, through the
official openai client on loopback, against the same requests sent one at a time.

The server runs in this process (tuneforge.serve.server.Server, the object `tuneforge serve` runs) on the
embedded SmolLM2-135M-Instruct with three LoRA adapters (r 16, all linear layers): `--adapter NAME=DIR` ones, or
by default three made here with random non-zero B (seeded), so that each adapter answers differently. Every
answer is checked against that adapter's answer when asked alone (greedy: the same tokens), so a request
answered by the wrong adapter is counted as mixed up.

Reported: requests answered, mixed up, completion tokens per second in aggregate (all completion tokens over the
wall time of the concurrent phase) against one at a time, the ratio, rows per decoding batch.

    .venv/bin/python bench/serve_load.py [--clients 8 --requests 20 --max-tokens 24] [--threads 2]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"
MESSAGES = ["My parcel has been stuck at the depot for a week.", "I was charged twice for one order.",
            "The app crashes when I open my basket.", "How do I send back shoes that do not fit?",
            "I cannot log in since I changed my e-mail address.", "Write a haiku about autumn.",
            "What is 17 times 3?", "Name three rivers in Europe."]


def random_adapters(base: str, folder: Path, n: int = 3) -> list[tuple[str, str]]:
    import torch

    from tuneforge.adapters.lora import apply_lora
    from tuneforge.models.load import load_causal_lm
    out = []
    for i in range(n):
        torch.manual_seed(i)
        model = apply_lora(load_causal_lm(base)[0], r=16, alpha=32, dropout=0.0)
        gen = torch.Generator().manual_seed(100 + i)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.data = torch.randn(p.shape, generator=gen) * 0.02
        model.save_pretrained(folder / f"adapter{i}")
        out.append((f"adapter{i}", str(folder / f"adapter{i}")))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--adapter", action="append", metavar="NAME=DIR", help="default: three random adapters")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=20, help="per client")
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    import openai
    import torch

    from tuneforge.serve.engine import Engine
    from tuneforge.serve.server import Limits, Server, Service, load_served
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="serve-load-"))
    adapters = ([tuple(a.split("=", 1)) for a in args.adapter] if args.adapter
                else random_adapters(args.model, tmp))
    model, tok, names, base = load_served(args.model, adapters, base_name="base")
    engine = Engine(model, tok, names, base, max_batch=args.max_batch, max_queue=4 * args.clients * args.requests)
    server = Server(Service(engine, tok, None, Limits(max_tokens=args.max_tokens)), port=0).start()
    client = openai.OpenAI(base_url=server.url, api_key="local", max_retries=0, timeout=600)
    models = engine.names

    def ask(job):
        model_name, message = job
        r = client.chat.completions.create(model=model_name, messages=[{"role": "user", "content": message}],
                                           max_tokens=args.max_tokens, temperature=0)
        return r.choices[0].message.content, r.usage.completion_tokens

    jobs = [(models[(c + k) % len(models)], MESSAGES[(3 * c + k) % len(MESSAGES)])
            for c in range(args.clients) for k in range(args.requests)]
    distinct = sorted(set(jobs))
    # one at a time: every distinct request alone (its reference answer), timed
    t0 = time.perf_counter()
    alone = {job: ask(job) for job in distinct}
    alone_seconds = time.perf_counter() - t0
    alone_tokens = sum(n for _, n in alone.values())
    # concurrent: C clients, each sending its R requests one after the other
    per_client = [jobs[c * args.requests:(c + 1) * args.requests] for c in range(args.clients)]
    before = dict(engine.stats)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=args.clients) as pool:
        answers = list(pool.map(lambda mine: [ask(j) for j in mine], per_client))
    wall = time.perf_counter() - t0
    flat = [a for mine in answers for a in mine]
    tokens = sum(n for _, n in flat)
    mixed = sum(text != alone[job][0] for job, (text, _) in zip(jobs, flat))
    batches = engine.stats["batches"] - before["batches"]
    server.close()
    seq_rate, conc_rate = alone_tokens / alone_seconds, tokens / wall
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    from run import cpu_name, versions  # bench/run.py
    lines = [f"# tuneforge serve load test ({stamp})", "",
             f"- command: `.venv/bin/python bench/serve_load.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
             f"- machine: {cpu_name()}; torch threads {args.threads}; float32",
             "- versions: " + ", ".join(f"{k} {v}" for k, v in versions().items() if v),
             f"- model: {args.model} + {len(adapters)} LoRA adapters "
             f"({'given' if args.adapter else 'random non-zero B, r 16, seeded'}); served names: {', '.join(models)}",
             f"- {args.clients} clients x {args.requests} requests, greedy, max_tokens {args.max_tokens}, "
             f"max batch {args.max_batch}", "",
             "| phase | requests | completion tokens | seconds | tokens/s |", "|---|---|---|---|---|",
             f"| one at a time ({len(distinct)} distinct requests) | {len(distinct)} | {alone_tokens} | "
             f"{alone_seconds:.1f} | {seq_rate:.1f} |",
             f"| concurrent | {len(flat)} | {tokens} | {wall:.1f} | {conc_rate:.1f} |", "",
             f"- answered: {len(flat)} of {len(jobs)}; mixed up between adapters: {mixed}",
             f"- aggregate throughput {conc_rate / seq_rate:.2f}x one at a time (target >= 3x: "
             f"{'MET' if conc_rate / seq_rate >= 3 else 'not met'})",
             f"- decoding batches {batches}, {len(flat) / max(batches, 1):.1f} requests a batch on average, "
             f"at most {engine.stats['max_rows']}"]
    report = "\n".join(lines)
    print(report)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"serve-load-{stamp}.md").write_text(report + "\n")
    (RESULTS / f"serve-load-{stamp}.json").write_text(json.dumps(
        {"args": vars(args), "alone_seconds": alone_seconds, "alone_tokens": alone_tokens, "wall": wall,
         "tokens": tokens, "mixed": mixed, "answered": len(flat), "batches": batches}, indent=1))
    return 0 if mixed == 0 and len(flat) == len(jobs) else 1


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
