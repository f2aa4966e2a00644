"""Objectives: each method contributes only its mathematics. See base.py for the contract with the loop;
methods.py maps each method to its objective."""

from tuneforge.objectives.base import LossOutput, Objective
from tuneforge.objectives.clm import CausalLMObjective
from tuneforge.objectives.sft import SFTObjective

__all__ = ["LossOutput", "Objective", "CausalLMObjective", "SFTObjective"]
