"""The chunked log-prob path equals the plain full-logits computation, in values and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tuneforge.objectives.logprobs import fused_nll_sum, sequence_logprobs, token_logprobs


def _inputs(n=37, h=16, v=53, seed=0, w_grad=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, requires_grad=True)
    weight = torch.randn(v, h, generator=g).mul_(0.3).requires_grad_(w_grad)
    targets = torch.randint(0, v, (n,), generator=g)
    return hidden, weight, targets


@pytest.mark.parametrize("chunk", [1, 8, 1000])
@pytest.mark.parametrize("w_grad", [True, False])
def test_fused_nll_sum_matches_plain(chunk, w_grad):
    hidden, weight, targets = _inputs(w_grad=w_grad)
    plain = F.cross_entropy(hidden @ weight.T, targets, reduction="sum")
    ref = torch.autograd.grad(plain, [hidden, weight] if w_grad else [hidden])
    h2, w2 = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_(w_grad)
    ours = fused_nll_sum(h2, w2, targets, chunk_size=chunk)
    (ours * 2.5).backward()  # a non-unit upstream gradient must scale correctly
    torch.testing.assert_close(ours, plain.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h2.grad, ref[0] * 2.5, rtol=1e-5, atol=1e-6)
    if w_grad:
        torch.testing.assert_close(w2.grad, ref[1] * 2.5, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk", [3, 1000])
def test_token_logprobs_and_entropy_match_plain(chunk):
    hidden, weight, targets = _inputs()
    logp_all = torch.log_softmax(hidden @ weight.T, -1)
    plain = logp_all.gather(1, targets[:, None]).squeeze(1)
    upstream = torch.randn(plain.shape, generator=torch.Generator().manual_seed(1))
    ref = torch.autograd.grad((plain * upstream).sum(), [hidden, weight])
    h2, w2 = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    ours, entropy = token_logprobs(h2, w2, targets, chunk_size=chunk)
    (ours * upstream).sum().backward()
    torch.testing.assert_close(ours, plain.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(entropy, -(logp_all.exp() * logp_all).sum(-1).detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h2.grad, ref[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w2.grad, ref[1], rtol=1e-5, atol=1e-6)


def _plain_under_autocast(loss_of_logits, hidden, weight, targets, chunk):
    """The plain computation under bf16 autocast, chunk by chunk (one chunk when `chunk` >= N), backward outside
    autocast as the training loop does it: (value, grad hidden, grad weight). Computed per chunk so that the
    weight gradient sums the same bf16 partial products as the chunked function does."""
    h, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    values = []
    for start in range(0, h.shape[0], chunk):
        sl = slice(start, start + chunk)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            value = loss_of_logits(h[sl] @ w.T, targets[sl], sl)
        value.sum().backward()
        values.append(value.detach())
    return torch.cat([v.reshape(-1) for v in values]), h.grad, w.grad


@pytest.mark.parametrize("chunk", [3, 1000])
def test_token_logprobs_gradients_under_bf16_autocast_equal_the_plain_computation(chunk):
    """The backward recomputes the logits: it must do so in the forward's dtypes (bf16 matmuls), although autograd
    runs it outside the forward's autocast context. (It once recomputed in float32: hidden gradients 5e-3 off.)
    CPU autocast keeps log_softmax in bf16 (CUDA's runs it in float32), hence the explicit `.float()` in the
    plain path, as in the library. Both paths run the same bf16 operations, so the tolerance is float32's."""
    hidden, weight, targets = _inputs(h=64, v=384)
    upstream = torch.randn(targets.shape, generator=torch.Generator().manual_seed(1))

    def plain(logits, y, sl):
        return torch.log_softmax(logits.float(), -1).gather(1, y[:, None]).squeeze(1) * upstream[sl]

    ref = _plain_under_autocast(plain, hidden, weight, targets, chunk)
    ref_again = _plain_under_autocast(plain, hidden, weight, targets, chunk)
    for a, b in zip(ref, ref_again):  # the plain path meets the tolerance across two evaluations
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    h2, w2 = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, _ = token_logprobs(h2, w2, targets, chunk_size=chunk)
    (ours * upstream).sum().backward()
    torch.testing.assert_close(ours * upstream, ref[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h2.grad, ref[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w2.grad, ref[2], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk", [3, 1000])
def test_fused_nll_sum_gradients_under_bf16_autocast_equal_the_plain_computation(chunk):
    """fused_nll_sum computes its gradients during the forward, inside the caller's autocast: bf16 matmuls as in
    the plain computation (cross_entropy runs in float32 under autocast), so nothing to re-enter in backward."""
    hidden, weight, targets = _inputs(h=64, v=384)

    def plain(logits, y, sl):
        return F.cross_entropy(logits, y, reduction="sum")

    value, grad_h, grad_w = _plain_under_autocast(plain, hidden, weight, targets, chunk)
    h2, w2 = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = fused_nll_sum(h2, w2, targets, chunk_size=chunk)
    ours.backward()
    torch.testing.assert_close(ours, value.sum(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h2.grad, grad_h, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w2.grad, grad_w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("autocast", [False, True])
def test_token_logprobs_keeps_no_logits_for_backward(autocast):
    """What the forward saves for backward is its inputs only: no (N x V) logits, in any dtype."""
    hidden, weight, targets = _inputs(n=40, h=16, v=53)
    hidden = hidden.detach().requires_grad_()
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logps, _ = token_logprobs(hidden, weight, targets, chunk_size=8)
    assert saved and all(s[-1] != 53 or s == tuple(weight.shape) for s in saved), saved
    logps.sum().backward()
    assert hidden.grad is not None


def test_sequence_logprobs_sum_per_segment():
    logps = torch.tensor([-1.0, -2.0, -0.5, -0.25])
    out = sequence_logprobs(logps, torch.tensor([0, 0, 1, 1]), 2)
    torch.testing.assert_close(out, torch.tensor([-3.0, -0.75]))


def test_model_loss_equals_transformers_loss(tiny_model_dir, tiny_tokenizer):
    """Through a real model: our masked loss == transformers' own loss with -100 labels."""
    from transformers import AutoModelForCausalLM

    from tuneforge.objectives.functional import masked_next_token_loss
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = torch.randint(5, 300, (3, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.zeros_like(ids)
    mask[:, 6:] = 1
    attn = torch.ones_like(ids)
    attn[2, 10:] = 0
    mask[2, 10:] = 0
    loss_sum, count = masked_next_token_loss(model, {"input_ids": ids, "attention_mask": attn, "loss_mask": mask})
    labels = ids.masked_fill(mask == 0, -100)
    ref = model(input_ids=ids, attention_mask=attn, labels=labels).loss
    assert count == int(mask[:, 1:].sum())
    torch.testing.assert_close(loss_sum / count, ref, rtol=1e-5, atol=1e-6)
