"""The run config schema. One YAML file describes one run; every key has a default or a clear error.

Sections: model, data, lora, train, eval, plus `method` and one section per family of methods (dpo, rl,
contrastive). This file is the one place for every default: the training loop reads the `train` section
itself. Per-method defaults (learning rate, what the loss averages over, the default data kind) live in
METHOD_DEFAULTS so that adding a method is one entry, not an if/elif chain; what a method DOES (its data
builder, objective, evaluation and saved result) is its entry in tuneforge/methods.py.
"""

from __future__ import annotations

import difflib
import math
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Method = Literal["clm", "sft", "dpo", "reward", "grpo", "rloo", "ppo", "contrastive"]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(Section):
    name: str = "smollm2-135m-instruct"
    """Embedded short name, local HF folder, .gguf file, or hub id."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Storage dtype of the weights. Keep float32 master weights for training; use train.autocast for speed."""
    trust_remote_code: bool = False
    attn_implementation: str | None = None
    """None: "tuneforge_varlen" (models/attention.py: packed examples attend only within themselves, no mask
    built) for the decoder families it is checked on (llama, qwen2, qwen3 without sliding windows), else
    transformers' default. Any transformers name ("sdpa", "eager", "flash_attention_2", ...) is passed on."""


class DataSection(Section):
    train: str | list[str] | None = None
    eval: str | list[str] | None = None
    eval_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    """Held-out share of the train data when no eval file is given (seeded by train.seed)."""
    kind: Literal["auto", "text", "chat", "instruction", "preference", "pair", "prompt"] = "auto"
    format: Literal["jsonl", "json", "csv", "tsv", "parquet", "text"] | None = None
    fields: dict[str, str] = Field(default_factory=dict)
    """Map canonical field names to the file's names, e.g. {instruction: question, output: answer}."""
    on_error: Literal["raise", "skip"] = "raise"
    text_split: Literal["document", "line"] = "document"
    max_length: int = Field(1024, gt=8)
    """Tokens per example (sft) or per block (clm). Tokenizers often report a meaningless maximum."""
    truncation: Literal["drop", "left"] = "drop"
    """Over-long example: drop it, or cut its prompt from the left. Never cuts a supervised response."""
    mask: Literal["assistant", "last", "all"] = "assistant"
    """Loss on every assistant turn (default), the last assistant turn only, or all tokens."""
    system_prompt: str | None = None
    """Added as the system message of every conversation that has none (training and generation alike)."""
    packing: bool | Literal["auto"] = "auto"
    """Pack several examples per row, attention isolated between them (no padding waste). auto: on where
    the model's attention isolates packed examples (tuneforge_varlen: llama, qwen2, qwen3), else off.
    Packed, each micro-batch is one row of train.micro_batch_tokens tokens (see there)."""
    group_by_length: bool = False
    """Without packing: batch examples of similar length together (less padding), order still seeded."""
    chat_template: str | None = None
    """Jinja chat template replacing the tokenizer's own (for models without one). Used for generation too."""
    doc_separator: str | None = None
    """Token between documents for clm; default <|endoftext|> (or </s>, or eos). Not the end-of-turn token."""
    cache_dir: str | None = None
    """Tokenised-data cache; default <output_dir>/../.tokcache. Its key covers all that changes tokens."""


class LoraSection(Section):
    enabled: bool = False
    r: int = Field(16, gt=0)
    alpha: float = 32.0
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: str | list[str] = "all-linear"
    use_dora: bool = False
    use_rslora: bool = False
    fused_dropout: bool = True
    """Train with dropout fused into each adapter's A projection (adapters/fused_dropout.py): same maths as
    PEFT's dropout, without its float32 copy of every adapted layer's input. False runs PEFT's own path."""
    frozen_dtype: Literal["auto", "model"] = "auto"
    """The dtype the frozen base's linear weights are stored in. auto: the autocast dtype when train.autocast
    resolves to bf16/fp16 (autocast would cast them to it at every forward anyway: the same numbers, half the
    memory, no copy per forward or per decoded token), unless the method merges the base into its saved result
    (reward) or DoRA is on; model: model.dtype, as loaded."""


class TrainSection(Section):
    output_dir: str = "runs/tuneforge"
    seed: int = 0
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, gt=0)
    """Optimizer steps; overrides epochs when set."""
    micro_batch_size: int = Field(8, gt=0)
    """Examples per micro-batch. Packed: a step holds the tokens of micro_batch_size x grad_accum examples of
    data.max_length, in micro-batches of train.micro_batch_tokens each."""
    grad_accum: int = Field(1, gt=0)
    micro_batch_tokens: int | None = Field(None, gt=8)
    """Packed data only: the token budget of one micro-batch (one row of this many tokens), which fixes the
    activation memory whatever the examples' lengths. Default data.max_length (the leanest that fits every
    example); a larger budget runs fewer, wider micro-batches (faster on a GPU, more memory). Gradient
    accumulation stays exact: the loss is divided by the supervised count of the whole step."""
    lr: float | None = Field(None, gt=0)
    """Default per method and LoRA/full (see METHOD_DEFAULTS)."""
    weight_decay: float = Field(0.0, ge=0.0)
    """Never applied to LoRA, bias or norm parameters."""
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_ratio: float = Field(0.05, ge=0.0, lt=1.0)
    warmup_steps: int | None = Field(None, ge=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    eval_every: int | None = Field(None, gt=0)
    save_every: int | None = Field(None, gt=0)
    keep_last: int = Field(2, gt=0)
    max_bad_steps: int = Field(5, ge=0)
    """Steps with a non-finite loss or gradient norm that are skipped (with a warning) before the run stops."""
    log_every: int = Field(1, gt=0)
    tensorboard: bool = True
    progress: bool = True
    threads: int | None = Field(None, gt=0)
    """torch intra-op threads; default: all cores."""
    autocast: Literal["auto", "none", "bf16", "fp16"] = "auto"
    """auto: bf16 where the hardware multiplies bf16 natively (CUDA with bf16; CPUs with AMX or AVX512-BF16),
    else none (float32): on an AVX2-only CPU bf16 matmuls run 10-20x slower than float32 (bench/matmul.py)."""
    activation_checkpointing: bool = False
    """Recompute each layer's activations in backward: less memory, one more forward pass of compute."""
    compile: bool = False
    """torch.compile the model body (first steps pay the compilation)."""
    sparse_dropout: bool = True
    """The model's dropout (hidden states and attention probabilities) drawn on the CPU as the positions it drops,
    one random draw per dropped element (models/dropout.py): the same Bernoulli dropout, 10x fewer draws at p = 0.1,
    less memory. False runs PyTorch's own per-element dropout. No effect on GPUs, under train.compile or on models
    without dropout."""


class DPOSection(Section):
    """Preference optimisation (method dpo, issue "RLHF part 1"): read only by that method."""
    loss: Literal["sigmoid", "ipo", "hinge", "robust", "cdpo", "simpo", "orpo"] = "sigmoid"
    beta: float = Field(0.1, gt=0)
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5)
    """robust / cdpo: the assumed share of flipped preference labels."""
    simpo_gamma: float = Field(0.5, ge=0.0)
    """simpo: the target reward margin."""
    nll_coef: float = Field(0.0, ge=0.0)
    """Adds nll_coef x the chosen answer's mean token NLL to every pair's loss (RPO, Pang et al. 2024, eq. 1;
    TRL's rpo_alpha): DPO alone can lower both answers' likelihoods as long as the margin grows, this keeps the
    preferred answer likely, so generation moves too. 0: plain DPO. (orpo has its own NLL term.)"""


_FUNCTION_NAME = re.compile(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*")


class RewardFunctionSpec(Section):
    """One entry of rl.reward_functions: `module:function`, its weight in the sum, keyword arguments bound."""
    name: str
    """"module:function", e.g. "tuneforge.rl.rewards:number_match" or "my_rewards:brevity"."""
    weight: float = 1.0
    args: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments bound to the function (e.g. {pattern: "^yes"} for tuneforge.rl.rewards:regex)."""

    @field_validator("name")
    @classmethod
    def _module_colon_function(cls, value: str) -> str:
        if not _FUNCTION_NAME.fullmatch(value.strip()):
            raise ValueError(f"{value!r} is not \"module:function\" (e.g. tuneforge.rl.rewards:exact_answer)")
        return value.strip()

    @field_validator("weight")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("the weight must be a finite number")
        return value


EVAL_METRICS = {"exact": "tuneforge.eval.task:exact", "contains": "tuneforge.eval.task:contains",
                "regex": "tuneforge.rl.rewards:regex"}
"""eval.metrics' short names and the functions they name."""


def _metric_spec(entry: Any) -> Any:
    """An eval.metrics entry as a RewardFunctionSpec's fields: a short name or "module:function" string, or a
    {name, args} mapping whose name may be short."""
    if isinstance(entry, str):
        entry = {"name": entry}
    if isinstance(entry, dict) and isinstance(entry.get("name"), str):
        name = entry["name"].strip()
        if name in EVAL_METRICS:
            return {**entry, "name": EVAL_METRICS[name]}
        if ":" not in name:
            near = difflib.get_close_matches(name, list(EVAL_METRICS), n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise ValueError(f"unknown metric {name!r}{hint}: use one of {', '.join(EVAL_METRICS)} or a Python "
                             f"scoring function \"module:function\"")
    return entry


class EvalSection(Section):
    loss: bool = True
    """Held-out loss/perplexity."""
    generate: bool = False
    """Task accuracy on held-out instruction/chat records: greedy generation scored against the reference."""
    before: bool = True
    """Also score the base model before training, for a base-versus-tuned comparison."""
    max_new_tokens: int = Field(32, gt=0)
    batch_size: int = Field(16, gt=0)
    limit: int | None = Field(None, gt=0)
    metrics: list[RewardFunctionSpec] = Field(
        default_factory=lambda: [RewardFunctionSpec(name=EVAL_METRICS["exact"]),
                                 RewardFunctionSpec(name=EVAL_METRICS["contains"])], min_length=1)
    """How generated answers are scored against the reference, in order of importance (the first decides an
    answer-by-answer comparison, the next break ties): `exact` (whitespace-normalised equality), `contains`
    (the reference inside the answer, case-insensitive), `{name: regex, args: {pattern: ..., ignore_case:
    true}}` (the pattern found in the answer), or a Python function "module:function" called as
    fn(prompts, completions, references, **args) -> one number per answer (the contract of
    rl.reward_functions), given as a string or {name, args}."""

    forgetting: bool = True
    """Perplexity on general text before and after tuning (methods whose result is a causal language model):
    what tuning cost elsewhere, in results.json "forgetting" and beside the task gain."""
    general_text: str | None = None
    """The general text for `forgetting`: a file or folder read as method clm reads data.train; default: the
    set shipped with tuneforge (standard-library docstrings and software licences)."""
    general_tokens: int = Field(8192, gt=0)
    """How many tokens of the general text `forgetting` scores (its first blocks)."""

    @field_validator("metrics", mode="before")
    @classmethod
    def _short_names(cls, value: Any) -> Any:
        if isinstance(value, (str, dict)):
            value = [value]
        return [_metric_spec(entry) for entry in value] if isinstance(value, list) else value


class RLSection(Section):
    """Online reinforcement learning (methods ppo, grpo, rloo): read only by those methods."""
    reward_model: str | None = None
    """A tuneforge reward model: the final/ folder of a `method: reward` run (or the run folder)."""
    reward_model_weight: float = 1.0
    """The reward model's weight in the summed reward (next to each function's weight)."""
    reward_functions: list[RewardFunctionSpec] = Field(default_factory=list)
    """"module:function" strings or {name, weight, args} entries, called as fn(prompts, completions,
    references, **args) -> list[float] (tuneforge/rl/rewards.py; shipped ones are tuneforge.rl.rewards:NAME)."""
    max_new_tokens: int = Field(64, gt=0)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1.0)
    num_generations: int = Field(4, gt=1)
    """Samples per prompt (grpo, rloo: the group)."""
    beta: float = Field(0.04, ge=0.0)
    """KL penalty to the reference: on by default, the leash that keeps the policy near where it started."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    epochs: int = Field(1, gt=0)
    """Optimisation epochs over each batch of rollouts (each mini-batch one optimizer update)."""
    gamma: float = Field(1.0, ge=0.0, le=1.0)
    lam: float = Field(0.95, ge=0.0, le=1.0)
    clip_range: float = Field(0.2, gt=0, lt=1.0)
    """PPO's clip range on the probability ratio: [1 - clip_range, 1 + clip_range_high]."""
    clip_range_high: float | None = Field(None, gt=0)
    """The upper clip (DAPO's clip-higher, Yu et al. 2025); None: clip_range (symmetric)."""
    loss_type: Literal["grpo", "dr_grpo", "dapo"] = "grpo"
    """How token losses add up: grpo = mean over sequences of each one's token mean; dr_grpo = token sum /
    (sequences x max_new_tokens), Liu et al. 2025; dapo = mean over every token of the update."""
    scale_rewards: bool = True
    """grpo: divide each group's centred rewards by its std (false: Dr. GRPO's plain r - mean)."""
    mini_batches: int = Field(1, gt=0)
    """Optimizer updates per epoch over one batch of rollouts (train.grad_accum must be a multiple)."""
    kl_coef: float = Field(0.05, ge=0.0)
    """ppo: the per-token KL penalty in the reward (the initial value with kl_target)."""
    kl_target: float | None = Field(None, gt=0)
    """ppo: adapt kl_coef towards this KL per sequence (Ziegler et al. 2019); None: kl_coef fixed."""
    kl_horizon: float = Field(10000.0, gt=0)
    vf_coef: float = Field(0.1, ge=0.0)
    """ppo: weight of the value loss (the value head shares the policy's body)."""
    value_clip: float | None = Field(0.2, gt=0)
    whiten_advantages: bool = True
    """ppo: advantages to zero mean, unit variance over each batch of rollouts."""
    kl_budget: float | None = Field(None, gt=0)
    """Mean KL to the reference per completion (nats) above which the run warns; still above it three
    batches later, it stops with an error (checkpoints kept)."""
    samples_every: int = Field(10, ge=0)
    """Write prompts, completions and rewards to OUTPUT_DIR/samples.jsonl every N steps (0: never)."""
    rollout_batch_size: int = Field(32, gt=0)
    """Rows per decoding batch."""

    @field_validator("reward_functions", mode="before")
    @classmethod
    def _names_as_entries(cls, value):
        """A bare "module:function" string is the entry {name: it} (weight 1, no arguments)."""
        if isinstance(value, (str, dict)):
            value = [value]  # one entry given without a list
        if isinstance(value, list):
            return [{"name": item} if isinstance(item, str) else item for item in value]
        return value

    @field_validator("reward_model_weight")
    @classmethod
    def _finite_weight(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("the weight must be a finite number")
        return value


class RewardSection(Section):
    """Reward models (method reward): read only by that method."""
    center_coef: float = Field(0.0, ge=0.0)
    """Reward centring (Eisenstein et al. 2023): adds center_coef * (r_chosen + r_rejected)^2 per pair, so
    rewards stay near 0 (the Bradley-Terry loss alone leaves their offset free); e.g. 0.01."""


class ContrastiveSection(Section):
    """Embedding models (method contrastive): read only by that method."""
    pooling: Literal["mean", "cls", "last"] = "mean"
    """How token states become one vector: mean of the real tokens, the first token, or the last real token
    (decoder LLMs)."""
    normalize: bool = True
    """L2-normalise the embeddings: similarity is then the cosine."""
    temperature: float = Field(0.05, gt=0)
    """Temperature of the similarity logits (0.05: sentence-transformers' scale 20); the start value when learned."""
    learn_temperature: bool = False
    """Learn the temperature (a log-scale parameter, its scale capped at 100 as in CLIP)."""
    symmetric: bool = False
    """Add the document -> query direction to the loss (each anchor's loss the mean of both)."""
    score_margin: float | None = None
    """Also mask, as a likely false negative, every candidate the model scores above the anchor's positive minus
    this margin (cosine units; GISTEmbed's rule with the model as its own guide). None: mask by text only."""
    query_prefix: str | None = None
    """Put before every anchor (query), e.g. "query: " (E5) or an instruction; saved as the
    sentence-transformers prompt "query"."""
    document_prefix: str | None = None
    """Put before every positive, negative and corpus text, e.g. "passage: "; saved as the prompt "document"."""
    corpus: str | list[str] | None = None
    """Extra retrieval candidates for held-out evaluation (and mining): text records (jsonl `text` field, or a
    .txt file with data.text_split), added to the held-out positives, so retrieval ranks among distractors."""


class RankSection(Section):
    """Collecting human rankings (`tuneforge rank`): the answers sampled for each prompt. Read by that command
    only, under any method (a run's config keeps it, so the run's own model can be ranked with it)."""
    num_answers: int = Field(2, ge=2, le=4)
    """Answers sampled per prompt: more than 4 is more than a person compares well at a glance."""
    temperature: float = Field(0.8, gt=0)
    top_p: float = Field(1.0, gt=0, le=1.0)
    max_new_tokens: int = Field(128, gt=0)


# Which methods read which method section: setting a section another method reads is a mistake worth an error.
SECTION_METHODS = {"dpo": ("dpo",), "rl": ("ppo", "grpo", "rloo"), "contrastive": ("contrastive",)}
SECTION_METHODS["reward"] = ("reward",)

METHOD_DEFAULTS = {
    # method: (lr full, lr lora, unit the loss averages over)
    "clm": (2e-5, 2e-4, "tokens"),
    "sft": (1e-5, 2e-4, "tokens"),
    # DPO moves a model that is already good: small steps (TRL's default 1e-6 for full; LoRA a few times more)
    "dpo": (1e-6, 2e-5, "pairs"),
    # reward: LoRA at 1e-4, half of sft's: one scalar per pair is a noisier signal than every answer token,
    # and reward models overfit within about an epoch (Ouyang et al. 2022 train one); TRL's reward recipe
    # uses the same 1e-5 / 1e-4
    "reward": (1e-5, 1e-4, "pairs"),
    # online RL: small steps (TRL's GRPO default 1e-6 full); LoRA several times more
    "grpo": (1e-6, 1e-5, "sequences"),
    "rloo": (1e-6, 1e-5, "sequences"),
    "ppo": (1e-6, 1e-5, "sequences"),
    # contrastive: sentence-transformers' usual 2e-5 for a full encoder; LoRA ten times more
    "contrastive": (2e-5, 2e-4, "pairs"),
}


# The data kind a method reads when data.kind is auto (others detect it record by record).
DEFAULT_DATA_KIND = {"clm": "text", "contrastive": "pair", "dpo": "preference", "grpo": "prompt", "rloo": "prompt",
                     "ppo": "prompt"}


class RunConfig(Section):
    method: Method = "sft"
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    lora: LoraSection = Field(default_factory=LoraSection)
    train: TrainSection = Field(default_factory=TrainSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    dpo: DPOSection = Field(default_factory=DPOSection)
    rl: RLSection = Field(default_factory=RLSection)
    contrastive: ContrastiveSection = Field(default_factory=ContrastiveSection)
    reward: RewardSection = Field(default_factory=RewardSection)
    rank: RankSection = Field(default_factory=RankSection)

    @model_validator(mode="after")
    def _fill_method_defaults(self):
        for section, methods in SECTION_METHODS.items():
            value = getattr(self, section)
            if self.method not in methods and value != type(value)():  # a saved config holds the defaults
                raise ValueError(f"{section}.* is set, but the {section} section is read by method "
                                 f"{' or '.join(methods)}, not by method {self.method}: remove it or change the "
                                 "method")
        if self.method in SECTION_METHODS["rl"]:  # the PPO ratio is exactly 1 before an update only without dropout
            if "dropout" not in self.lora.model_fields_set:
                self.lora.dropout = 0.0
            elif self.lora.dropout:
                raise ValueError(f"lora.dropout is {self.lora.dropout}, but online RL (method {self.method}) needs "
                                 "0: the ratio of the policy's log-probs to the ones it sampled with must be 1 "
                                 "before an update, and dropout noise breaks that")
        if self.train.lr is None:
            full, lora, _ = METHOD_DEFAULTS[self.method]
            self.train.lr = lora if self.lora.enabled else full
        if self.data.kind == "auto" and self.method in DEFAULT_DATA_KIND:
            self.data.kind = DEFAULT_DATA_KIND[self.method]
        return self

    @property
    def count_unit(self) -> str:
        return METHOD_DEFAULTS[self.method][2]
