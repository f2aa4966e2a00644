"""Rewards for online RL (methods ppo, grpo, rloo): reward functions, a reward model, and their weighted sum.

A reward source is a tuneforge reward model (`rl.reward_model`, scored through `tuneforge.eval.reward.score`,
the one scoring path) or a Python function named "module:function" in `rl.reward_functions`, called as

    fn(prompts: list[str], completions: list[str], references: list[str | None], **args) -> list[float]

one number per sample. `references` are the prompt records' `reference` (or `answer`) fields, None where a
record has none. Why strict checks: a reward that is silently NaN, short by one, or a string turns the policy
gradient into noise many steps before anything visibly breaks, so every source's output is checked on every
call and a bad one stops the run naming the source and the first bad sample (`Rewards.__call__`).

Functions are imported before any model loads (`check_reward_sources`, for preflight): a mistyped module or
function name costs a second, not a model load. Modules are found on the Python path or in the current folder.

Shipped functions, `tuneforge.rl.rewards:NAME` (exact_answer, number_match, regex, output_format,
length_penalty) are documented one by one below. The answer-checking ones read the completion's answer: the
text inside its last `<answer>...</answer>` when it has one, else the whole completion. A sample without a
reference is an error for them, not a 0: a prompt file where some rows lack the answer is a data mistake that a
silent 0 would turn into a policy trained to fail on those prompts.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import importlib
import inspect
import math
import numbers
import os
import re
import sys
import unicodedata
from dataclasses import dataclass
from decimal import Decimal
from typing import Callable

import torch

from tuneforge.errors import ConfigError, TuneforgeError

RL_METHODS = ("ppo", "grpo", "rloo")
FLOAT32_MAX = float(torch.finfo(torch.float32).max)
RewardFn = Callable[[list[str], list[str], list], object]


class RewardError(TuneforgeError):
    """A reward source raised, or returned something that is not one finite number per sample."""


# ----------------------------------------------------------------------------------- sources and loading

@dataclass(frozen=True)
class RewardSource:
    """One source of the sum: `name` for logs ("number_match", "regex_2", "reward_model"), `label` for
    errors (the config entry and what it names), its weight, and the call (arguments already bound)."""

    name: str
    label: str
    weight: float
    fn: RewardFn


@contextlib.contextmanager
def _current_folder_importable():
    """`tuneforge train` runs as a console script, whose sys.path lacks the current folder: add it (last, so
    it never shadows an installed package) for the import, as `python -m` would."""
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.append(cwd)
    try:
        yield
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


def _import_function(spec_name: str, key: str):
    module_name, _, attr = spec_name.partition(":")
    try:
        with _current_folder_importable():
            module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise ConfigError(f"{spec_name}: no module named {exc.name!r} (looked on the Python path and in the "
                              f"current folder, {os.getcwd()})", key=key) from None
        raise ConfigError(f"{spec_name}: importing {module_name} failed: {exc}", key=key) from exc
    except Exception as exc:  # the user's module raised at import time: say so, with its message
        raise ConfigError(f"{spec_name}: importing {module_name} raised {type(exc).__name__}: {exc}",
                          key=key) from exc
    if not hasattr(module, attr):
        public = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
        near = difflib.get_close_matches(attr, public, n=1)
        hint = f"; did you mean {module_name}:{near[0]}?" if near else ""
        raise ConfigError(f"{spec_name}: module {module_name} ({getattr(module, '__file__', '?')}) has no "
                          f"{attr!r}{hint}", key=key)
    fn = getattr(module, attr)
    if not callable(fn):
        raise ConfigError(f"{spec_name} is a {type(fn).__name__}, not a function", key=key)
    return fn


def load_reward_function(spec, key: str) -> RewardFn:
    """The function an rl.reward_functions entry names, with its `args` bound, checked to be callable as
    fn(prompts, completions, references, **args) (and its arguments valid, for the shipped functions)."""
    fn = _import_function(spec.name, key)
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins have no signature: the first call will tell
        signature = None
    if signature is not None:
        try:
            signature.bind([], [], [], **spec.args)
        except TypeError as exc:
            raise ConfigError(f"{spec.name} cannot be called as fn(prompts, completions, references"
                              f"{', **args' if spec.args else ''}) with args {spec.args}: {exc}", key=key) from None
    check = getattr(fn, "validate_args", None)
    if check is not None:
        try:
            check(**spec.args)
        except (ValueError, TypeError, re.error) as exc:
            raise ConfigError(f"{spec.name}: bad args {spec.args}: {exc}", key=key) from None
    return functools.partial(fn, **spec.args) if spec.args else fn


def load_reward_functions(specs, key: str = "rl.reward_functions", what: str = "reward function"
                          ) -> list[RewardSource]:
    """One RewardSource per entry of the list at config `key` (rl.reward_functions; eval.metrics, whose
    scoring functions share the contract); a name used twice gets _2, _3 in the logs."""
    sources, seen = [], {}
    for i, spec in enumerate(specs):
        entry = f"{key}.{i}"
        fn = load_reward_function(spec, entry)
        base = spec.name.partition(":")[2]
        seen[base] = seen.get(base, 0) + 1
        name = base if seen[base] == 1 else f"{base}_{seen[base]}"
        sources.append(RewardSource(name, f"{what} {spec.name} ({entry})", spec.weight, fn))
    return sources


def check_reward_sources(cfg) -> None:
    """Preflight for the RL methods, before any model loads: at least one reward source; every function
    importable and callable with its args; the reward model a sequence-classifier folder. ConfigError names
    the key. `cfg` is a RunConfig (anything with `.method` and `.rl`)."""
    from tuneforge.eval.reward import reward_folder
    rl = cfg.rl
    if cfg.method in RL_METHODS and not rl.reward_model and not rl.reward_functions:
        raise ConfigError(f"method {cfg.method} needs a reward: set rl.reward_model (the final/ of a "
                          "`method: reward` run) or rl.reward_functions (e.g. [tuneforge.rl.rewards:number_match])",
                          key="rl.reward_functions")
    load_reward_functions(rl.reward_functions)
    if rl.reward_model:
        try:
            reward_folder(rl.reward_model)
        except TuneforgeError as exc:
            raise ConfigError(str(exc), key="rl.reward_model") from None


# ------------------------------------------------------------------------------------- the weighted sum

@dataclass
class RewardBatch:
    """`total` (N,) float32: the weighted sum; `per_source` name -> (N,) float32, unweighted."""

    total: torch.Tensor
    per_source: dict[str, torch.Tensor]

    def metrics(self, prefix: str = "reward/") -> dict[str, float]:
        """Mean of each source (unweighted) and of the total, for the logs."""
        out = {f"{prefix}{name}": values.mean().item() for name, values in self.per_source.items()}
        out[f"{prefix}total"] = self.total.mean().item()
        return out


def _short(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _sample(i: int, prompts: list[str], completions: list[str]) -> str:
    return f"sample {i} (prompt {_short(prompts[i])}, completion {_short(completions[i])})"


def _first_failing(source: RewardSource, prompts, completions, references) -> str:
    """Where a raising source raises: it is called on one sample at a time (only on this error path)."""
    for i in range(len(prompts)):
        try:
            source.fn(prompts[i:i + 1], completions[i:i + 1], references[i:i + 1])
        except Exception as exc:  # noqa: BLE001 - any exception of user code is the answer sought
            return f"first failing {_sample(i, prompts, completions)}: {type(exc).__name__}: {exc}"
    return "no sample fails alone (the batch as a whole does); first " + _sample(0, prompts, completions)


def _checked(source: RewardSource, values, prompts: list[str], completions: list[str]) -> list[float]:
    """`values` as N finite floats, or RewardError naming the source and the first bad sample."""
    n = len(prompts)
    if hasattr(values, "tolist") and not isinstance(values, (list, tuple)):  # numpy arrays, tensors
        values = values.tolist()
    if not isinstance(values, (list, tuple)):
        raise RewardError(f"{source.label} returned a {type(values).__name__}, not a list of {n} numbers "
                          f"(one per sample)")
    if len(values) != n:
        raise RewardError(f"{source.label} returned {len(values)} values for {n} samples (one per sample); "
                          f"first {_sample(0, prompts, completions)}")
    out = []
    for i, value in enumerate(values):
        if not isinstance(value, (numbers.Real, Decimal)):
            raise RewardError(f"{source.label} returned {value!r} ({type(value).__name__}, not a number) for "
                              f"{_sample(i, prompts, completions)}")
        value = float(value)
        if not math.isfinite(value) or abs(value) > FLOAT32_MAX:
            what = value if not math.isfinite(value) else f"{value:g}, beyond float32"
            raise RewardError(f"{source.label} returned {what} for {_sample(i, prompts, completions)}")
        out.append(value)
    return out


class Rewards:
    """The reward of a batch of rollouts: the weighted sum of its sources, with each source's values kept for
    the logs. `Rewards.from_config(cfg.rl)` builds it; `rewards(prompts, completions, references)` scores."""

    def __init__(self, sources: list[RewardSource]):
        if not sources:
            raise TuneforgeError("no reward source: set rl.reward_model or rl.reward_functions")
        self.sources = list(sources)

    @classmethod
    def from_config(cls, rl, device: str | torch.device | None = None, batch_size: int = 8) -> Rewards:
        """The sources of an RLSection: its functions in order, then the reward model (scored in batches of
        `batch_size` on `device` through tuneforge.eval.reward.score)."""
        sources = load_reward_functions(rl.reward_functions)
        if rl.reward_model:
            sources.append(reward_model_source(rl.reward_model, rl.reward_model_weight, device, batch_size))
        return cls(sources)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sources]

    def __call__(self, prompts: list[str], completions: list[str],
                 references: list[str | None] | None = None) -> RewardBatch:
        prompts, completions = list(prompts), list(completions)
        references = [None] * len(prompts) if references is None else list(references)
        if not len(prompts) == len(completions) == len(references):
            raise TuneforgeError(f"rewards: {len(prompts)} prompts, {len(completions)} completions and "
                                 f"{len(references)} references; expected one of each per sample")
        total = torch.zeros(len(prompts), dtype=torch.float64)
        per_source = {}
        for source in self.sources:
            values = self._call(source, prompts, completions, references)
            per_source[source.name] = torch.tensor(values, dtype=torch.float32)
            total += source.weight * torch.tensor(values, dtype=torch.float64)
        return RewardBatch(total.to(torch.float32), per_source)

    @staticmethod
    def _call(source: RewardSource, prompts, completions, references) -> list[float]:
        if not prompts:
            return []
        try:
            values = source.fn(list(prompts), list(completions), list(references))  # copies: fn may mutate
        except Exception as exc:  # noqa: BLE001 - a user function may raise anything; name it and the sample
            where = _first_failing(source, prompts, completions, references)
            raise RewardError(f"{source.label} raised {type(exc).__name__}: {exc}; {where}") from exc
        return _checked(source, values, prompts, completions)


def reward_model_source(model_dir: str, weight: float = 1.0, device: str | torch.device | None = None,
                        batch_size: int = 8) -> RewardSource:
    """The reward model as a source: rewards of (prompt, completion) from score(), references unused."""
    from tuneforge.eval import reward as reward_eval

    def fn(prompts, completions, references):
        return reward_eval.score(model_dir, prompts, completions, batch_size,
                                 None if device is None else str(device))
    return RewardSource("reward_model", f"reward model {model_dir} (rl.reward_model)", weight, fn)


# --------------------------------------------------------------------------------- shipped functions

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
# A number: optional sign (not after a letter or digit, so "5-3" ends with 3, not -3), digits with optional
# thousands commas in groups of 3 ("1,234,567"), optional decimals; or a bare ".5". The minus may be U+2212.
_NUMBER = re.compile(r"(?<![\w.])[-+\u2212]?(?:\d{1,3}(?:,\d{3})+(?![\d,])|\d+)(?:\.\d+)?"
                     r"|(?<![\w.])[-+\u2212]?\.\d+")


def answer_text(completion: str) -> str:
    """The answer part of a completion: inside its last <answer>...</answer>, else the whole completion."""
    tagged = _ANSWER_TAG.findall(completion)
    return tagged[-1] if tagged else completion


def normalise_answer(text: str) -> str:
    """Unicode NFKC, case-folded, whitespace collapsed, surrounding quotes and final . ! ? , ; : dropped."""
    text = " ".join(unicodedata.normalize("NFKC", text).casefold().split())
    return text.strip("\"'`").rstrip(".!?,;:").strip().strip("\"'`")


def last_number(text: str) -> Decimal | None:
    """The last number written in `text` (commas of thousands, signs, decimals), exact, or None."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    return Decimal(found[-1].replace(",", "").replace("\u2212", "-"))


def _reference(reference, function: str) -> str:
    if reference is None:
        raise TuneforgeError(f"{function} compares with the reference answer, and this sample has none: give "
                             "every prompt record a `reference` (or `answer`) field (data.fields maps another name)")
    return reference


def exact_answer(prompts: list[str], completions: list[str], references: list[str | None]) -> list[float]:
    """1.0 where the completion's answer equals the reference after normalise_answer (case, spacing, final
    punctuation, quotes), else 0.0. "The answer is 4" does not equal "4": ask for <answer> tags."""
    return [float(normalise_answer(answer_text(c)) == normalise_answer(_reference(r, "exact_answer")))
            for c, r in zip(completions, references)]


def number_match(prompts: list[str], completions: list[str], references: list[str | None]) -> list[float]:
    """1.0 where the last number of the completion's answer equals the reference's last number as a
    value ("1,000" == "1000.0", "-3" != "3"), else 0.0 (also when the completion has no number). A
    reference without a number is an error: such a sample could never be rewarded."""
    out = []
    for completion, reference in zip(completions, references):
        expected = last_number(_reference(reference, "number_match"))
        if expected is None:
            raise TuneforgeError(f"number_match: the reference {_short(reference)} holds no number")
        out.append(float(last_number(answer_text(completion)) == expected))
    return out


def regex(prompts: list[str], completions: list[str], references: list[str | None], *, pattern: str,
          ignore_case: bool = False) -> list[float]:
    """1.0 where `pattern` (a Python regular expression) is found anywhere in the completion, else 0.0.
    Anchor it (^...$) to match the whole completion; `ignore_case` for case-insensitive matching."""
    compiled = re.compile(pattern, re.IGNORECASE if ignore_case else 0)
    return [float(compiled.search(c) is not None) for c in completions]


def _regex_args(pattern: str, ignore_case: bool = False) -> None:
    if not isinstance(pattern, str) or not pattern:
        raise ValueError("pattern must be a non-empty string")
    re.compile(pattern)


def output_format(prompts: list[str], completions: list[str], references: list[str | None], *,
                  tag: str = "answer", pattern: str | None = None) -> list[float]:
    """1.0 where the completion is well formed, else 0.0. By default: exactly one <tag>...</tag> block
    (tag "answer"), with something other than spaces inside, and nothing but spaces after it; text before it
    (reasoning) is free. With `pattern`: the whole completion, stripped of surrounding spaces, must match the
    regular expression (re.fullmatch, "." matching newlines too)."""
    if pattern is not None:
        compiled = re.compile(pattern, re.DOTALL)
        return [float(compiled.fullmatch(c.strip()) is not None) for c in completions]
    opening, closing = f"<{tag}>", f"</{tag}>"
    block = re.compile(re.escape(opening) + r"(.*?)" + re.escape(closing) + r"\s*\Z", re.DOTALL)
    out = []
    for c in completions:
        found = block.search(c)
        out.append(float(found is not None and c.count(opening) == 1 and c.count(closing) == 1
                         and found.group(1).strip() != ""))
    return out


def _format_args(tag: str = "answer", pattern: str | None = None) -> None:
    if not isinstance(tag, str) or not re.fullmatch(r"[A-Za-z][\w-]*", tag):
        raise ValueError(f"tag {tag!r} must be a tag name such as answer")
    if pattern is not None:
        re.compile(pattern)


def length_penalty(prompts: list[str], completions: list[str], references: list[str | None], *,
                   max_chars: int, per_char: float = 0.01) -> list[float]:
    """-per_char for each character of the completion beyond max_chars, else 0.0: a cost on rambling.
    Characters, not tokens, so the penalty does not depend on the policy's tokenizer (and needs none)."""
    return [-per_char * max(0, len(c) - max_chars) for c in completions]


def _length_args(max_chars: int, per_char: float = 0.01) -> None:
    if not isinstance(max_chars, int) or isinstance(max_chars, bool) or max_chars < 0:
        raise ValueError(f"max_chars must be a whole number >= 0, not {max_chars!r}")
    if not isinstance(per_char, numbers.Real) or not math.isfinite(per_char) or per_char < 0:
        raise ValueError(f"per_char must be a finite number >= 0, not {per_char!r}")


# checked when the config is loaded (load_reward_function), so a bad pattern fails before any model loads
regex.validate_args = _regex_args
output_format.validate_args = _format_args
length_penalty.validate_args = _length_args
