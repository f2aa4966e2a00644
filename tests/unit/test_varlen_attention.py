"""tuneforge_varlen attention (tuneforge/models/attention.py): packed rows equal each example run alone;
padded and cached (generation) paths equal transformers' SDPA."""

import pytest
import torch

from tuneforge.models.attention import NAME, attention_spans, register, segment_bounds, supports_varlen


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


def _cached_forward(model, impl, ids, mask, prompt_len, cache_kind):
    """Fill a cache with ids[:, :prompt_len], then run the rest as one multi-token forward on top of it, then one
    more single token (decode): the logits of both later forwards."""
    from transformers import DynamicCache, StaticCache
    model.set_attn_implementation(impl)
    cache = (DynamicCache(config=model.config) if cache_kind == "dynamic"
             else StaticCache(config=model.config, max_cache_len=ids.shape[1] + 4))
    with torch.no_grad():
        model(input_ids=ids[:, :prompt_len], attention_mask=None if mask is None else mask[:, :prompt_len],
              cache=cache)
        chunk = model(input_ids=ids[:, prompt_len:-1], attention_mask=None if mask is None else mask[:, :-1],
                      cache=cache).logits
        step = model(input_ids=ids[:, -1:], attention_mask=mask, cache=cache).logits
    return chunk, step


@pytest.mark.parametrize("cache_kind", ["dynamic", "static"])
@pytest.mark.parametrize("padding", ["no mask", "all ones", "left padded"])
def test_multi_token_forward_on_a_cached_prefix_equals_sdpa(model, padding, cache_kind):
    """Prompt-cache reuse, assisted decoding, RL rollouts continuing a cached prompt: queries start after the cached
    keys, so the causal diagonal is offset. (This once went wrong: the all-ones mask was dropped and SDPA cropped
    the keys to the query length, 0.2 off in the logits.)"""
    torch.manual_seed(4)
    ids = torch.randint(3, 100, (3, 13))
    mask = None if padding == "no mask" else torch.ones(3, 13, dtype=torch.long)
    if padding == "left padded":
        mask[0, :4] = 0
        mask[2, :1] = 0
    ref_chunk, ref_step = _cached_forward(model, "sdpa", ids, mask, 7, cache_kind)
    eager_chunk, _ = _cached_forward(model, "eager", ids, mask, 7, cache_kind)
    got_chunk, got_step = _cached_forward(model, register(), ids, mask, 7, cache_kind)
    real = slice(None) if mask is None else mask[:, 7:-1].bool()
    torch.testing.assert_close(eager_chunk[real], ref_chunk[real], rtol=1e-5, atol=1e-5)  # the tolerance is fair
    torch.testing.assert_close(got_chunk[real], ref_chunk[real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_step, ref_step, rtol=1e-5, atol=1e-5)


def test_generation_continuing_a_cached_prompt_equals_sdpa(model):
    """generate() given a cache that holds part of the prompt: the prompt's rest is one multi-token forward."""
    from transformers import DynamicCache
    torch.manual_seed(5)
    ids = torch.randint(3, 100, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    out = {}
    for impl in ("sdpa", register()):
        model.set_attn_implementation(impl)
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model(input_ids=ids[:, :6], attention_mask=mask[:, :6], cache=cache)
        out[impl] = model.generate(input_ids=ids, attention_mask=mask, cache=cache, max_new_tokens=5,
                                   do_sample=False, output_logits=True, return_dict_in_generate=True)
    ref, got = out["sdpa"], out[NAME]
    assert torch.equal(got.sequences, ref.sequences)
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(ref.logits), rtol=1e-5, atol=1e-5)


def test_declared_torch_floor_has_sdpa_enable_gqa():
    """varlen_sdpa passes `enable_gqa` to F.scaled_dot_product_attention, new in torch 2.5 (the newest torch API
    tuneforge uses): the declared dependency must not admit an older torch."""
    from pathlib import Path

    from packaging.requirements import Requirement
    from packaging.version import Version

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    deps = [Requirement(d) for d in tomllib.loads(pyproject.read_text())["project"]["dependencies"]]
    torch_req = next(r for r in deps if r.name == "torch")
    floors = [Version(s.version) for s in torch_req.specifier if s.operator in (">=", "==", "~=")]
    assert floors and max(floors) >= Version("2.5"), f"{pyproject}: torch requirement '{torch_req}' admits < 2.5"


def test_attention_spans_mark_continuations():
    # [prompt 0..2 + chosen 3..4][rejected 3..5][ordinary 0..1][pad 0..1]; a row whose first span starts at 5
    pos = torch.tensor([[0, 1, 2, 3, 4, 3, 4, 5, 0, 1, 0, 1], [5, 6, 0, 1, 2, 3, 4, 2, 3, 0, 1, 2]])
    assert attention_spans(pos) == [[(0, 5, 0, 0), (5, 8, 0, 3), (8, 10, 8, 0), (10, 12, 10, 0)],
                                    [(0, 2, 0, 0), (2, 7, 2, 0), (7, 9, 2, 2), (9, 12, 9, 0)]]
    with pytest.raises(ValueError, match="restart at 4"):  # longer than the span starting at 0 before it
        attention_spans(torch.tensor([[0, 1, 2, 4, 5]]))
    with pytest.raises(ValueError, match="restart at 2"):  # no span starting at 0 before it
        attention_spans(torch.tensor([[5, 6, 2, 3]]))


def _shared_row_layout():
    """Two rows of packed preference pairs with the prompt once, plus an ordinary example and padding: the
    position ids, and for each token where it sits in a sequence run alone ((sequence id, column))."""
    # (prompt, chosen, rejected) lengths per pair; "ordinary" examples (0, n, 0) are one plain sequence
    rows = [[(5, 4, 3), (0, 6, 0), (4, 2, 5)], [(3, 3, 4), (6, 1, 2)]]
    width = max(sum(p + c + r for p, c, r in row) for row in rows) + 2
    pos = torch.zeros(len(rows), width, dtype=torch.long)
    alone = []  # every sequence as run alone, as the (row, column) of each of its tokens in the packed rows
    for b, row in enumerate(rows):
        at = 0
        for p, c, r in row:
            pos[b, at:at + p + c] = torch.arange(p + c)
            alone.append([(b, at + j) for j in range(p + c)])
            if r:
                pos[b, at + p + c:at + p + c + r] = torch.arange(p, p + r)
                alone.append([(b, at + j) for j in range(p)] + [(b, at + p + c + j) for j in range(r)])
            at += p + c + r
        pos[b, at:] = torch.arange(width - at)
        alone.append([(b, at + j) for j in range(width - at)])
    return pos, alone


def test_continuation_equals_prompt_and_answer_run_alone(model, monkeypatch):
    """A rejected answer packed after its prompt + chosen answer (positions restarting at len(prompt)) gets the
    logits and gradients of prompt + rejected run as its own sequence; GQA (4 query heads, 2 key/value heads),
    several pairs and an ordinary example per row. Gradients reach the shared prompt from both answers: the
    sum of the two unpacked copies' gradients."""
    import tuneforge.models.attention as att
    assert model.config.num_attention_heads != model.config.num_key_value_heads  # GQA
    calls = []
    real_sdpa = att.F.scaled_dot_product_attention
    monkeypatch.setattr(att.F, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(k.get("attn_mask") is not None) or real_sdpa(*a, **k))
    torch.manual_seed(6)
    pos, alone = _shared_row_layout()
    ids = torch.randint(3, 100, pos.shape)
    model.set_attn_implementation(register())
    packed = model(input_ids=ids, position_ids=pos, use_cache=False).logits
    # only the 4 continuations (per layer) get a mask; every other span stays one is_causal call
    assert sum(calls) == 4 * model.config.num_hidden_layers and not all(calls)
    weights = torch.randn_like(packed)
    model.zero_grad()
    (packed * weights).sum().backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad()
    seen = torch.zeros(pos.shape, dtype=torch.bool)
    total = 0.0
    for cols in alone:
        rows_, where = [b for b, _ in cols], [j for _, j in cols]
        out = model(input_ids=ids[rows_, where][None], use_cache=False).logits[0]  # positions 0.. by default
        new = ~seen[rows_, where]  # a shared prompt's logits count once (from its prompt + chosen run)
        # float32 sums in another order (and thread split): one logit in 12k was seen 1.9e-5 off; a wrong mask
        # is off by 1e-1
        torch.testing.assert_close(packed[rows_, where][new], out[new].detach(), rtol=1e-4, atol=1e-4)
        total = total + (out[new] * weights[rows_, where][new]).sum()
        seen[rows_, where] = True
    assert bool(seen.all())
    total.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-4)
