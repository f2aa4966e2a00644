"""Rollouts: the decoding core (eval/generation.py sample_completions) and rollouts as training rows (rl/rollout.py).

The core must agree with a plain recomputation without cache, with itself alone and inside a left-padded batch,
stop where it should, be reproducible from its generator's state, keep exactly the top-p nucleus, and return the
log-probs that training recomputes over packed prompt + completion rows (objectives/functional.py token_logps).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from tuneforge.adapters.lora import apply_lora
from tuneforge.data.collate import collate_sequences
from tuneforge.data.example import Example
from tuneforge.data.chat import TokenizedExample
from tuneforge.data.packing import PackedExamples, collate_packed_sequences
from tuneforge.eval.generation import encode_prompts, generate, inverse_cdf, left_pad, nucleus_mask, \
    sample_completions, stop_token_ids
from tuneforge.models.heads import TrainModule
from tuneforge.objectives.functional import token_logps
from tuneforge.rl.rollout import make_generator, rollout, row_seed, sampled_logps

QUESTIONS = ["Hi", "What is the capital of France? Tell me please.", "Add 2 and 3.",
             "Translate to French: hello world, and then tell me a short story about a fox."]


@pytest.fixture()
def model(tiny_model_dir):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


@pytest.fixture()
def prompts(tiny_tokenizer):
    return encode_prompts(tiny_tokenizer, [[{"role": "user", "content": q}] for q in QUESTIONS])


def _lora(tiny_model_dir, dropout=0.0):
    """A tiny LoRA policy whose adapter changes the outputs (PEFT starts lora_B at zero, a no-op)."""
    peft_model = apply_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir), r=4, alpha=8, dropout=dropout)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    return peft_model


def _sample(model, prompts, tok, n=12, **kw):
    kw = {"temperature": 0.8, "generator": make_generator(0), **kw}
    return sample_completions(model, prompts, n, stop_token_ids(tok), tok.pad_token_id, **kw)


def test_kv_cache_decoding_equals_recomputation_without_cache(model, prompts, tiny_tokenizer):
    """Each sampled token's log-prob equals log_softmax(logits / T) of a full forward over prompt + completion
    without any cache, and greedy tokens are that forward's argmax."""
    for do_sample in (True, False):
        out = _sample(model, prompts, tiny_tokenizer, do_sample=do_sample)
        scale = 0.8 if do_sample else 1.0
        for prompt, tokens, logps in zip(prompts, out.tokens, out.logps):
            ids = torch.tensor([prompt + tokens])
            with torch.no_grad():
                logits = model(input_ids=ids, use_cache=False).logits[0, len(prompt) - 1:-1]  # (n, V)
            expected = torch.log_softmax(logits / scale, -1).gather(1, torch.tensor(tokens)[:, None]).squeeze(1)
            torch.testing.assert_close(logps, expected, rtol=0, atol=1e-5)
            if not do_sample:
                assert tokens == logits.argmax(-1).tolist()


def test_a_prompt_alone_equals_it_left_padded_among_longer_ones(model, prompts, tiny_tokenizer):
    short = min(range(len(prompts)), key=lambda i: len(prompts[i]))
    assert len(prompts[short]) < max(map(len, prompts))  # it really is padded in the batch
    batch = _sample(model, prompts, tiny_tokenizer, do_sample=False)
    alone = _sample(model, [prompts[short]], tiny_tokenizer, do_sample=False)
    assert batch.tokens[short] == alone.tokens[0]
    torch.testing.assert_close(batch.logps[short], alone.logps[0], rtol=0, atol=1e-5)


def test_greedy_generate_equals_transformers_generate(model, prompts, tiny_tokenizer):
    """generate() moved off transformers' generate onto the core: its greedy replies must not change."""
    stops, pad = stop_token_ids(tiny_tokenizer), tiny_tokenizer.pad_token_id
    ids, mask = left_pad(prompts, pad)
    ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=False,
                         eos_token_id=stops, pad_token_id=pad)
    expected = [tiny_tokenizer.decode(row, skip_special_tokens=True).strip() for row in ref[:, ids.shape[1]:]]
    convs = [[{"role": "user", "content": q}] for q in QUESTIONS]
    assert generate(model, tiny_tokenizer, convs, max_new_tokens=16, batch_size=4) == expected
    ours = _sample(model, prompts, tiny_tokenizer, n=16, do_sample=False)
    for row, tokens in zip(ref[:, ids.shape[1]:].tolist(), ours.tokens):
        assert row[:len(tokens)] == tokens and all(t == pad for t in row[len(tokens):])


def test_stops_at_a_stop_id_including_pad_equal_to_it_and_at_max_new_tokens(model, prompts, tiny_tokenizer):
    """Sampled rows (varied, unlike this random model's greedy ones) with the same seed: a run with stop ids
    draws the same tokens as one without, up to each row's stop."""
    def run(stop_ids, pad_id):
        calls = []
        hook = model.get_decoder().register_forward_pre_hook(lambda *a: calls.append(1))
        out = sample_completions(model, prompts, 10, stop_ids, pad_id, temperature=2.0, generator=make_generator(0))
        hook.remove()
        return out, len(calls)

    free, _ = run([], tiny_tokenizer.pad_token_id)
    assert all(len(t) == 10 for t in free.tokens) and not any(free.stopped)  # the max_new_tokens cut
    stop = free.tokens[0][3]  # in row 0 at step 4; the stop id is the pad id too (SmolLM2's case)
    assert any(stop not in row for row in free.tokens)
    one_stop, _ = run([stop], stop)
    every_row_stops, calls = run(sorted({row[2] for row in free.tokens}), stop)
    for out, stops in ((one_stop, [stop]), (every_row_stops, [row[2] for row in free.tokens])):
        for row, tokens, stopped in zip(free.tokens, out.tokens, out.stopped):
            cut = next((i + 1 for i, t in enumerate(row) if t in stops), None)
            assert tokens == row[:cut] and stopped == (cut is not None)  # stop token kept, nothing after it
    assert one_stop.tokens[0] == free.tokens[0][:4] and len(one_stop.tokens[1]) == 10
    assert max(map(len, every_row_stops.tokens)) <= 3 and all(every_row_stops.stopped)
    assert calls == max(map(len, every_row_stops.tokens))  # the prompt pass, then one step per later token: early exit


def test_same_seed_same_samples_and_a_saved_generator_state_continues_identically(model, prompts,
                                                                                 tiny_tokenizer, tmp_path):
    def two_draws(gen, save=None):
        first = _sample(model, prompts, tiny_tokenizer, generator=gen, temperature=1.5)
        if save:
            save_file({"rng": gen.get_state()}, save)  # what a checkpoint stores (no pickle)
        return first, _sample(model, prompts, tiny_tokenizer, generator=gen, temperature=1.5)

    a1, a2 = two_draws(make_generator(7))
    b1, b2 = two_draws(make_generator(7), save=tmp_path / "rng.safetensors")
    assert a1.tokens == b1.tokens and a2.tokens == b2.tokens
    assert a1.tokens != a2.tokens  # the generator advances
    assert _sample(model, prompts, tiny_tokenizer, generator=make_generator(8), temperature=1.5).tokens != a1.tokens
    resumed = torch.Generator()
    resumed.set_state(load_file(tmp_path / "rng.safetensors")["rng"])
    c2 = _sample(model, prompts, tiny_tokenizer, generator=resumed, temperature=1.5)
    assert c2.tokens == a2.tokens
    for x, y in zip(c2.logps, a2.logps):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_top_p_keeps_exactly_the_nucleus():
    probs = torch.tensor([[0.0625, 0.5, 0.1875, 0.25]])
    kept = {p: nucleus_mask(probs, p)[0].tolist() for p in (0.1, 0.5, 0.75, 0.76, 0.9375, 0.94, 1.0)}
    assert kept[0.1] == kept[0.5] == [False, True, False, False]
    assert kept[0.75] == [False, True, False, True]
    assert kept[0.76] == kept[0.9375] == [False, True, True, True]
    assert kept[0.94] == kept[1.0] == [True, True, True, True]


def test_a_tiny_nucleus_samples_the_greedy_tokens(model, prompts, tiny_tokenizer):
    """top_p reaches the sampler: with a nucleus of one token, sampling at a high temperature is greedy."""
    greedy = _sample(model, prompts, tiny_tokenizer, do_sample=False)
    hot = _sample(model, prompts, tiny_tokenizer, temperature=3.0, top_p=1e-6)
    assert hot.tokens == greedy.tokens
    assert _sample(model, prompts, tiny_tokenizer, temperature=3.0).tokens != greedy.tokens


def _prompt_examples(prompts):
    return [Example([TokenizedExample(p, [0] * len(p))], [0], ("prompt",), {"prompt": f"q{i}", "reference": None})
            for i, p in enumerate(prompts)]


def _recompute(module, rollouts, layout):
    """token_logps over the rollouts as training batches them: one sequence per row, or packed rows."""
    examples = rollouts.examples(share_prompt=layout == "shared")
    if layout == "packed":
        rows = PackedExamples(examples, capacity=max(map(len, examples)) * 2)[:]
        assert any(len(r) > 1 for r in rows)  # several sequences share a row
        batch, order = collate_packed_sequences(rows, pad_id=0), [ex for row in rows for ex in row]
    elif layout == "shared":  # online RL's layout: each group's prompt once, [prompt + c1][c2][c3]
        assert all(len(ex.sequences) == 3 and ex.shared_prefix > 0 for ex in examples)
        batch, order = collate_packed_sequences([examples], pad_id=0, share_prompt=True), examples
        assert int(batch["num_real"]) == sum(ex.packed_length(True) for ex in examples) < sum(map(len, examples))
    else:
        batch, order = collate_sequences(examples, pad_id=0), examples
    with torch.no_grad():
        logps, seq = token_logps(module, batch, chunk_size=7, temperature=0.7)
    lengths = [len(rollouts.logps[i]) for e in order for i in e.texts["rollouts"]]
    assert torch.equal(seq, torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)))
    return logps, sampled_logps(rollouts, order)


@pytest.mark.parametrize("layout", ["rows", "packed", "shared"])
def test_rollout_logps_equal_token_logps_recomputed_over_training_rows(tiny_model_dir, prompts, tiny_tokenizer,
                                                                     layout):
    """The same numbers from two paths (issue 11), for the LoRA policy and for the reference (adapter off)."""
    policy = _lora(tiny_model_dir)
    if layout == "shared":  # continuations attending to their prompt: tuneforge_varlen only
        from tuneforge.models.attention import register
        policy.get_base_model().set_attn_implementation(register())
    module = TrainModule(policy)
    kw = dict(max_new_tokens=9, stop_ids=stop_token_ids(tiny_tokenizer), pad_id=tiny_tokenizer.pad_token_id,
              num_generations=3, temperature=0.7, top_p=0.9, batch_size=5)
    ours = rollout(module, _prompt_examples(prompts), generator=make_generator(3), **kw)
    assert ours.group == [g for g in range(len(prompts)) for _ in range(3)] and len(ours) == 12
    got, expected = _recompute(module, ours, layout)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    with policy.disable_adapter():
        reference = rollout(module, _prompt_examples(prompts), generator=make_generator(3), **kw)
        ref_got, ref_expected = _recompute(module, reference, layout)
        torch.testing.assert_close(ref_got, ref_expected, rtol=0, atol=1e-5)
        on_policy_tokens, _ = _recompute(module, ours, layout)
    assert not torch.allclose(on_policy_tokens, got, atol=1e-3)  # the adapter matters: two different models


def test_rollout_examples_supervise_the_completion_and_its_stop_token(model, prompts, tiny_tokenizer):
    stop = tiny_tokenizer.pad_token_id  # pad == end of turn, as in SmolLM2
    out = rollout(model, _prompt_examples(prompts), max_new_tokens=6, stop_ids=[stop], pad_id=stop,
                  generator=make_generator(0), temperature=2.0)
    for ex, p, c in zip(out.examples(), out.prompt_ids, out.completion_ids):
        seq = ex["completion"]
        assert seq.input_ids == p + c and seq.loss_mask == [0] * len(p) + [1] * len(c)
    batch = collate_sequences(out.examples(), pad_id=stop)
    select = batch["loss_mask"][:, 1:].bool()
    assert int(select.sum()) == out.num_tokens  # stop tokens stay in the loss although they equal the pad id


def test_generation_runs_in_eval_mode_and_restores_each_module_mode(tiny_model_dir, prompts, tiny_tokenizer):
    policy = _lora(tiny_model_dir, dropout=0.5)
    module = TrainModule(policy).train()
    policy.base_model.model.lm_head.eval()  # a module deliberately left in eval mode stays so
    modes = {name: m.training for name, m in module.named_modules()}
    runs = [_sample(module, prompts, tiny_tokenizer, do_sample=False) for _ in range(2)]
    assert {name: m.training for name, m in module.named_modules()} == modes
    reference = _sample(module.eval(), prompts, tiny_tokenizer, do_sample=False)
    assert runs[0].tokens == runs[1].tokens == reference.tokens  # no dropout while sampling
    for x, y in zip(runs[0].logps, reference.logps):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_seeded_rows_sample_the_same_in_any_decoding_batch(model, prompts, tiny_tokenizer):
    """Per-row seeds (online RL's row_seed): a row draws the same tokens alone, in a padded batch with other
    prompts, or in another order; its log-probs agree to float rounding (the batch's padding changes shapes)."""
    seeds = [row_seed(3, 5, place, 0) for place in range(len(prompts))]
    together = _sample(model, prompts, tiny_tokenizer, generator=None, seeds=seeds, temperature=1.5, top_p=0.95)
    backwards = _sample(model, prompts[::-1], tiny_tokenizer, generator=None, seeds=seeds[::-1], temperature=1.5,
                        top_p=0.95)
    for r, (p, s) in enumerate(zip(prompts, seeds)):
        alone = _sample(model, [p], tiny_tokenizer, generator=None, seeds=[s], temperature=1.5, top_p=0.95)
        for other in (alone, backwards):
            k = 0 if other is alone else len(prompts) - 1 - r
            assert other.tokens[k] == together.tokens[r]
            torch.testing.assert_close(other.logps[k], together.logps[r], rtol=0, atol=1e-5)
    assert len({tuple(t) for t in together.tokens}) == len(prompts)
    other_step = _sample(model, prompts, tiny_tokenizer, generator=None, temperature=1.5, top_p=0.95,
                         seeds=[row_seed(3, 6, place, 0) for place in range(len(prompts))])
    assert other_step.tokens != together.tokens  # the step enters the seed


def test_inverse_cdf_draws_by_weight_and_never_a_zero_weight_token():
    weights = torch.tensor([[0.0, 0.25, 0.0, 0.75, 0.0]] * 5)
    u = torch.tensor([0.0, 0.2499, 0.25, 0.9999, 1.0 - 2 ** -24])
    assert inverse_cdf(weights, u).tolist() == [1, 1, 3, 3, 3]
    edge = torch.tensor([[0.3, 0.7, 0.0]])  # u x total rounding up to the total: still the last token with weight
    assert inverse_cdf(edge, torch.tensor([1.0])).tolist() == [1]
    draws = inverse_cdf(torch.tensor([[0.1, 0.0, 0.6, 0.3]]).expand(20000, 4),
                        torch.rand(20000, generator=torch.Generator().manual_seed(0)))
    freq = torch.bincount(draws, minlength=4).double() / 20000
    torch.testing.assert_close(freq, torch.tensor([0.1, 0.0, 0.6, 0.3], dtype=torch.float64), atol=0.015, rtol=0)
