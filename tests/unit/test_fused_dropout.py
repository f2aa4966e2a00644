"""Fused LoRA dropout (tuneforge/adapters/fused_dropout.py) equals PEFT's dropout -> lora_A -> lora_B."""

import math

import pytest
import torch
import torch.nn as nn

from tuneforge.adapters.fused_dropout import DropoutLinear, dropped_positions, fuse_lora_dropout, unfuse_lora_dropout


def dropout_drop_mask(shape, p):
    """`dropped_positions` as a boolean mask of `shape` (True = dropped), from the same draws."""
    n = math.prod(shape)
    return torch.zeros(n, dtype=torch.bool).index_fill_(0, dropped_positions(n, p), True).view(shape)


def dropout_keep_mask(shape, p):
    return ~dropout_drop_mask(shape, p)


def _check_bernoulli(drop: torch.Tensor, p: float):
    """Rate p, neighbours uncorrelated, and runs of kept elements geometric (what i.i.d. Bernoulli gives)."""
    n = drop.numel()
    sd = (p * (1 - p) / n) ** 0.5
    assert abs(drop.float().mean().item() - p) < 5 * sd
    even, odd = drop[0::2].float(), drop[1::2].float()
    assert abs(torch.corrcoef(torch.stack([even, odd]))[0, 1].item()) < 0.01
    first, second = drop[: n // 2].float().mean().item(), drop[n // 2:].float().mean().item()
    assert abs(first - second) < 7 * sd  # no drift along the tensor (e.g. at a round boundary)
    # P(the element after a dropped one is dropped) = p, too
    after = drop[1:][drop[:-1]].float().mean().item()
    assert abs(after - p) < 5 * (p * (1 - p) / drop[:-1].sum().item()) ** 0.5


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5, 0.7, 0.97])
def test_drop_mask_is_bernoulli(p):
    torch.manual_seed(0)
    _check_bernoulli(dropout_drop_mask((400_000,), p), p)


def test_drop_mask_over_several_rounds_of_draws(monkeypatch):
    """When one round of draws falls short of the end, the next round continues where it stopped."""
    import tuneforge.adapters.fused_dropout as fd
    rounds = []

    def few(rest, q):
        rounds.append(rest)
        return 997

    monkeypatch.setattr(fd, "_draws_for", few)
    torch.manual_seed(1)
    drop = dropout_drop_mask((200_000,), 0.1)
    assert len(rounds) >= 15  # ~20000 dropped elements, 997 draws per round
    _check_bernoulli(drop, 0.1)


def test_keep_mask_odd_shapes_and_seed():
    torch.manual_seed(3)
    a = dropout_keep_mask((3, 5, 7), 0.2)
    torch.manual_seed(3)
    b = dropout_keep_mask((3, 5, 7), 0.2)
    assert a.shape == (3, 5, 7) and a.dtype == torch.bool and torch.equal(a, b)
    assert dropout_keep_mask((1,), 0.0).all() and not dropout_keep_mask((4, 3), 1.0).any()
    assert dropout_keep_mask((0, 5), 0.1).shape == (0, 5)


def _reference(x, a_weight, b_weight, keep, p, scaling):
    dropped = x * keep / (1 - p)
    return (dropped @ a_weight.t()) @ b_weight.t() * scaling


@pytest.mark.parametrize("positions", [True, False], ids=["cpu-positions", "gpu-style-mask"])
@pytest.mark.parametrize("shape", [(2, 7, 12), (5, 12)])
def test_fused_branch_equals_plain_values_and_grads(shape, positions, monkeypatch):
    import tuneforge.adapters.fused_dropout as fd
    if not positions:  # the boolean-mask path other devices take, run here on the CPU
        monkeypatch.setattr(fd, "_POSITION_DEVICES", ())
    p, scaling = 0.3, 2.0
    torch.manual_seed(1)
    layer_a = nn.Linear(12, 4, bias=False)
    b = torch.randn(6, 4, requires_grad=True)
    x = torch.randn(*shape, requires_grad=True)
    layer_a.__class__ = DropoutLinear
    layer_a.p = p

    torch.manual_seed(42)
    out = (layer_a(x) @ b.t()) * scaling
    grad = torch.randn_like(out)
    out.backward(grad)
    got = (out.detach(), x.grad.clone(), layer_a.weight.grad.clone(), b.grad.clone())

    torch.manual_seed(42)  # the same draws give the same mask
    keep = dropout_keep_mask(x.shape, p) if positions else torch.rand(x.shape) >= p
    x2 = x.detach().clone().requires_grad_(True)
    a2 = layer_a.weight.detach().clone().requires_grad_(True)
    b2 = b.detach().clone().requires_grad_(True)
    ref = _reference(x2, a2, b2, keep, p, scaling)
    ref.backward(grad)
    for g, r in zip(got, (ref.detach(), x2.grad, a2.grad, b2.grad)):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)
    assert not keep.all()  # the test exercised real dropout


def test_non_contiguous_input_is_masked_in_its_logical_order():
    p = 0.3
    torch.manual_seed(1)
    layer = nn.Linear(12, 4, bias=False)
    layer.__class__ = DropoutLinear
    layer.p = p
    base = torch.randn(12, 5, requires_grad=True)
    x = base.t()  # (5, 12), a transposed view
    grad = torch.randn(5, 4)
    torch.manual_seed(42)
    layer(x).backward(grad)
    torch.manual_seed(42)
    keep = dropout_keep_mask(x.shape, p)
    w = layer.weight.detach().clone().requires_grad_(True)
    base2 = base.detach().clone().requires_grad_(True)
    ref = (base2.t() * keep / (1 - p)) @ w.t()
    ref.backward(grad)
    torch.testing.assert_close(base.grad, base2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.weight.grad, w.grad, rtol=1e-5, atol=1e-6)
    assert not keep.all()


def test_eval_mode_is_plain_linear():
    torch.manual_seed(0)
    layer = nn.Linear(8, 3, bias=False)
    x = torch.randn(4, 8)
    expected = layer(x)
    layer.__class__ = DropoutLinear
    layer.p = 0.5
    layer.eval()
    torch.testing.assert_close(layer(x), expected)


def _peft_model(tiny_model_dir, dropout, use_dora=False):
    from tuneforge.adapters.lora import apply_lora
    from tuneforge.models.load import load_causal_lm
    model, _ = load_causal_lm(str(tiny_model_dir))
    torch.manual_seed(0)
    return apply_lora(model, r=4, alpha=8, dropout=dropout, use_dora=use_dora)


def test_fuse_on_peft_model_keeps_state_and_eval_outputs(tiny_model_dir):
    model = _peft_model(tiny_model_dir, 0.1)
    keys = sorted(model.state_dict())
    ids = torch.randint(0, 100, (2, 9))
    model.eval()
    with torch.no_grad():
        before = model(input_ids=ids).logits
    n = fuse_lora_dropout(model)
    assert n > 0
    assert sorted(model.state_dict()) == keys
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before)
    model.train()  # training with the fused path runs forward and backward
    out = model(input_ids=ids).logits.sum()
    out.backward()
    assert all(p.grad is not None for n_, p in model.named_parameters() if p.requires_grad)
    assert unfuse_lora_dropout(model) == n
    assert not any(isinstance(m, DropoutLinear) for m in model.modules())
    assert any(isinstance(m, nn.Dropout) and m.p == 0.1 for m in model.modules())


def _mask_source(p):
    """Masks in call order from a private generator: each side of a comparison gets its own, equal, stream."""
    gen = torch.Generator().manual_seed(7)
    return lambda shape: torch.rand(shape, generator=gen) >= p


def test_fused_training_step_matches_peft_with_the_same_masks(tiny_model_dir, monkeypatch):
    import tuneforge.adapters.fused_dropout as fd
    p = 0.2
    torch.manual_seed(5)
    ids = torch.randint(0, 100, (2, 9))
    grads = []
    for fused in (False, True):
        model = _peft_model(tiny_model_dir, p)
        for name, param in model.named_parameters():  # lora_B starts at zero; make the branch matter
            if "lora_B" in name:
                with torch.no_grad():
                    param.copy_(torch.randn_like(param) * 0.1)
        masks = _mask_source(p)
        if fused:
            assert fuse_lora_dropout(model) > 0
            # flat positions from the same stream (torch.rand fills a shape in row-major order)
            monkeypatch.setattr(fd, "dropped_positions",
                                lambda n, p_, device=None: (~masks((n,))).nonzero().flatten())
        else:
            for m in model.modules():
                if isinstance(m, nn.Dropout):
                    m.forward = lambda x: x * masks(x.shape) / (1 - p)
        model.train()
        model(input_ids=ids).logits.float().pow(2).mean().backward()
        grads.append({n: q.grad.clone() for n, q in model.named_parameters() if q.requires_grad})
        monkeypatch.undo()
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-4, atol=1e-6)


def test_dora_and_zero_dropout_left_alone(tiny_model_dir):
    assert fuse_lora_dropout(_peft_model(tiny_model_dir, 0.0)) == 0
    assert fuse_lora_dropout(_peft_model(tiny_model_dir, 0.1, use_dora=True)) == 0


def test_training_mode_without_grad_still_drops_out():
    torch.manual_seed(0)
    layer = nn.Linear(8, 3, bias=False)
    x = torch.randn(6, 8)
    layer.__class__ = DropoutLinear
    layer.p = 0.25
    layer.train()
    torch.manual_seed(9)
    with torch.no_grad():
        got = layer(x)
    torch.manual_seed(9)
    keep = dropout_keep_mask(x.shape, 0.25)
    torch.testing.assert_close(got, (x * keep / 0.75) @ layer.weight.t(), rtol=1e-5, atol=1e-6)


def _train_step(model, ids, seed=11):
    """One training forward and backward with PEFT's dropout drawing from `seed`: loss and gradients."""
    model.train()
    torch.manual_seed(seed)
    loss = model(input_ids=ids).logits.float().pow(2).mean()
    loss.backward()
    return loss.detach(), {n: q.grad.clone() for n, q in model.named_parameters() if q.requires_grad}


def _lora_b_nonzero(model):
    for name, param in model.named_parameters():  # lora_B starts at zero; make the branch (and its dropout) matter
        if "lora_B" in name:
            with torch.no_grad():
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(3)) * 0.1)
    return model


@pytest.mark.parametrize("version", ["0.16.0", "0.22.0", "0.22.0.dev0", "1.0.0", "not-a-version"])
def test_outside_the_checked_peft_versions_peft_dropout_stays(tiny_model_dir, monkeypatch, version):
    """A PEFT release the swap was not checked against: one warning naming the version, nothing fused, and
    training runs PEFT's own path (loss and gradients equal to a model never offered the fused path)."""
    import peft
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(4))
    reference = _train_step(_lora_b_nonzero(_peft_model(tiny_model_dir, 0.2)), ids)
    model = _lora_b_nonzero(_peft_model(tiny_model_dir, 0.2))
    monkeypatch.setattr(peft, "__version__", version)
    with pytest.warns(RuntimeWarning, match=f"fused LoRA dropout is off: PEFT {version} is outside") as seen:
        assert fuse_lora_dropout(model) == 0
    assert len(seen) == 1
    assert not any(isinstance(m, DropoutLinear) for m in model.modules())
    assert any(isinstance(m, nn.Dropout) and m.p == 0.2 for m in model.modules())
    loss, grads = _train_step(model, ids)
    torch.testing.assert_close(loss, reference[0], rtol=0, atol=0)
    assert grads.keys() == reference[1].keys()
    for k in grads:
        torch.testing.assert_close(grads[k], reference[1][k], rtol=0, atol=0)


@pytest.mark.parametrize("version", ["0.17.0", "0.21.2", "0.21.9"])
def test_inside_the_checked_peft_versions_dropout_is_fused(tiny_model_dir, monkeypatch, version):
    import warnings

    import peft
    model = _peft_model(tiny_model_dir, 0.2)
    monkeypatch.setattr(peft, "__version__", version)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fuse_lora_dropout(model) > 0
    assert any(isinstance(m, DropoutLinear) for m in model.modules())


@pytest.mark.parametrize("broken", ["no lora_variant", "lora_dropout a dict"])
def test_peft_layers_without_the_expected_attributes_keep_peft_dropout(tiny_model_dir, broken):
    """A LoRA layer lacking what the swap touches (here made so on the last layer, after other, intact ones):
    one warning naming the attribute, and no layer changed."""
    from peft.tuners.lora import LoraLayer
    model = _peft_model(tiny_model_dir, 0.2)
    last = [m for m in model.modules() if isinstance(m, LoraLayer)][-1]
    if broken == "no lora_variant":
        del last.lora_variant
        attr = "lora_variant"
    else:
        object.__setattr__(last, "lora_dropout", dict(last.lora_dropout))
        attr = "lora_dropout"
    with pytest.warns(RuntimeWarning, match=f"fused LoRA dropout is off: PEFT .*{type(last).__name__} lacks {attr}"):
        assert fuse_lora_dropout(model) == 0
    assert not any(isinstance(m, DropoutLinear) for m in model.modules())
    dropouts = [d for m in model.modules() if isinstance(m, LoraLayer) for d in m.lora_dropout.values()]
    assert dropouts and all(isinstance(d, nn.Dropout) and d.p == 0.2 for d in dropouts)
