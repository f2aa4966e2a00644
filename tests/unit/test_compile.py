"""`train.compile`: the compiled decoder gives the eager model's loss and gradients on packed LoRA batches,
and compiles once: packed rows have one width, and the parts whose shapes or branch counts change with every
batch (varlen attention's example spans, the dropout mask's draw count) run outside the graph."""

import json
import random

import torch

from helpers.runs import make_config, update_sums, write_chat_data
from tuneforge.adapters.fused_dropout import fuse_lora_dropout
from tuneforge.adapters.lora import apply_lora
from tuneforge.data.dataset import prepare_data
from tuneforge.data.packing import PackedExamples, collate_packed
from tuneforge.models.attention import NAME
from tuneforge.models.load import load_causal_lm
from tuneforge.objectives.sft import SFTObjective
from tuneforge.models.heads import unwrap


def _varied_chats(path, n=24):
    rng = random.Random(0)
    words = "alpha beta gamma delta echo fox golf hotel india".split()
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            q, a = (" ".join(rng.choices(words, k=rng.randint(1, 12))) for _ in range(2))
            f.write(json.dumps({"messages": [{"role": "user", "content": q},
                                             {"role": "assistant", "content": a}]}) + "\n")
    return path


def _lora_model(model_dir):
    model, tok = load_causal_lm(str(model_dir), attn_implementation=NAME)
    torch.manual_seed(0)
    model = apply_lora(model, r=4, alpha=8, dropout=0.1)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero; non-zero B makes every gradient non-trivial
            torch.nn.init.normal_(p, std=0.1)
    fuse_lora_dropout(model)
    return model.train(), tok


def test_compiled_packed_lora_matches_eager_and_compiles_once(tiny_model_dir, tmp_path):
    from torch._dynamo.utils import counters

    cfg = make_config(tiny_model_dir, _varied_chats(tmp_path / "c.jsonl"), tmp_path / "run")
    eager, tok = _lora_model(tiny_model_dir)
    compiled, _ = _lora_model(tiny_model_dir)
    torch._dynamo.reset()
    unwrap(compiled).get_decoder().compile()
    packed = PackedExamples(prepare_data(cfg, tok, "chat").train, capacity=160)
    rows = [packed[i] for i in range(len(packed))]
    batches = [collate_packed(rows[i:i + 2], tok.pad_token_id, width=160) for i in range(0, 6, 2)]
    assert all(b["input_ids"].shape == (2, 160) for b in batches)
    assert len({tuple(b["position_ids"].flatten().tolist()) for b in batches}) == 3  # different boundaries
    objective = SFTObjective()
    graphs = []
    for i, batch in enumerate(batches):
        results = []
        for model in (eager, compiled):
            torch.manual_seed(100 + i)  # the same dropout masks on both sides
            loss_sum, count, grads = update_sums(model, objective, [batch])
            results.append((torch.tensor(loss_sum / count), grads))
        (loss_e, grads_e), (loss_c, grads_c) = results
        torch.testing.assert_close(loss_c, loss_e, rtol=1e-4, atol=1e-5)
        assert grads_e.keys() == grads_c.keys() and len(grads_e) > 0
        for name in grads_e:
            torch.testing.assert_close(grads_c[name], grads_e[name], rtol=1e-3, atol=1e-5)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] > 0 and graphs[1] == graphs[0] and graphs[2] == graphs[0]  # no recompile after batch 1


def test_collate_packed_width_pads_without_changing_the_loss(tiny_model_dir, tmp_path):
    cfg = make_config(tiny_model_dir, write_chat_data(tmp_path / "c.jsonl", n=8), tmp_path / "run")
    model, tok = load_causal_lm(str(tiny_model_dir), attn_implementation=NAME)
    packed = PackedExamples(prepare_data(cfg, tok, "chat").train, capacity=160)
    rows = [packed[0], packed[1]]
    tight = collate_packed(rows, tok.pad_token_id)
    wide = collate_packed(rows, tok.pad_token_id, width=200)
    assert tight["input_ids"].shape[1] < 200 and wide["input_ids"].shape[1] == 200
    assert int(wide["num_real"]) == int(tight["num_real"])
    (sum_a, count_a, _), (sum_b, count_b, _) = (update_sums(model, SFTObjective(), [b]) for b in (tight, wide))
    assert count_a == count_b > 0
    assert abs(sum_a - sum_b) <= 1e-5 * abs(sum_a)
