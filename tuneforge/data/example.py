"""A training example made of several named token sequences (preference: chosen and rejected; contrastive:
anchor, positive, negatives; RL: one prompt), and the per-example text a method needs later.

Single-sequence data (clm blocks, sft conversations) stays a plain `TokenizedExample`; this type is what the
preference, pair and prompt builders produce, what the token cache returns for them, and what the collators
turn into batches with per-sequence bookkeeping.
"""

from __future__ import annotations

from dataclasses import dataclass

from tuneforge.data.chat import TokenizedExample
from tuneforge.data.records import Source


@dataclass
class Example:
    sequences: list[TokenizedExample]
    roles: list[int]
    """Role id of each sequence: an index into `role_names`."""
    role_names: tuple[str, ...]
    """The builder's fixed role order (preference: ("chosen", "rejected")), the same for every example."""
    texts: dict | None = None
    """Text kept for later (a prompt's reference answer, the pair texts for false-negative masking)."""
    source: Source | None = None
    shared_prefix: int = 0
    """Leading tokens that every sequence starts with, unsupervised in all (a preference pair's prompt): a packed
    row under tuneforge_varlen attention holds them once (data/packing.py)."""

    def __len__(self) -> int:
        """Total tokens over all sequences: what a packed row must hold for this example unshared."""
        return sum(len(s.input_ids) for s in self.sequences)

    def packed_length(self, share_prompt: bool) -> int:
        """Tokens this example takes in a packed row: all of them, or with the shared prefix counted once."""
        return len(self) - (self.shared_prefix * (len(self.sequences) - 1) if share_prompt else 0)

    def role(self, k: int) -> str:
        return self.role_names[self.roles[k]]

    def all(self, role: str) -> list[TokenizedExample]:
        """Every sequence of one role, in order (a pair's negatives)."""
        return [s for s, r in zip(self.sequences, self.roles) if self.role_names[r] == role]

    def __getitem__(self, role: str) -> TokenizedExample:
        """The first sequence of one role: `example["chosen"]`."""
        found = self.all(role)
        if not found:
            names = [self.role(k) for k in range(len(self.roles))]
            raise KeyError(f"no {role!r} sequence in this example (roles: {names})")
        return found[0]
