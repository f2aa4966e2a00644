"""Continued pre-training: next-token loss on every token of fixed-length blocks of raw text.

The maths is SFT's with an all-ones mask; the difference is the data (documents joined by the document
separator into blocks, see data/dataset.py). Kept as its own objective so the two can diverge (e.g. a
replay mix of general data to limit forgetting).
"""

from __future__ import annotations

from tuneforge.objectives.sft import SFTObjective


class CausalLMObjective(SFTObjective):
    unit = "tokens"
