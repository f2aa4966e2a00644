"""Rollout generation speed: tuneforge's decoding core (eval/generation.py sample_completions) against
transformers' model.generate on the same inputs, SmolLM2-135M-Instruct with LoRA attached.

8 prompts x 4 samples, 64 new tokens each (stop ids off on both sides, so both produce every token), sampling at
temperature 1 without top-k/top-p, one batch of 32 rows, bf16 autocast where the CPU has native bf16 (as
run.py decides), the attention run.py trains with. The two sides run interleaved, `--repeats` times each, in
one process: the machine is shared, so compare the medians side by side, never with another day's numbers.

    .venv/bin/python bench/rollout_speed.py [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain recursion to a child.",
             "Give me three tips for learning to cook.", "What is 17 times 3?", "Why is the sky blue?",
             "Summarise the plot of a detective story in two sentences.", "Name a prime number larger than 50."]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import GenerationConfig

    from tuneforge.adapters.lora import apply_lora
    from tuneforge.eval.generation import encode_prompts, left_pad, sample_completions
    from tuneforge.models.attention import register, supports_varlen
    from tuneforge.models.load import load_causal_lm
    from tuneforge.rl.rollout import make_generator
    from tuneforge.train.loop import make_autocast, resolve_autocast

    model, tok = load_causal_lm("smollm2")
    if supports_varlen(model.config):
        model.set_attn_implementation(register())
    model = apply_lora(model, r=16, alpha=32, dropout=0.05).eval()
    device = torch.device("cpu")
    autocast = make_autocast("auto", device)
    prompts = [p for p in encode_prompts(tok, [[{"role": "user", "content": q}] for q in QUESTIONS])
               for _ in range(args.samples)]
    ids, mask = left_pad(prompts, tok.pad_token_id)
    config = GenerationConfig(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=args.new_tokens,
                              min_new_tokens=args.new_tokens, pad_token_id=tok.pad_token_id, eos_token_id=None)

    def ours() -> int:
        out = sample_completions(model, prompts, args.new_tokens, [], tok.pad_token_id, temperature=1.0,
                                 generator=make_generator(0))
        return out.num_tokens

    def theirs() -> int:
        torch.manual_seed(0)
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        return int(out[:, ids.shape[1]:].numel())

    sides = {"tuneforge sample_completions": ours, "transformers generate": theirs}
    rates: dict[str, list[float]] = {k: [] for k in sides}
    with torch.no_grad(), autocast():
        for name, fn in sides.items():  # warm-up: allocator, one-time kernel choices
            start = time.perf_counter()
            fn()
            print(f"  warm-up: {name}: {time.perf_counter() - start:.1f} s", flush=True)
        for r in range(args.repeats):
            for name in (list(sides) if r % 2 == 0 else list(sides)[::-1]):  # interleaved, order alternating
                start = time.perf_counter()
                n = sides[name]()
                rates[name].append(n / (time.perf_counter() - start))
                print(f"  run {r + 1}: {name}: {rates[name][-1]:.0f} tokens/s", flush=True)
    print(f"SmolLM2-135M-Instruct + LoRA r16, {len(QUESTIONS)} prompts x {args.samples} samples x "
          f"{args.new_tokens} new tokens, one batch of {len(prompts)}, autocast {resolve_autocast('auto', device)}, "
          f"{args.threads} threads, {args.repeats} interleaved repeats")
    print("| side | generated tokens/s, median | runs |\n|---|---|---|")
    for name, xs in rates.items():
        print(f"| {name} | {statistics.median(xs):.0f} | {', '.join(f'{x:.0f}' for x in xs)} |")
    a, b = (statistics.median(x) for x in rates.values())
    print(f"ratio tuneforge / transformers: {a / b:.2f}x")


if __name__ == "__main__":
    main()
