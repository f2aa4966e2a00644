"""The one log-probability path: from final hidden states to token log-probs or a summed next-token loss,
without ever materialising full (N x V) float32 logits.

The output projection is applied to chunks of `chunk_size` positions. Memory for logits is bounded by
`chunk_size x V` whatever the batch and sequence length:

- `fused_nll_sum`: the summed cross-entropy (SFT, continued pre-training). The gradient w.r.t. the hidden
  states (and the head weight, when it trains) is computed chunk by chunk *during the forward pass*, since
  d(sum NLL)/d logits = softmax - onehot is known there; backward only scales it. No logits are kept and no
  matmul is recomputed.
- `token_logprobs`: per-token log-probs (and, optionally, entropies) for DPO sequence log-probs and PPO/GRPO
  ratios, whose upstream gradient is only known in backward: logits are recomputed per chunk in backward
  (one extra chunk matmul) instead of being stored.

Only what the loss needs is projected: callers pass the hidden states of supervised positions only.
"""

from __future__ import annotations

import torch


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def head_logits(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Logits of the positions in h (n, H) for a bias-free head weight (V, H): the one projection every path
    uses (loss, log-probs, generation), so their numbers agree."""
    # Matmul in the compute dtype (bf16 under autocast, which casts both sides: a weight already cast by the
    # caller is used as it is), softmax statistics in float32 for stability.
    if not torch.is_autocast_enabled(h.device.type):
        weight = weight.to(h.dtype)
    return (h @ weight.T).float()  # (n, V)


def _autocast_state(device: torch.device) -> tuple[str, bool, torch.dtype]:
    """The autocast state the forward ran under, to run a recomputation in backward the same way: autograd runs
    backward outside the forward's autocast context (the loop calls `.backward()` after leaving it)."""
    return device.type, torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type)


class _FusedNLLSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size):
        need_w = weight.requires_grad
        grad_h = torch.empty_like(hidden)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for sl in _chunks(hidden.shape[0], chunk_size):
            h, y = hidden[sl], targets[sl]
            logp = torch.log_softmax(head_logits(h, weight), dim=-1)  # (n, V); the logits die here
            total -= logp.gather(1, y[:, None]).sum()
            g = logp.exp_()  # d NLL / d logits = softmax - onehot, in the same memory
            del logp  # peak stays at about two chunks of (n, V) float32
            g[torch.arange(g.shape[0], device=g.device), y] -= 1.0
            grad_h[sl] = (g.to(h.dtype) @ weight.to(h.dtype)).to(grad_h.dtype)
            if need_w:
                grad_w += g.T @ h.float()
            del g
        ctx.save_for_backward(grad_h, grad_w if need_w else torch.empty(0))
        ctx.need_w, ctx.w_dtype = need_w, weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype)
        gw = (grad_w * grad_out).to(ctx.w_dtype) if ctx.need_w else None
        return gh, gw, None, None


def fused_nll_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                  chunk_size: int = 1024) -> torch.Tensor:
    """Sum over N positions of -log p(target | hidden): hidden (N, H), weight (V, H), targets (N,)."""
    if hidden.shape[0] == 0:
        return hidden.sum() * 0.0
    if not (hidden.requires_grad or weight.requires_grad):
        return _nll_no_grad(hidden, weight, targets, chunk_size)
    return _FusedNLLSum.apply(hidden, weight, targets, chunk_size)


def _nll_no_grad(hidden, weight, targets, chunk_size) -> torch.Tensor:
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for sl in _chunks(hidden.shape[0], chunk_size):
        logits = head_logits(hidden[sl], weight)
        total += (torch.logsumexp(logits, -1) - logits.gather(1, targets[sl][:, None]).squeeze(1)).sum()
    return total


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size):
        n = hidden.shape[0]
        logps = torch.empty(n, dtype=torch.float32, device=hidden.device)
        entropy = torch.empty(n, dtype=torch.float32, device=hidden.device)
        for sl in _chunks(n, chunk_size):
            logp_all = torch.log_softmax(head_logits(hidden[sl], weight), dim=-1)  # (n, V)
            logps[sl] = logp_all.gather(1, targets[sl][:, None]).squeeze(1)
            entropy[sl] = -(logp_all.exp() * logp_all).sum(-1)
        ctx.save_for_backward(hidden, weight, targets)
        ctx.chunk_size = chunk_size
        ctx.autocast = _autocast_state(hidden.device)
        ctx.mark_non_differentiable(entropy)
        return logps, entropy

    @staticmethod
    def backward(ctx, grad_logps, _grad_entropy):
        device_type, autocast_on, autocast_dtype = ctx.autocast
        # The same matmul dtypes as the forward and as autograd through the plain computation (bf16 under bf16
        # autocast), not float32 matmuls that would give a gradient of slightly different logits.
        with torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_on):
            return _TokenLogprobs._grads(ctx, grad_logps)

    @staticmethod
    def _grads(ctx, grad_logps):
        hidden, weight, targets = ctx.saved_tensors
        grad_h = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if ctx.needs_input_grad[1] else None
        for sl in _chunks(hidden.shape[0], ctx.chunk_size):
            h, y, g_out = hidden[sl], targets[sl], grad_logps[sl].float()
            # recomputed (logits were never stored), as exp(log_softmax) like autograd through log_softmax
            p = torch.log_softmax(head_logits(h, weight), dim=-1).exp_()
            g = -p * g_out[:, None]  # d logp_y / d logits = onehot - softmax
            g[torch.arange(g.shape[0], device=g.device), y] += g_out
            if grad_h is not None:
                grad_h[sl] = (g.to(h.dtype) @ weight.to(h.dtype)).to(grad_h.dtype)
            if grad_w is not None:
                grad_w += g.T @ h.float()
        return grad_h, (grad_w.to(weight.dtype) if grad_w is not None else None), None, None


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                   chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position log p(target) (differentiable) and entropy of the predictive distribution (detached).

    hidden (N, H), weight (V, H), targets (N,) -> logps (N,), entropy (N,). Sequence log-probs for DPO are a
    segment sum of `logps`; PPO/GRPO use them per token.
    """
    return _TokenLogprobs.apply(hidden, weight, targets, chunk_size)


def sequence_logprobs(token_logps: torch.Tensor, segment_ids: torch.Tensor, n_segments: int) -> torch.Tensor:
    """Sum token log-probs per sequence: token_logps (N,), segment_ids (N,) in [0, n_segments) -> (n_segments,)."""
    out = torch.zeros(n_segments, dtype=token_logps.dtype, device=token_logps.device)
    return out.index_add(0, segment_ids, token_logps)
