"""The method registry: what each method brings, as one entry.

A method is its data builder (data/builders.py: how records become token sequences), its objective (the
mathematics: objectives/), the held-out evaluation it adds beyond the held-out loss, and the way its result is
saved. `run.py` is the same short conductor for every method and never tests a method's name; adding a
method is adding an entry here (and its defaults in config/schema.py METHOD_DEFAULTS).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


def _save_causal_lm(cfg, module, tokenizer, folder: Path) -> None:
    """The adapter in PEFT format under LoRA, a full transformers model folder otherwise."""
    model = module.model
    if cfg.lora.enabled:
        from tuneforge.adapters.lora import save_adapter
        from tuneforge.run import adapter_base_name
        save_adapter(model, folder, base_model=adapter_base_name(cfg))
    else:
        model.save_pretrained(folder, safe_serialization=True)


def _chat_generation_records(cfg, data) -> list:
    """Held-out conversations to score by generation (instruction/chat data with eval.generate on)."""
    from tuneforge.data.records import as_chat
    return [as_chat(r) for r in data.eval_records] if cfg.eval.generate else []


def _preference_generation_records(cfg, data) -> list:
    """Held-out preference pairs as conversations whose reference answer is the chosen one: generation then
    shows whether the tuned model now writes what the ranking preferred (judged by the same scoring rules)."""
    from tuneforge.data.records import ChatRecord, Message
    if not cfg.eval.generate:
        return []
    return [ChatRecord(r.messages() + [Message("assistant", r.chosen)], r.source) for r in data.eval_records]


def _no_generation_records(cfg, data) -> list:
    return []


def _sft_objective(cfg, tokenizer=None):
    from tuneforge.objectives.sft import SFTObjective
    return SFTObjective()


def _clm_objective(cfg, tokenizer=None):
    from tuneforge.objectives.clm import CausalLMObjective
    return CausalLMObjective()


def _dpo_objective(cfg, tokenizer=None):
    from tuneforge.objectives.dpo import make_dpo
    return make_dpo(cfg)


def _dpo_reference(*args, **kwargs):
    from tuneforge.objectives.dpo import precompute_reference
    return precompute_reference(*args, **kwargs)


def _reward_objective(cfg, tokenizer=None):
    from tuneforge.objectives.reward import RewardObjective
    return RewardObjective(cfg.reward.center_coef)


def _reward_heads(cfg, model):
    from tuneforge.models.reward import make_reward_head
    return make_reward_head(cfg, model)


def _starting_model(cfg) -> Callable:
    """device -> the config's model as a run loads it, before any training: full fine-tuning's online RL
    reference on a resume (the checkpoint holds the tuned weights; the starting ones are model.name on disk)."""
    def load(device):
        from tuneforge.models.heads import TrainModule
        from tuneforge.run import load_model_and_tokenizer
        model, _ = load_model_and_tokenizer(cfg, device)
        return TrainModule(model)
    return load


def _online_rl_objective(algorithm: str) -> Callable:
    def build(cfg, tokenizer=None):
        from tuneforge.objectives.online_rl import make_online_rl
        if tokenizer is None:
            raise ValueError(f"method {algorithm} needs the tokenizer (stop tokens, decoding completions)")
        return make_online_rl(cfg, tokenizer, algorithm, reference_loader=_starting_model(cfg))
    return build


def _value_head(cfg, model):
    from tuneforge.objectives.online_rl import make_value_head
    return make_value_head(cfg, model)


def _prompt_batches(cfg, data, tokenizer):
    """Online RL: batches of prompt examples as they are (the objective samples, scores and packs the
    rollouts itself), the config's micro-batch shape."""
    keep = lambda examples: {"examples": list(examples)}  # noqa: E731
    return data.train, data.eval, keep, cfg.train


def _save_reward_model(cfg, module, tokenizer, folder: Path) -> None:
    """A transformers sequence-classification folder (LoRA merged into a copy of the base), plus the adapter
    and head under LoRA (models/reward.py)."""
    from tuneforge.models.reward import save_reward_model
    from tuneforge.run import adapter_base_name
    save_reward_model(module, tokenizer, folder, adapter_base_name(cfg), cfg.data.system_prompt)


def _evaluate_reward_model(cfg, data, model_dir: str) -> dict:
    """A saved reward model (a run's final/) on the held-out pairs the config builds."""
    from tuneforge.eval.reward import held_out_pairs, load_scorer
    return held_out_pairs(load_scorer(model_dir), data.eval, cfg.train.micro_batch_size)


def _contrastive_objective(cfg, tokenizer=None):
    from tuneforge.objectives.contrastive import make_contrastive
    return make_contrastive(cfg, tokenizer)


def _temperature_heads(cfg, model):
    from tuneforge.objectives.contrastive import temperature_heads
    return temperature_heads(cfg, model)


def _load_embedder(cfg, device):
    from tuneforge.models.embedder import load_embedder
    return load_embedder(cfg, device)


def _save_embedder(cfg, module, tokenizer, folder: Path) -> None:
    from tuneforge.models.embedder import save_embedder
    save_embedder(cfg, module, tokenizer, folder)


def _prefixes(cfg) -> dict:
    c = cfg.contrastive
    return {k: v for k, v in (("query_prefix", c.query_prefix), ("document_prefix", c.document_prefix)) if v}


def _pair_batches(cfg, data, tokenizer):
    """Contrastive: padded batches of pair examples, one sequence a row, with the pair texts (false negatives
    are found by text); the step's micro-batches together are the negative pool (objectives/contrastive.py)."""
    from tuneforge.data.collate import collate_sequences
    pad = tokenizer.pad_token_id
    keep = lambda examples: {**collate_sequences(examples, pad), "texts": [ex.texts for ex in examples]}  # noqa: E731
    return data.train, data.eval, keep, cfg.train


@dataclass(frozen=True)
class Method:
    builder: str  # data builder name
    objective: Callable  # (cfg, tokenizer) -> Objective
    generation_records: Callable  # (cfg, prepared data) -> held-out records scored by generation
    save: Callable  # (cfg, TrainModule, tokenizer, folder) -> None
    heads: Callable | None = None  # (cfg, model) -> {name: nn.Module}: extra heads trained with the model
    # (cfg, module, data, tokenizer, device, autocast, resume) -> data: a pass over the data before training
    # (DPO under full fine-tuning: the reference log-probs)
    before_fit: Callable | None = None
    # (cfg, prepared data, model_dir) -> held-out metrics: how `tuneforge eval --model DIR` scores a saved result
    # of a method whose result is not the config's model plus an adapter (a reward model: body and head)
    evaluate_saved: Callable | None = None
    # (cfg, prepared data, tokenizer) -> (train rows, eval rows, collate, train settings), in place of run.batching
    # (online RL: the loop hands over prompt examples, not token batches)
    batching: Callable | None = None
    # the saved result merges the adapter into the base (a reward model's classifier folder): the frozen base then
    # stays in model.dtype (lora.frozen_dtype auto), so the merge adds the adapter to the weights as loaded
    merges_base: bool = False
    # (cfg, device) -> (model, tokenizer) in place of the causal LM (an embedder: the bare AutoModel body)
    load: Callable | None = None
    lora_task_type: str = "CAUSAL_LM"  # PEFT's task type, recorded in the adapter's config
    # (cfg) -> {name: value}: settings of the method's section that change the tokens, handed to the data builder
    # (and part of the token cache's key): contrastive instruction prefixes
    builder_options: Callable | None = None

    @property
    def causal_lm(self) -> bool:
        """Whether the method's result is a causal language model (what forgetting's perplexity measures)."""
        return self.load is None and self.evaluate_saved is None

    def scores_generation(self, cfg) -> bool:
        """Whether this method, under this config, evaluates held-out answers by generation."""
        return bool(cfg.eval.generate) and self.generation_records is not _no_generation_records


METHODS: dict[str, Method] = {
    "clm": Method("text_blocks", _clm_objective, _no_generation_records, _save_causal_lm),
    "sft": Method("chat", _sft_objective, _chat_generation_records, _save_causal_lm),
    "dpo": Method("preference", _dpo_objective, _preference_generation_records, _save_causal_lm,
                  before_fit=_dpo_reference),
    "reward": Method("preference", _reward_objective, _no_generation_records, _save_reward_model,
                     heads=_reward_heads, evaluate_saved=_evaluate_reward_model, merges_base=True),
    "grpo": Method("prompt", _online_rl_objective("grpo"), _no_generation_records, _save_causal_lm,
                   batching=_prompt_batches),
    "rloo": Method("prompt", _online_rl_objective("rloo"), _no_generation_records, _save_causal_lm,
                   batching=_prompt_batches),
    "ppo": Method("prompt", _online_rl_objective("ppo"), _no_generation_records, _save_causal_lm,
                  heads=_value_head, batching=_prompt_batches),
    "contrastive": Method("pair", _contrastive_objective, _no_generation_records, _save_embedder,
                          heads=_temperature_heads, batching=_pair_batches, merges_base=True, load=_load_embedder,
                          lora_task_type="FEATURE_EXTRACTION", builder_options=_prefixes),
}


def method_of(cfg) -> Method:
    return METHODS[cfg.method]
