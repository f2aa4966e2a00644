"""tuneforge_varlen attention (tuneforge/models/attention.py): packed rows equal each example run alone;
padded and cached (generation) paths equal transformers' SDPA."""

import pytest
import torch

from tuneforge.models.attention import NAME, register, segment_bounds, supports_varlen


def test_segment_bounds():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5], [5, 6, 0, 1, 2, 3]])
    assert segment_bounds(pos) == [[(0, 3), (3, 5), (5, 6)], [(0, 6)], [(0, 2), (2, 6)]]


def test_supported_families():
    from transformers import LlamaConfig, MistralConfig, Qwen2Config
    assert supports_varlen(LlamaConfig()) and supports_varlen(Qwen2Config())
    assert not supports_varlen(Qwen2Config(use_sliding_window=True))
    assert not supports_varlen(MistralConfig())


@pytest.fixture()
def model(tiny_model_dir):
    from tuneforge.models.load import load_causal_lm
    m, _ = load_causal_lm(str(tiny_model_dir))
    return m


def _alone(model, ids, pos):
    out = torch.zeros(ids.shape[0], ids.shape[1], model.config.vocab_size)
    for r, spans in enumerate(segment_bounds(pos)):
        for a, b in spans:
            out[r, a:b] = model(input_ids=ids[r:r + 1, a:b], use_cache=False).logits[0]
    return out


def test_packed_equals_each_example_alone_values_and_grads(model):
    torch.manual_seed(0)
    ids = torch.randint(3, 100, (2, 14))
    pos = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3, 4, 5], list(range(10)) + [0, 1, 2, 3]])
    model.set_attn_implementation(register())
    assert model.config._attn_implementation == NAME
    packed = model(input_ids=ids, position_ids=pos).logits  # with the default cache too: still isolated
    expected = _alone(model, ids, pos)
    torch.testing.assert_close(packed, expected, rtol=1e-4, atol=1e-5)

    weights = torch.randn_like(packed)
    model.zero_grad()
    (model(input_ids=ids, position_ids=pos, use_cache=False).logits * weights).sum().backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    (_alone(model, ids, pos) * weights).sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-5)


def test_padded_and_generation_paths_equal_sdpa(model):
    torch.manual_seed(1)
    ids = torch.randint(3, 100, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, :3] = 0  # left padding, as in batched generation
    model.set_attn_implementation("sdpa")
    ref = model(input_ids=ids, attention_mask=mask).logits
    ref_gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    model.set_attn_implementation(register())
    got = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got[mask.bool()], ref[mask.bool()], rtol=1e-5, atol=1e-6)
    got_gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert torch.equal(got_gen, ref_gen)
    # an unpadded batch without packing is one causal call: same as sdpa
    model.set_attn_implementation("sdpa")
    ref_plain = model(input_ids=ids).logits
    model.set_attn_implementation(register())
    torch.testing.assert_close(model(input_ids=ids).logits, ref_plain, rtol=1e-5, atol=1e-6)


def test_training_run_uses_varlen_by_default(tiny_model_dir):
    from tuneforge.config.schema import RunConfig
    from tuneforge.run import load_model_and_tokenizer
    cfg = RunConfig.model_validate({"model": {"name": str(tiny_model_dir)}})
    m, _ = load_model_and_tokenizer(cfg)
    assert m.config._attn_implementation == NAME
    cfg = RunConfig.model_validate({"model": {"name": str(tiny_model_dir), "attn_implementation": "eager"}})
    m, _ = load_model_and_tokenizer(cfg)
    assert m.config._attn_implementation == "eager"


def test_right_padded_batch_equals_sdpa_on_real_tokens(model, monkeypatch):
    import tuneforge.models.attention as att
    seen = []
    real_sdpa = att.F.scaled_dot_product_attention
    monkeypatch.setattr(att.F, "scaled_dot_product_attention",
                        lambda *a, **k: seen.append(k.get("is_causal")) or real_sdpa(*a, **k))
    torch.manual_seed(2)
    ids = torch.randint(3, 100, (3, 10))
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[0, 6:] = 0
    mask[2, 8:] = 0
    model.set_attn_implementation("sdpa")
    ref = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    model.set_attn_implementation(register())
    seen.clear()
    got = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    torch.testing.assert_close(got[mask.bool()], ref[mask.bool()], rtol=1e-5, atol=1e-6)
    assert seen and all(seen)  # no mask was built: every attention call was a plain causal one


def test_spans_are_recomputed_for_every_new_batch(model):
    """Batches of the same shape, one after another: each is isolated by its own boundaries."""
    model.set_attn_implementation(register())
    torch.manual_seed(3)
    for pos in (torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]]), torch.tensor([[0, 1, 0, 1, 2, 3, 4, 5]]),
                torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7]])):
        ids = torch.randint(3, 100, (1, 8))
        packed = model(input_ids=ids, position_ids=pos.clone(), use_cache=False).logits
        torch.testing.assert_close(packed, _alone(model, ids, pos), rtol=1e-4, atol=1e-5)
