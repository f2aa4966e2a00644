"""Small data sets and configs for end-to-end tests on the tiny model."""

from __future__ import annotations

import json
import random
from pathlib import Path

from tuneforge.config.load import config_from_dict


def write_instruction_data(path: Path, n: int = 48, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            f.write(json.dumps({"instruction": f"Add {a} and {b}.", "output": f"The sum is {a + b}."}) + "\n")
    return path


def write_chat_data(path: Path, n: int = 32, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            a, times = rng.randint(0, 9), rng.randint(1, 4)  # lengths differ: padding must not matter
            said = " ".join([str(a)] * times)
            msgs = [{"role": "user", "content": f"Say {said}."}, {"role": "assistant", "content": said},
                    {"role": "user", "content": "Again?"}, {"role": "assistant", "content": f"Yes: {said}."}]
            f.write(json.dumps({"messages": msgs}) + "\n")
    return path


def write_text_data(folder: Path, docs: int = 12, seed: int = 0) -> Path:
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    words = "the quick brown fox jumps over lazy dog and then runs away".split()
    for i in range(docs):
        (folder / f"doc{i:02d}.txt").write_text(" ".join(rng.choice(words) for _ in range(60)) + "\n")
    return folder


def write_preference_data(path: Path, n: int = 32, seed: int = 0) -> Path:
    """A checkable preference rule: the chosen answer is the correct sum, the rejected one is off by 1 to 3.
    Answer lengths differ within and across pairs, so padding and packing positions matter."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            wrong = a + b + rng.choice([-3, -2, -1, 1, 2, 3])
            chosen, rejected = f"{a + b}", f"The sum is {wrong}."
            if rng.random() < 0.5:
                chosen, rejected = f"The sum is {a + b}.", f"{wrong}"
            f.write(json.dumps({"prompt": f"Add {a} and {b}.", "chosen": chosen, "rejected": rejected}) + "\n")
    return path


def write_pair_data(path: Path, n: int = 32, seed: int = 0) -> Path:
    """Contrastive pairs: a question about two numbers and the sentence that answers it, some with a hard negative
    (the same numbers, the wrong sum) and, now and then, a repeated positive text (an in-batch false negative)."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            row = {"anchor": f"What is {a} plus {b}? ({i})", "positive": f"{a} plus {b} makes {a + b}."}
            if rng.random() < 0.5:
                row["negatives"] = [f"{a} plus {b} makes {a + b + rng.choice([-2, -1, 1, 2])}."]
            f.write(json.dumps(row) + "\n")
    return path


def write_prompt_data(path: Path, n: int = 32, seed: int = 0) -> Path:
    """Prompts with a checkable reference answer (online RL)."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            f.write(json.dumps({"prompt": f"Add {a} and {b}.", "reference": str(a + b)}) + "\n")
    return path


def make_config(model_dir, train, out, method="sft", lora=False, lora_dropout=0.0, rl=None, **train_kw):
    train_section = {"output_dir": str(out), "max_steps": 8, "micro_batch_size": 4, "lr": 3e-3,
                     "progress": False, "tensorboard": False, "warmup_ratio": 0.0,
                     "autocast": "none", **train_kw}  # float32 on every machine: exact invariants
    data = {"train": str(train), "max_length": 64 if method == "clm" else 256}
    return config_from_dict({
        "method": method, "model": {"name": str(model_dir)}, "data": data,
        "lora": {"enabled": lora, "r": 4, "alpha": 8, "dropout": lora_dropout},
        "train": train_section, "eval": {"loss": False, "forgetting": False}, **({"rl": rl} if rl is not None else {}),
    })


def write_config_yaml(cfg, path: Path) -> Path:
    """A RunConfig as a YAML file, for tests that go through the command line."""
    import yaml
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    return path


# Each data builder's small test data set: a method registered in tuneforge.methods inherits every invariant
# test (tests/invariants/) by naming a builder here. A new builder without an entry fails those tests loudly.
DATA_WRITERS = {
    "prompt": lambda folder: write_prompt_data(folder / "prompts.jsonl"),
    "chat": lambda folder: write_chat_data(folder / "chat.jsonl"),
    "text_blocks": lambda folder: write_text_data(folder / "docs"),
    "preference": lambda folder: write_preference_data(folder / "prefs.jsonl"),
    "pair": lambda folder: write_pair_data(folder / "pairs.jsonl"),
}


# Online RL in the invariant tests: a shipped reward that differs between the tiny model's random completions
# (their length in characters), 4 new tokens, 2 samples per prompt, a sample of every step in samples.jsonl;
# ppo with the adaptive KL controller, whose coefficient a resume must restore.
_RL_SETUP = {"reward_functions": [{"name": "tuneforge.rl.rewards:length_penalty", "args": {"max_chars": 4}}],
             "max_new_tokens": 4, "num_generations": 2, "samples_every": 1}

# Settings a method needs in the invariant tests, which drive its objective directly: DPO's reference there is
# the base with the adapter disabled (full fine-tuning's precomputed reference is a run's: tests/objectives).
METHOD_SETUP = {"dpo": {"lora": True}, "grpo": {"rl": _RL_SETUP}, "rloo": {"rl": _RL_SETUP},
                "ppo": {"rl": {**_RL_SETUP, "kl_target": 0.01, "kl_horizon": 10.0}}}


def token_batch_methods() -> list[str]:
    """Methods whose batches come from the data as it is (every method but online RL, whose objective samples
    its own training batches from the policy, and contrastive, whose batches carry the pair texts): the loss-level invariants (one update's gradients, packing)
    drive their objective directly on collated data. The run-level invariants (gradient accumulation through
    fit, resume, 2 ranks) take every method: `all_methods`."""
    from tuneforge.methods import METHODS
    return sorted(m for m, entry in METHODS.items() if entry.batching is None)


def all_methods() -> list[str]:
    from tuneforge.methods import METHODS
    return sorted(METHODS)


def online_rl_methods() -> list[str]:
    """Methods whose objective samples its own training batches (the loop hands it prompts)."""
    from tuneforge.methods import METHODS
    return sorted(m for m, entry in METHODS.items() if entry.builder == "prompt")


def load_for_method(method: str, model_dir, attn_implementation: str | None = None):
    """The tiny model and tokenizer as a run of `method` trains them: tuneforge_varlen attention (run.py's
    default for a Llama; `attn_implementation` to choose another), its LoRA adapter if it needs one."""
    import torch

    from tuneforge.models.attention import register
    from tuneforge.models.load import load_causal_lm
    model, tok = load_causal_lm(str(model_dir))
    model.set_attn_implementation(attn_implementation or register())
    if METHOD_SETUP.get(method, {}).get("lora"):
        from tuneforge.adapters.lora import apply_lora
        torch.manual_seed(0)
        model = apply_lora(model, r=4, alpha=8, dropout=0.0)
    return model, tok


def method_module(cfg, model):
    """`model` wrapped as a training run wraps it: a TrainModule with the method's extra heads (a reward head),
    no LoRA. Invariant tests that drive the objective directly need the heads the method trains."""
    from tuneforge.methods import method_of
    from tuneforge.models.heads import TrainModule
    heads = method_of(cfg).heads
    return TrainModule(model, heads(cfg, model) if heads else None)


def method_config(method: str, model_dir, data_folder: Path, out, **kw):
    """A config for `method` on its builder's test data (written once per folder: the file's time is part
    of the token cache key)."""
    kw = {**METHOD_SETUP.get(method, {}), **kw}
    from tuneforge.methods import METHODS
    builder = METHODS[method].builder
    target = data_folder / builder
    if not target.exists():
        target.mkdir(parents=True)
        DATA_WRITERS[builder](target)
    data = next(target.iterdir())
    return make_config(model_dir, data, out, method=method, **kw)


def update_sums(model, objective, batches):
    """Loss sum, count and the gradients of the loss sum of one update of the loop, from zero gradients."""
    import torch

    from tuneforge.models.heads import as_train_module
    from tuneforge.train.loop import accumulate_update, make_autocast
    module = as_train_module(model)
    module.zero_grad(set_to_none=True)
    totals = accumulate_update(module, objective, batches, make_autocast("none", torch.device("cpu")))
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    return totals.loss_sum, totals.count, grads


def read_metrics(run_dir) -> list[dict]:
    """The rows of a run's metrics.jsonl."""
    lines = (Path(run_dir) / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]
