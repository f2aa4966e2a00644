"""Shared tensor math for the objectives: target selection and the masked next-token loss.

The output projection is applied only where a loss is needed: for SFT most positions are prompt tokens,
and a full (B, T, V) float32 logits tensor for a 49k vocabulary costs gigabytes (see logprobs.py). The
projection runs inside the TrainModule's forward (models/heads.py), so data-parallel wrappers see it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tuneforge.models.heads import as_train_module, unwrap  # (unwrap: also used by run.py, tests)
from tuneforge.objectives.logprobs import fused_nll_sum


def supervised_positions(batch: dict):
    """How a batch's N supervised tokens are read: (at, predictors). `at(x)` takes a per-token (B, T) tensor to
    (N,) at those tokens; `predictors(hidden)` takes hidden states (B, T, H) to the (N, H) states predicting
    them: the previous column (one boolean selection), or, where a packed row shares a preference pair's prompt,
    `predictor_index` (data/packing.py: the rejected answer's first token is predicted from the prompt's end)."""
    if "predictor_index" in batch:
        flat, index = batch["loss_mask"].flatten().bool(), batch["predictor_index"]
        return (lambda x: x.flatten()[flat]), (lambda hidden: hidden.reshape(-1, hidden.shape[-1])[index])
    select = batch["loss_mask"][:, 1:].bool()  # (B, T-1)
    return (lambda x: x[:, 1:][select]), (lambda hidden: hidden[:, :-1][select])


def forward(module, batch: dict, head_fn):
    """One forward of the (possibly data-parallel) TrainModule with `head_fn(hidden, train_module)`.

    A batch whose rows share a prompt (`predictor_index`) is only right under tuneforge_varlen attention: any
    other would isolate each continuation from its prompt without a word, so it is refused."""
    if "predictor_index" in batch:
        from tuneforge.models.attention import NAME, is_varlen
        if not is_varlen(unwrap(module)):
            from tuneforge.errors import TuneforgeError
            raise TuneforgeError(f"this packed batch shares each pair's prompt between its answers, which only "
                                 f"{NAME} attention computes right; the model runs "
                                 f"{getattr(unwrap(module).config, '_attn_implementation', None)!r}: collate "
                                 f"with share_prompt=False (run.py batching decides it from the attention)")
    extra = {"row_chunks": batch["row_chunks"]} if batch.get("row_chunks") is not None else {}
    return as_train_module(module)(batch["input_ids"], batch.get("attention_mask"), batch.get("position_ids"),
                                   head_fn=head_fn, **extra)


def hidden_states(module, batch: dict) -> torch.Tensor:
    """Final hidden states (B, T, H) of the body, no logits."""
    return forward(module, batch, lambda hidden, _: hidden)


def masked_next_token_loss(module, batch: dict, chunk_size: int = 1024) -> tuple[torch.Tensor, int]:
    """(loss sum, supervised token count) of next-token prediction where batch['loss_mask'] is 1.

    Only supervised positions reach the output head, through the chunked fused path (logprobs.py).
    """
    at, predictors = supervised_positions(batch)
    targets = at(batch["input_ids"])  # (N,)

    def head_fn(hidden, tm):
        picked = predictors(hidden)  # (N, H)
        head = tm.output_head
        if getattr(head, "bias", None) is not None:  # rare; the fused path assumes a bias-free projection
            return F.cross_entropy(head(picked).float(), targets, reduction="sum")
        return fused_nll_sum(picked, head.weight, targets, chunk_size)

    return forward(module, batch, head_fn), int(targets.numel())


def token_logps(module, batch: dict, chunk_size: int = 1024, temperature: float = 1.0,
                value_head: str | None = None) -> tuple[torch.Tensor, ...]:
    """Log-prob of every supervised next token (N,), in row-major order of the batch, and the sequence each one
    belongs to (N,), for a batch with `sequence_ids` (collate_sequences, collate_packed_sequences).

    `temperature` divides the hidden states before the chunked projection (logits / T without a logits
    tensor): RL rollouts sample from softmax(logits / T), and the PPO/GRPO ratio must use the same
    distribution. Differentiable when the module trains; only supervised positions reach the output head.

    With `value_head` (the name of an extra head, PPO's critic) also the value of each of those positions (N,),
    float32, read from the same hidden states in the same forward: (logps, values, segments)."""
    from tuneforge.objectives.logprobs import token_logprobs
    at, predictors = supervised_positions(batch)
    targets = at(batch["input_ids"])  # (N,)
    segments = at(batch["sequence_ids"])  # (N,): the sequence each predicted token belongs to

    def head_fn(hidden, tm):
        picked = predictors(hidden)  # (N, H)
        scaled = picked / temperature if temperature != 1.0 else picked
        logps = token_logprobs(scaled, tm.output_head.weight, targets, chunk_size)[0]
        if value_head is None:
            return logps
        with torch.autocast(device_type=picked.device.type, enabled=False):
            values = tm.heads[value_head](picked.float()).squeeze(-1)
        return logps, values

    out = forward(module, batch, head_fn)
    return (*out, segments) if value_head is not None else (out, segments)


def sequence_logps(module, batch: dict, chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of each sequence's supervised tokens (S,) and how many there are (S,), for a batch of
    multi-sequence examples (`sequence_ids`: each token's sequence, -1 on padding). Differentiable when the
    module trains; the per-token log-probs come from `token_logps`."""
    from tuneforge.objectives.logprobs import sequence_logprobs
    logps, segments = token_logps(module, batch, chunk_size)
    n_seq = int(batch["sequence_role"].numel())
    counts = torch.zeros(n_seq, dtype=torch.float32, device=segments.device).index_add_(
        0, segments, torch.ones_like(segments, dtype=torch.float32))
    return sequence_logprobs(logps, segments, n_seq), counts


def pair_index(batch: dict, roles: tuple[str, ...] = ("chosen", "rejected")) -> tuple[torch.Tensor, ...]:
    """For each example of the batch, the index of its sequence of each role: one (P,) tensor per role."""
    example, role = batch["sequence_example"], batch["sequence_role"]
    n = int(example.max()) + 1 if example.numel() else 0
    out = []
    for r in range(len(roles)):
        idx = torch.full((n,), -1, dtype=torch.long, device=example.device)
        mine = role == r
        idx[example[mine]] = torch.nonzero(mine).flatten()
        out.append(idx)
    return tuple(out)
