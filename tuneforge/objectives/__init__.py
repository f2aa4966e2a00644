"""Objectives: each method contributes only its mathematics. See base.py for the contract with the loop."""

from tuneforge.objectives.base import LossOutput, Objective, StepOutput
from tuneforge.objectives.clm import CausalLMObjective
from tuneforge.objectives.sft import SFTObjective

OBJECTIVES: dict[str, type[Objective]] = {
    "clm": CausalLMObjective,
    "sft": SFTObjective,
}


def make_objective(method: str, **kwargs) -> Objective:
    return OBJECTIVES[method](**kwargs)


__all__ = ["LossOutput", "Objective", "StepOutput", "OBJECTIVES", "make_objective"]
