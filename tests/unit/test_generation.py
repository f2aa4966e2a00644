"""Generation: left padding makes batched output equal to one-by-one output; end-of-turn stops it."""

from __future__ import annotations

from transformers import AutoModelForCausalLM

from tuneforge.eval.generation import generate, stop_token_ids
from tuneforge.eval.task import score


def test_batched_generation_equals_single(tiny_model_dir, tiny_tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    convs = [[{"role": "user", "content": "Hi"}],
             [{"role": "user", "content": "What is the capital of France? Tell me please."}]]
    batched = generate(model, tiny_tokenizer, convs, max_new_tokens=6, batch_size=2)
    single = [generate(model, tiny_tokenizer, [c], max_new_tokens=6)[0] for c in convs]
    assert batched == single


def test_stop_tokens_include_end_of_turn(tiny_tokenizer):
    assert tiny_tokenizer.convert_tokens_to_ids("<|im_end|>") in stop_token_ids(tiny_tokenizer)


def test_scores():
    assert score(" BILLING ", "BILLING") == {"exact": 1.0, "lenient": 1.0}
    assert score("It is billing.", "BILLING") == {"exact": 0.0, "lenient": 1.0}
    assert score("SHIPPING", "BILLING") == {"exact": 0.0, "lenient": 0.0}
