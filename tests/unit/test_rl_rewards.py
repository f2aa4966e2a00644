"""Rewards for online RL (tuneforge/rl/rewards.py): the shipped functions on hand-picked cases, the weighted sum,
every failure mode's message, user functions named "module:function", config checks, and a reward model scored
through Rewards equal to tuneforge.eval.reward.score()."""

from __future__ import annotations

import math
import sys
import textwrap
from decimal import Decimal
from types import SimpleNamespace

import pytest
import torch

from tuneforge.config.load import config_from_dict
from tuneforge.config.schema import RewardFunctionSpec, RLSection
from tuneforge.errors import ConfigError, TuneforgeError
from tuneforge.rl import rewards as R
from tuneforge.rl.rewards import RewardError, Rewards, check_reward_sources, load_reward_functions

SHIPPED = "tuneforge.rl.rewards"


def call(fn, completions, references=None, **args):
    references = [None] * len(completions) if references is None else references
    return fn(["p"] * len(completions), completions, references, **args)


def rewards_of(*entries, reward_model=None) -> Rewards:
    return Rewards.from_config(RLSection(reward_functions=list(entries), reward_model=reward_model))


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """write(name, source): a module file in tmp_path, importable by name for this test only."""
    monkeypatch.syspath_prepend(str(tmp_path))
    written = []

    def write(name: str, source: str) -> str:
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        written.append(name)
        return name
    yield write
    for name in written:
        sys.modules.pop(name, None)


# ----------------------------------------------------------------------------------------- shipped functions

def test_exact_answer_normalises_case_space_and_final_punctuation():
    completions = ["Paris", "  paris. ", "PARIS!", '"Paris"', "New   York", "The answer is Paris",
                   "I think <answer> Paris </answer>", "<answer>Lyon</answer> or Paris", "Pariss", ""]
    refs = ["Paris", "Paris", "paris", "Paris", "new york", "Paris", "Paris", "Paris", "Paris", "Paris"]
    assert call(R.exact_answer, completions, refs) == [1, 1, 1, 1, 1, 0, 1, 0, 0, 0]


@pytest.mark.parametrize("completion, reference, expected", [
    ("The answer is 1,234.", "1234", 1.0),          # thousands commas, the final full stop is not a decimal point
    ("so 1234", "1,234", 1.0),
    ("It costs $1,000.50", "1000.5", 1.0),           # decimals compare as values
    ("3.50", "3.5", 1.0),
    ("5", "5.0", 1.0),
    ("-3", "3", 0.0),                                # signs count
    ("x = -3", "-3", 1.0),
    ("\u22127 degrees", "-7", 1.0),                  # the Unicode minus sign
    ("5-3 leaves 2", "2", 1.0),                       # the LAST number
    ("5-3", "-3", 0.0),                               # a hyphen after a digit is not a sign
    ("2 apples, then 3", "2", 0.0),
    ("<answer>7</answer> since 8 > 7, not 8", "7", 1.0),  # the tagged answer wins over later numbers
    ("no number here", "4", 0.0),
    ("abc123", "123", 0.0),                            # digits glued to a word are not a number
    (".5 of it", "0.5", 1.0),
    ("Natalia sold 72 clips", "She sold 48 + 24 = 72 clips.\n#### 72", 1.0),  # GSM8K-style reference
])
def test_number_match(completion, reference, expected):
    assert call(R.number_match, [completion], [reference]) == [expected]


def test_last_number_is_exact():
    assert R.last_number("0.1 + 0.2 = 0.3") == Decimal("0.3")
    assert R.last_number("1,234,567 or 12,34") == Decimal(34)  # "12,34" is not a thousands group
    assert R.last_number("nothing") is None


def test_regex_output_format_length_penalty():
    assert call(R.regex, ["yes, sure", "Yes", "no"], pattern=r"^yes") == [1, 0, 0]
    assert call(R.regex, ["yes, sure", "Yes", "no"], pattern=r"^yes", ignore_case=True) == [1, 1, 0]
    assert call(R.output_format, [
        "<think>2+2</think>\n<answer>4</answer>\n",     # reasoning before, spaces after: fine
        "<answer>4</answer>",
        "<answer>  </answer>",                            # empty answer
        "<answer>4</answer> and more",                    # text after the answer
        "<answer>4</answer><answer>5</answer>",           # two answers
        "<answer>4",                                      # unclosed
        "4",
    ]) == [1, 1, 0, 0, 0, 0, 0]
    assert call(R.output_format, ["<final>x</final>", "<answer>x</answer>"], tag="final") == [1, 0]
    assert call(R.output_format, [" A\n", "A because", "B"], pattern=r"[AB]") == [1, 0, 1]  # whole answer
    assert call(R.length_penalty, ["abc", "abcde", "abcdefgh"], max_chars=5, per_char=0.5) == [0, 0, -1.5]


def test_answer_checks_need_a_reference():
    rewards = rewards_of(f"{SHIPPED}:number_match")
    with pytest.raises(RewardError) as err:
        rewards(["q0", "q1"], ["1", "2"], ["1", None])
    message = str(err.value)
    assert f"reward function {SHIPPED}:number_match (rl.reward_functions.0)" in message
    assert "sample 1 (prompt 'q1', completion '2')" in message and "`reference` (or `answer`) field" in message
    with pytest.raises(RewardError, match="reference 'four' holds no number"):
        rewards(["q"], ["4"], ["four"])
    with pytest.raises(RewardError, match="exact_answer compares with the reference answer"):
        rewards_of(f"{SHIPPED}:exact_answer")(["q"], ["4"])


# ------------------------------------------------------------------------------------------ the weighted sum

def test_weighted_sum_and_per_source_values(user_module):
    user_module("my_rewards", """
        def brevity(prompts, completions, references, scale=1.0):
            return [scale * len(c) for c in completions]
    """)
    rewards = rewards_of(f"{SHIPPED}:number_match",
                         {"name": "my_rewards:brevity", "weight": -0.5, "args": {"scale": 2.0}},
                         {"name": f"{SHIPPED}:regex", "weight": 3.0, "args": {"pattern": "7"}},
                         {"name": f"{SHIPPED}:regex", "weight": 0.0, "args": {"pattern": "x"}})
    assert rewards.names == ["number_match", "brevity", "regex", "regex_2"]
    out = rewards(["a", "b", "c"], ["7", "x 8", "<answer>8</answer>"], ["7", "8", "9"])
    expected = {"number_match": [1, 1, 0], "brevity": [2, 6, 36], "regex": [1, 0, 0], "regex_2": [0, 1, 0]}
    assert {k: v.tolist() for k, v in out.per_source.items()} == expected
    assert out.total.dtype == torch.float32 and all(v.dtype == torch.float32 for v in out.per_source.values())
    assert out.total.tolist() == [1 - 1 + 3, 1 - 3 + 0, 0 - 18 + 0]
    metrics = out.metrics()
    assert metrics["reward/brevity"] == pytest.approx(44 / 3) and metrics["reward/total"] == pytest.approx(-17 / 3)
    assert set(metrics) == {"reward/number_match", "reward/brevity", "reward/regex", "reward/regex_2",
                            "reward/total"}


def test_user_function_returning_numpy_or_tensor(user_module):
    user_module("vector_rewards", """
        import numpy as np
        import torch
        def as_numpy(prompts, completions, references):
            return np.ones(len(completions), dtype=np.float32)
        def as_tensor(prompts, completions, references):
            return torch.full((len(completions),), 2.0)
    """)
    out = rewards_of("vector_rewards:as_numpy", "vector_rewards:as_tensor")(["a", "b"], ["x", "y"])
    assert out.total.tolist() == [3.0, 3.0]


def test_functions_are_imported_from_the_current_folder(tmp_path, monkeypatch):
    """`tuneforge train` is a console script: its sys.path lacks the current folder, where users keep rewards."""
    (tmp_path / "rewards_here.py").write_text("def one(p, c, r):\n    return [1.0] * len(c)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    try:
        assert rewards_of("rewards_here:one")(["a"], ["b"]).total.tolist() == [1.0]
        assert str(tmp_path) not in sys.path  # only for the import
    finally:
        sys.modules.pop("rewards_here", None)


# ----------------------------------------------------------------------------- a bad reward stops the run

BAD_FUNCTIONS = """
    def raises_on_second(prompts, completions, references):
        return [1.0 / (c != "boom") for c in completions]
    def short(prompts, completions, references):
        return [0.0] * (len(completions) - 1)
    def text(prompts, completions, references):
        return [0.0, "high", 1.0][:len(completions)]
    def nan(prompts, completions, references):
        return [0.0, 1.0, float("nan")][:len(completions)]
    def inf(prompts, completions, references):
        return [0.0, -float("inf"), 1.0][:len(completions)]
    def huge(prompts, completions, references):
        return [1e39, 0.0, 0.0][:len(completions)]
    def one_number(prompts, completions, references):
        return 1.0
    def none_values(prompts, completions, references):
        return [None] * len(completions)
    def batch_only(prompts, completions, references):
        if len(completions) > 1:
            raise RuntimeError("batch too big")
        return [0.0]
"""


@pytest.mark.parametrize("name, message", [
    ("raises_on_second", "raised ZeroDivisionError: float division by zero; first failing sample 1 "
                         "(prompt 'Q1', completion 'boom'): ZeroDivisionError"),
    ("short", "returned 2 values for 3 samples (one per sample); first sample 0 (prompt 'Q0'"),
    ("text", "returned 'high' (str, not a number) for sample 1 (prompt 'Q1', completion 'boom')"),
    ("nan", "returned nan for sample 2 (prompt 'Q2', completion 'ok')"),
    ("inf", "returned -inf for sample 1 (prompt 'Q1', completion 'boom')"),
    ("huge", "returned 1e+39, beyond float32 for sample 0"),
    ("one_number", "returned a float, not a list of 3 numbers"),
    ("none_values", "returned None (NoneType, not a number) for sample 0"),
    ("batch_only", "raised RuntimeError: batch too big; no sample fails alone"),
])
def test_bad_rewards_name_the_function_and_the_first_bad_sample(user_module, name, message):
    user_module("bad_rewards", BAD_FUNCTIONS)
    rewards = rewards_of({"name": f"{SHIPPED}:regex", "args": {"pattern": "o"}},
                         f"bad_rewards:{name}")
    with pytest.raises(RewardError) as err:
        rewards(["Q0", "Q1", "Q2"], ["fine", "boom", "ok"])
    assert f"reward function bad_rewards:{name} (rl.reward_functions.1) " in str(err.value)
    assert message in str(err.value)


def test_long_samples_are_shortened_in_messages(user_module):
    user_module("bad_long", "def nan(p, c, r):\n    return [float('nan')] * len(c)\n")
    with pytest.raises(RewardError) as err:
        rewards_of("bad_long:nan")(["P" * 500], ["C" * 500])
    assert f"prompt '{'P' * 60}...', completion '{'C' * 60}...'" in str(err.value) and "P" * 61 not in str(err.value)


def test_reward_model_errors_are_named_like_functions(monkeypatch, trained_reward_model):
    from tuneforge.eval import reward as reward_eval
    rewards = rewards_of(reward_model=str(trained_reward_model))
    monkeypatch.setattr(reward_eval, "score", lambda d, p, r, b, dev: [0.0, math.nan])
    with pytest.raises(RewardError, match=r"reward model .* \(rl.reward_model\) returned nan for sample 1 "
                                          r"\(prompt 'b', completion 'y'\)"):
        rewards(["a", "b"], ["x", "y"])


# -------------------------------------------------------------------------------------- config and loading

def test_config_entries_strings_or_mappings():
    rl = RLSection(reward_functions=[f"{SHIPPED}:exact_answer",
                                     {"name": f"{SHIPPED}:regex", "weight": 0.5, "args": {"pattern": "a"}}])
    assert rl.reward_functions == [RewardFunctionSpec(name=f"{SHIPPED}:exact_answer"),
                                   RewardFunctionSpec(name=f"{SHIPPED}:regex", weight=0.5, args={"pattern": "a"})]
    assert RLSection(reward_functions=f"{SHIPPED}:exact_answer").reward_functions[0].weight == 1.0  # one, no list
    assert RLSection.model_validate(rl.model_dump()) == rl  # a saved config reads back


@pytest.mark.parametrize("rl, key, message", [
    ({"reward_functions": ["exact_answer"]}, "rl.reward_functions.0.name", "is not \"module:function\""),
    ({"reward_functions": ["a.b:c", {"name": "m:f", "wieght": 2}]}, "rl.reward_functions.1.wieght",
     "unknown key (did you mean rl.reward_functions.1.weight?)"),
    ({"reward_functions": [{"name": "m:f", "weight": "nan"}]}, "rl.reward_functions.0.weight", "finite"),
    ({"reward_model_weight": float("inf")}, "rl.reward_model_weight", "finite"),
])
def test_config_errors_name_the_key(rl, key, message):
    with pytest.raises(ConfigError) as err:
        config_from_dict({"method": "sft", "rl": rl})
    assert f"key {key}" in str(err.value) and message in str(err.value)


def test_rl_methods_need_a_reward_source():
    with pytest.raises(ConfigError, match="key rl.reward_functions: method grpo needs a reward: set rl.reward_model"):
        check_reward_sources(SimpleNamespace(method="grpo", rl=RLSection()))
    check_reward_sources(SimpleNamespace(method="sft", rl=RLSection()))  # other methods read no rewards
    check_reward_sources(SimpleNamespace(method="ppo", rl=RLSection(reward_functions=[f"{SHIPPED}:number_match"])))


@pytest.mark.parametrize("entry, message", [
    ("no_such_module_xyz:f", "no_such_module_xyz:f: no module named 'no_such_module_xyz' (looked on the Python path"),
    ("user_rw:brevty", "has no 'brevty'; did you mean user_rw:brevity?"),
    ("user_rw:LIMIT", "user_rw:LIMIT is a int, not a function"),
    ("user_rw:two_args", "cannot be called as fn(prompts, completions, references)"),
    ("broken_rw:f", "importing broken_rw raised KeyError"),
    ("imports_missing_rw:f", "importing imports_missing_rw failed: No module named 'not_installed_dep'"),
    ({"name": "user_rw:brevity", "args": {"scal": 2}}, "got an unexpected keyword argument 'scal'"),
    ({"name": f"{SHIPPED}:regex"}, "missing a required argument: 'pattern'"),
    ({"name": f"{SHIPPED}:regex", "args": {"pattern": "(unclosed"}}, "bad args {'pattern': '(unclosed'}"),
    ({"name": f"{SHIPPED}:output_format", "args": {"tag": "<answer>"}}, "must be a tag name"),
    ({"name": f"{SHIPPED}:length_penalty", "args": {"max_chars": -1}}, "max_chars must be a whole number >= 0"),
    ({"name": f"{SHIPPED}:length_penalty", "args": {"max_chars": 5, "per_char": -1}}, "per_char must be"),
])
def test_loading_errors_name_the_entry_before_any_model_loads(user_module, entry, message):
    user_module("user_rw", """
        LIMIT = 3
        def brevity(prompts, completions, references, scale=1.0):
            return [scale * len(c) for c in completions]
        def two_args(prompts, completions):
            return [0.0] * len(completions)
    """)
    user_module("broken_rw", "raise KeyError('at import')\n")
    user_module("imports_missing_rw", "import not_installed_dep\n")
    rl = RLSection(reward_functions=[f"{SHIPPED}:exact_answer", entry])
    with pytest.raises(ConfigError) as err:
        check_reward_sources(SimpleNamespace(method="grpo", rl=rl))
    assert "key rl.reward_functions.1: " in str(err.value) and message in str(err.value)


def test_reward_model_must_be_a_reward_model_folder(tmp_path, tiny_model_dir):
    def check(path):
        check_reward_sources(SimpleNamespace(method="ppo", rl=RLSection(reward_model=str(path))))
    with pytest.raises(ConfigError, match="key rl.reward_model: .*no config.json"):
        check(tmp_path / "missing")
    # a causal LM folder would load as a classifier with a random head: refused
    with pytest.raises(ConfigError, match="key rl.reward_model: .*LlamaForCausalLM.*not a \\*ForSequenceClass"):
        check(tiny_model_dir)


# ---------------------------------------------------------------------------------------- the reward model

@pytest.fixture(scope="module")
def trained_reward_model(tmp_path_factory, tiny_model_dir):
    from helpers.runs import method_config
    from tuneforge.run import train
    tmp = tmp_path_factory.mktemp("rl_reward_model")
    cfg = method_config("reward", tiny_model_dir, tmp / "data", tmp / "run", max_steps=3)
    train(cfg)
    return tmp / "run" / "final"


def test_reward_model_through_rewards_equals_score(trained_reward_model):
    from tuneforge.eval.reward import score
    prompts = ["Add 2 and 3.", "Add 1 and 1.", "Add 4 and 4.", "Add 9 and 0.", "Add 5 and 2."]
    completions = ["5", "The sum is 2.", "9", "The sum is 9.", "seven"]
    expected = torch.tensor(score(trained_reward_model, prompts, completions), dtype=torch.float32)
    check_reward_sources(SimpleNamespace(method="ppo", rl=RLSection(reward_model=str(trained_reward_model))))
    rl = RLSection(reward_model=str(trained_reward_model), reward_model_weight=2.0,
                   reward_functions=[f"{SHIPPED}:number_match"])
    rewards = Rewards.from_config(rl, batch_size=2)  # batches of 2 (one of 1): the same numbers
    out = rewards(prompts, completions, ["5", "2", "8", "9", "7"])
    assert rewards.names == ["number_match", "reward_model"]
    torch.testing.assert_close(out.per_source["reward_model"], expected, rtol=1e-5, atol=1e-5)
    assert len(set(expected.tolist())) > 1  # a trained, not constant, reward
    torch.testing.assert_close(out.total, torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0]) + 2 * expected)


def test_load_reward_functions_names():
    sources = load_reward_functions(RLSection(reward_functions=[f"{SHIPPED}:exact_answer"]).reward_functions)
    assert [(s.name, s.weight, s.label) for s in sources] == [
        ("exact_answer", 1.0, f"reward function {SHIPPED}:exact_answer (rl.reward_functions.0)")]


def test_caller_mistakes_are_clear_errors():
    assert issubclass(RewardError, TuneforgeError)  # the command line prints it as one line, no traceback
    rewards = rewards_of({"name": f"{SHIPPED}:regex", "args": {"pattern": "a"}})
    with pytest.raises(TuneforgeError, match="2 prompts, 1 completions and 2 references"):
        rewards(["a", "b"], ["a"], ["x", "y"])
    empty = rewards([], [], [])
    assert empty.total.shape == (0,) and empty.total.dtype == torch.float32
    with pytest.raises(TuneforgeError, match="no reward source"):
        Rewards([])
