"""Sparse dropout (tuneforge/models/dropout.py) and "tuneforge_sdpa" attention (models/attention.py): PyTorch's
dropout and SDPA maths, with the CPU's dropped positions drawn sparsely."""

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tuneforge.models.attention import SDPA_NAME, _math_attention, attention_dropout, dropout_sdpa
from tuneforge.models.dropout import (SparseDropout, sparse_dropout, sparse_dropout_matmul, sparse_dropouts,
                                     torch_dropouts)
from tuneforge.run import sparse_model_dropout
from tests.unit.test_fused_dropout import _check_bernoulli


def tiny_bert(hidden=0.1, attention=0.1):
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=hidden,
                     attention_probs_dropout_prob=attention)
    return BertModel(cfg, add_pooling_layer=False)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_values_are_bernoulli_dropout(p):
    torch.manual_seed(0)
    x = torch.rand(300, 1000) + 0.5  # no zeros of its own
    out = sparse_dropout(x, p)
    dropped = out == 0
    _check_bernoulli(dropped.flatten(), p)
    torch.testing.assert_close(out[~dropped], x[~dropped] / (1 - p))  # kept ones scaled by 1/(1-p)


def test_gradient_is_the_mask_times_the_scale():
    torch.manual_seed(1)
    x = (torch.rand(64, 48) + 0.5).requires_grad_()
    out = sparse_dropout(x, 0.25)
    g = torch.randn_like(out)
    out.backward(g)
    kept = (out != 0).float()
    torch.testing.assert_close(x.grad, g * kept / 0.75)


def test_non_contiguous_input_and_gradient():
    torch.manual_seed(2)
    base = (torch.rand(40, 30) + 0.5).requires_grad_()
    x = base.t()  # a view with swapped strides
    out = sparse_dropout(x, 0.3)
    assert out.shape == x.shape
    kept = out != 0
    torch.testing.assert_close(out[kept], x[kept] / 0.7)
    out.sum().backward()
    torch.testing.assert_close(base.grad.t(), kept.float() / 0.7)


def test_torch_seed_decides_the_mask():
    x = torch.ones(10_000)
    torch.manual_seed(5)
    a = sparse_dropout(x, 0.1)
    torch.manual_seed(5)
    b = sparse_dropout(x, 0.1)
    torch.manual_seed(6)
    c = sparse_dropout(x, 0.1)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_identity_in_eval_and_at_zero():
    x = torch.randn(8, 8)
    assert sparse_dropout(x, 0.5, training=False) is x
    assert sparse_dropout(x, 0.0) is x
    assert torch.equal(sparse_dropout(x, 1.0), torch.zeros_like(x))


def test_switching_a_model_and_back():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.2), nn.Dropout(0.0), nn.Sequential(nn.Dropout(0.5)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert sparse_dropouts(model) == 2  # p = 0 is left alone
    assert isinstance(model[1], SparseDropout) and isinstance(model[1], nn.Dropout) and model[1].p == 0.2
    assert type(model[2]) is nn.Dropout
    assert sparse_dropouts(model) == 0  # already switched
    assert model.state_dict().keys() == before.keys()
    model.eval()
    x = torch.randn(3, 4)
    assert torch.equal(model(x), model[0](x))
    assert torch_dropouts(model) == 2 and type(model[3][0]) is nn.Dropout


def test_math_attention_equals_sdpa():
    torch.manual_seed(3)
    q, k, v = (torch.randn(3, 4, 7, 8) for _ in range(3))
    mask = torch.ones(3, 1, 7, 7, dtype=torch.bool)
    mask[0, :, :, 5:] = False
    mask[2, :, :, 3:] = False
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(_math_attention(q, k, v, mask, 0.0, None), expected, atol=1e-6, rtol=1e-5)
    additive = torch.zeros(3, 1, 7, 7).masked_fill(~mask, torch.finfo(torch.float32).min)
    torch.testing.assert_close(_math_attention(q, k, v, additive, 0.0, 0.3),
                               F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3),
                               atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(_math_attention(q, k, v, None, 0.0, None), F.scaled_dot_product_attention(q, k, v),
                               atol=1e-6, rtol=1e-5)


def test_dropped_attention_is_unbiased():
    """Averaged over many draws, attention with dropout on the probabilities equals attention without."""
    torch.manual_seed(4)
    q, k, v = (torch.randn(1, 2, 5, 4) for _ in range(3))
    module = nn.Module()
    module.is_causal = False
    mask = torch.ones(1, 1, 5, 5, dtype=torch.bool)
    mask[..., 4] = False
    draws = torch.stack([dropout_sdpa(module, q, k, v, mask, dropout=0.3)[0] for _ in range(4000)])
    plain = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)
    assert (draws.std(0) > 0).all()  # dropout happened
    torch.testing.assert_close(draws.mean(0), plain, atol=0.03, rtol=0)


def test_sdpa_hands_over_outside_the_cpu_dropout_path():
    """No dropout, causal without a mask, or grouped key heads: transformers' own SDPA, the same values."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    torch.manual_seed(5)
    q, k, v = (torch.randn(2, 4, 6, 8) for _ in range(3))
    module = nn.Module()
    module.is_causal = True
    for kwargs in ({"dropout": 0.0}, {"dropout": 0.0, "is_causal": True}):
        torch.testing.assert_close(dropout_sdpa(module, q, k, v, None, **kwargs)[0],
                                   sdpa_attention_forward(module, q, k, v, None, **kwargs)[0])
    torch.manual_seed(6)
    a = dropout_sdpa(module, q, k, v, None, dropout=0.2)[0]  # causal, no mask: SDPA's own dropout
    torch.manual_seed(6)
    b = sdpa_attention_forward(module, q, k, v, None, dropout=0.2)[0]
    torch.testing.assert_close(a, b)


def test_bert_switched_keeps_eval_outputs_trains_and_saves_plain(tmp_path):
    from transformers import AutoModel
    model = tiny_bert()
    ids = torch.randint(1, 60, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0
    model.eval()
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert attention_dropout(model.config) == 0.1
    sparse_model_dropout(model)
    assert model.config._attn_implementation == SDPA_NAME
    # embeddings, and per layer: the attention's (only its p is read: the attention function drops), two outputs
    assert sum(isinstance(m, SparseDropout) for m in model.modules()) == 7
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).last_hidden_state, before)
    model.train()
    torch.manual_seed(0)
    out = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert not torch.allclose(out, before)  # dropout on
    out.pow(2).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.encoder.parameters())
    model.save_pretrained(tmp_path)
    assert SDPA_NAME not in json.dumps(json.loads((tmp_path / "config.json").read_text()))
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).last_hidden_state, before)


def test_without_dropout_nothing_changes():
    """With dropout probabilities of 0, the switched model trains exactly as the plain one."""
    a, b = tiny_bert(0.0, 0.0), tiny_bert(0.0, 0.0)
    sparse_model_dropout(b)
    assert b.config._attn_implementation == "sdpa"  # nothing to speed up: left alone
    ids = torch.randint(1, 60, (2, 7))
    for m in (a, b):
        m.train()
        m(input_ids=ids).last_hidden_state.sum().backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, msg=name)


def _saved_bytes(fn):
    """Bytes of the distinct tensors that autograd keeps for the backward pass of fn()."""
    kept = {}

    def pack(t):
        kept[(t.untyped_storage().data_ptr(), t.dtype, tuple(t.shape))] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(kept.values())


def test_dropped_matmul_equals_dropout_then_matmul_and_keeps_one_tensor_fewer():
    torch.manual_seed(0)
    scores = torch.randn(3, 4, 16, 16, requires_grad=True)
    value = torch.randn(3, 4, 16, 8, requires_grad=True)
    grad = torch.randn(3, 4, 16, 8)
    results = []
    for fused in (False, True):
        torch.manual_seed(1)

        def step():
            probs = torch.softmax(scores, dim=-1)
            if fused:
                return sparse_dropout_matmul(probs, value, 0.3)
            return torch.matmul(sparse_dropout(probs, 0.3), value)

        out, saved = _saved_bytes(step)
        scores.grad = value.grad = None
        out.backward(grad)
        results.append((out.detach(), scores.grad.clone(), value.grad.clone(), saved))
    (out0, gs0, gv0, saved0), (out1, gs1, gv1, saved1) = results
    torch.testing.assert_close(out1, out0, rtol=1e-6, atol=1e-6)  # the same draws: the same masks
    torch.testing.assert_close(gs1, gs0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gv1, gv0, rtol=1e-5, atol=1e-6)
    probs_bytes = scores.numel() * 4
    assert saved0 - saved1 == probs_bytes  # the dropped copy of the probabilities is not kept
    assert torch.equal(sparse_dropout_matmul(scores, value, 0.3, training=False), scores @ value)
