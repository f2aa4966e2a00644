"""Generation: left padding makes batched output equal to one-by-one output; end-of-turn stops it."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from tuneforge.data.chat import prompt_messages, tokenize_chat
from tuneforge.data.records import ChatRecord, Message
from tuneforge.errors import AuditError
from tuneforge.eval.generation import generate, stop_token_ids


def test_batched_generation_equals_single(tiny_model_dir, tiny_tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    convs = [[{"role": "user", "content": "Hi"}],
             [{"role": "user", "content": "What is the capital of France? Tell me please."}]]
    batched = generate(model, tiny_tokenizer, convs, max_new_tokens=6, batch_size=2)
    single = [generate(model, tiny_tokenizer, [c], max_new_tokens=6)[0] for c in convs]
    assert batched == single


def test_stop_tokens_include_end_of_turn(tiny_tokenizer):
    assert tiny_tokenizer.convert_tokens_to_ids("<|im_end|>") in stop_token_ids(tiny_tokenizer)


class PromptRecorder:
    """Records the prompt ids generate() feeds the model (padding removed): a hook on the tiny model's decoder
    reads the first forward of each batch, the one that fills the cache with the prompts."""

    def __init__(self, model_dir):
        self.model = AutoModelForCausalLM.from_pretrained(model_dir)
        self.prompts: list[list[int]] = []
        self.model.get_decoder().register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, _module, _args, kwargs):
        ids, mask = kwargs["input_ids"], kwargs["attention_mask"]
        if kwargs["cache"].get_seq_length() == 0:  # the prompt pass, not a decoding step
            mask = torch.ones_like(ids) if mask is None else mask
            self.prompts += [row[keep.bool()].tolist() for row, keep in zip(ids, mask)]


CONVERSATIONS = {
    "one turn": [Message("user", "Add 2 and 3."), Message("assistant", "5")],
    "two turns": [Message("user", "Hi"), Message("assistant", "Hello."), Message("user", "And?"),
                  Message("assistant", "Fine.")],
    "own system message": [Message("system", "Answer in French."), Message("user", "Hi"),
                           Message("assistant", "Bonjour.")],
    "assistant opens": [Message("assistant", "Hello, how can I help?")],
}


@pytest.mark.parametrize("system_prompt", [None, "Be brief."])
@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_generation_prompt_is_the_prompt_training_supervises_after(tiny_tokenizer, tiny_model_dir, name,
                                                                   system_prompt):
    """Training and inference must agree: the ids generate() feeds the model for a conversation's last reply are
    exactly the ids before that reply in the training example, with the same system-prompt handling."""
    record = ChatRecord(CONVERSATIONS[name])
    ex = tokenize_chat(tiny_tokenizer, record, mask="last", system_prompt=system_prompt)
    recorder = PromptRecorder(tiny_model_dir)
    generate(recorder.model, tiny_tokenizer, [prompt_messages(record)], max_new_tokens=1, system_prompt=system_prompt)
    assert recorder.prompts == [ex.input_ids[:ex.loss_mask.index(1)]]
    prompt = tiny_tokenizer.decode(recorder.prompts[0])
    has_own = record.messages[0].role == "system"
    assert ("Be brief." in prompt) == (system_prompt is not None and not has_own)
    assert ("Answer in French." in prompt) == has_own
    assert ("tiny helpful assistant" in prompt) == (system_prompt is None and not has_own)  # the template's default


def test_generation_without_a_chat_template_says_what_to_set(tiny_tokenizer, tiny_model_dir):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = None
    with pytest.raises(AuditError, match="data.chat_template"):
        generate(PromptRecorder(tiny_model_dir).model, tok, [[{"role": "user", "content": "Hi"}]])


def test_a_repeated_prompt_is_prefilled_once_and_samples_as_alone(tiny_model_dir):
    """Consecutive equal prompts (an RL group's samples) share one prefill, whose cache is copied to their rows;
    each row still samples what it samples alone (its own seed), with the same log-probs."""
    from tuneforge.eval.generation import sample_completions
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    p, q = [5, 17, 42, 99], [1, 2, 3]
    prompts, seeds = [p, p, p, q, q, p], [11, 12, 13, 14, 15, 16]
    prefill_rows = []
    hook = model.model.register_forward_pre_hook(
        lambda mod, args, kw: prefill_rows.append(kw["input_ids"].shape) if kw["input_ids"].shape[1] > 1 else None,
        with_kwargs=True)
    together = sample_completions(model, prompts, 7, [], 0, temperature=1.0, seeds=seeds)
    hook.remove()
    assert prefill_rows == [torch.Size([3, 4])]  # p, q, p: three runs of equal prompts, prefilled once each
    for r, (prompt, seed) in enumerate(zip(prompts, seeds)):
        alone = sample_completions(model, [prompt], 7, [], 0, temperature=1.0, seeds=[seed])
        assert alone.tokens[0] == together.tokens[r]
        torch.testing.assert_close(alone.logps[0], together.logps[r], rtol=0, atol=1e-5)
    assert len({tuple(t) for t in together.tokens[:3]}) > 1  # the copies of p sampled differently


def test_lora_branches_decode_in_float32_under_cpu_autocast_and_are_restored(tiny_model_dir):
    """Thin LoRA matmuls run in float32 while decoding under CPU autocast (faster there, and more exact): the
    sampled log-probs then match a float32 LoRA branch, not a bf16 one; the layers' own forward is back after."""
    from tuneforge.adapters.lora import apply_lora
    from tuneforge.eval.generation import sample_completions, thin_lora_in_float32
    torch.manual_seed(0)
    model = apply_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir), r=4, alpha=8, dropout=0.0).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    layers = [m for m in model.modules() if type(m) is torch.nn.Linear and m.weight.shape[0] == 4]  # lora_A
    assert layers and all("forward" not in vars(m) for m in layers)
    seen = []
    with torch.autocast("cpu", dtype=torch.bfloat16), thin_lora_in_float32(model, torch.device("cpu")):
        assert all("forward" in vars(m) for m in layers)
        x = torch.randn(3, layers[0].in_features)
        seen.append(layers[0](x).dtype)
    assert seen == [torch.float32]
    assert all("forward" not in vars(m) for m in layers)  # restored
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sample_completions(model, [[5, 17, 42, 99]], 5, [], 0, temperature=1.0, seeds=[3])
    assert all("forward" not in vars(m) for m in layers) and len(out.tokens[0]) == 5


def test_forwards_replaced_restores_every_forward_even_on_error():
    from tuneforge.eval.generation import forwards_replaced
    layers = [torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)]
    x = torch.ones(1, 2)
    want = [layer(x) for layer in layers]
    with pytest.raises(RuntimeError, match="inside"):
        with forwards_replaced([(layer, lambda x: x * 0) for layer in layers]):
            assert all(float(layer(x).abs().sum()) == 0 for layer in layers)
            raise RuntimeError("inside")
    assert all("forward" not in vars(layer) for layer in layers)
    for layer, w in zip(layers, want):
        torch.testing.assert_close(layer(x), w)
