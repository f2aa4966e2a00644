"""Evaluation: held-out loss/perplexity (in the loop), task accuracy by generation, reports."""
