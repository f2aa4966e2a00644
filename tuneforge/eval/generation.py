"""Generation that renders prompts exactly as training did: same chat template, same system-prompt
handling, left padding for batches, stop at the end-of-turn token, greedy by default, KV cache on.

One decoding core, `sample_completions`, serves inference (`generate`: eval, chat, rank) and RL rollouts
(rl/rollout.py), so what the policy is evaluated on and what it is trained on are sampled the same way."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tuneforge.data.chat import generation_prompt, with_system_prompt
from tuneforge.errors import TuneforgeError
from tuneforge.models.heads import as_train_module, train_module, unwrap
from tuneforge.objectives.logprobs import head_logits

END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


def stop_token_ids(tokenizer) -> list[int]:
    """End-of-turn ids: the tokenizer's eos plus any known end-of-turn marker it has."""
    vocab = tokenizer.get_vocab()
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    ids |= {vocab[t] for t in END_OF_TURN_TOKENS if t in vocab}
    return sorted(ids)


def encode_prompts(tokenizer, conversations: list[list[dict]], system_prompt: str | None = None) -> list[list[int]]:
    """The ids each conversation's next assistant turn is generated after: rendered by the functions training
    renders with (system prompt, generation prompt), so inference sees what the model was trained on."""
    return [tokenizer(generation_prompt(tokenizer, with_system_prompt(c, system_prompt)),
                      add_special_tokens=False)["input_ids"] for c in conversations]


@torch.no_grad()
def generate(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int = 64, batch_size: int = 16,
             system_prompt: str | None = None, do_sample: bool = False, temperature: float = 1.0,
             top_p: float = 1.0, adapter: str | None = None) -> list[str]:
    """Continue each conversation with one assistant turn; returns the decoded replies (special tokens cut).
    Sampling (do_sample) draws from torch's global generator, so `torch.manual_seed` before a call fixes it.
    `adapter`: the loaded LoRA adapter that answers (BASE_ADAPTER: none), in place of the active one."""
    stops = stop_token_ids(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    replies: list[str] = []
    for start in range(0, len(conversations), batch_size):
        rows = encode_prompts(tokenizer, conversations[start:start + batch_size], system_prompt)
        out = sample_completions(model, rows, max_new_tokens, stops, pad_id, temperature=temperature, top_p=top_p,
                                 do_sample=do_sample, adapter_names=None if adapter is None else [adapter] * len(rows))
        replies += [tokenizer.decode(row, skip_special_tokens=True).strip() for row in out.tokens]
    return replies


@dataclass
class Completions:
    """What `sample_completions` returns, one entry per prompt row."""

    tokens: list[list[int]]
    """Completion ids: the stop token included when one was hit, nothing after it."""
    logps: list[torch.Tensor]
    """(n_i,) float32 log-prob of each sampled token under the distribution it was drawn from (see there)."""
    stopped: list[bool]
    """True where the row ended at a stop id, False where max_new_tokens cut it."""

    @property
    def num_tokens(self) -> int:
        return sum(map(len, self.tokens))


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids and attention mask, every prompt ending at the last column where generation starts."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise TuneforgeError("generation needs at least one prompt token in every row (an empty prompt was given)")
    longest = max(map(len, prompts))
    ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), longest), dtype=torch.long)
    for r, row in enumerate(prompts):
        ids[r, longest - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[r, longest - len(row):] = 1
    return ids, mask


def nucleus_mask(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Top-p (Holtzman et al. 2020, "The Curious Case of Neural Text Degeneration", sec. 3.1): per row (B, V), the
    smallest set of most probable tokens whose mass reaches top_p, as a boolean (B, V) mask. A token is kept when
    the mass of the tokens strictly more probable than it (in sorted order) is still below top_p, so the most
    probable token is always kept."""
    if top_p >= 1.0:
        return torch.ones_like(probs, dtype=torch.bool)
    sorted_p, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_p.cumsum(-1) - sorted_p
    keep_sorted = mass_before < top_p
    return torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)


@contextlib.contextmanager
def eval_mode(model):
    """Every submodule in eval mode (no dropout while sampling), each one's own mode restored afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def _float32_linear(layer, x: torch.Tensor) -> torch.Tensor:
    # the flag flipped directly: a torch.autocast context per call costs more than this matmul
    torch.set_autocast_enabled("cpu", False)
    try:
        return F.linear(x.float(), layer.weight, layer.bias)
    finally:
        torch.set_autocast_enabled("cpu", True)


@contextlib.contextmanager
def forwards_replaced(replacements: list[tuple[torch.nn.Module, Callable]]):
    """Each module's forward replaced by its function (an instance attribute, shadowing the class's) while
    inside; every one restored on exit, an error included. The one way the decoding contexts below patch
    layers."""
    done = []
    try:
        for module, forward in replacements:
            module.forward = forward
            done.append(module)
        yield
    finally:
        for module in done:
            del module.forward


@contextlib.contextmanager
def thin_lora_in_float32(model, device: torch.device):
    """While decoding under autocast on a CPU, the LoRA branches' thin matmuls (16 rows x 576 x r=16 for
    SmolLM2) in float32, the adapter's own dtype: oneDNN's bf16 path takes 3-5x longer on such shapes than
    float32 (2-core Xeon with AMX: 18 vs 5 us for x @ A.T, 27 vs 10 us for (x A.T) @ B.T), and the autocast
    copies of A and B at every step go too. Float32 is the more exact of the two, so the sampled tokens' log-
    probs stay within bf16 precision of the ones training recomputes. Restored on exit."""
    if device.type != "cpu" or not torch.is_autocast_enabled("cpu"):
        yield
        return
    patched = []
    for module in model.modules():
        for name in ("lora_A", "lora_B"):
            branch = getattr(module, name, None)
            if not isinstance(branch, torch.nn.ModuleDict):
                continue
            for layer in branch.values():
                if isinstance(layer, torch.nn.Linear) and layer.weight.dtype == torch.float32:
                    patched.append((layer, functools.partial(_float32_linear, layer)))
    with forwards_replaced(patched):
        yield


def _packed_linear(packed: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype, x: torch.Tensor):
    return torch.ops.mkldnn._linear_pointwise(x.to(dtype), packed, bias, "none", [], "")


def native_bf16_packing() -> bool:
    """Whether this CPU build has oneDNN with native bf16 (AMX / AVX512-BF16) and its weight-packing ops."""
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _can_pack(device: torch.device) -> bool:
    return (device.type == "cpu" and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16 and native_bf16_packing())


def _merged_weight(layer, dtype: torch.dtype) -> torch.Tensor | None:
    """A PEFT LoRA linear layer's effective weight: its base weight where the adapters are disabled (the
    reference) or already merged, else the base as autocast reads it (rounded to `dtype`) + the active adapters'
    deltas, summed in float32, so the result does not depend on whether the frozen base is stored in float32 or
    in `dtype` (lora.frozen_dtype); None where the layer is not a plain LoRA linear (DoRA and other variants
    keep their own forward)."""
    base = getattr(layer, "base_layer", None)
    if not isinstance(base, torch.nn.Linear):
        return None
    if layer.disable_adapters or layer.merged:
        return base.weight.detach()
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    if any(layer.use_dora.get(a, False) for a in active) or any(layer.lora_variant.get(a) for a in active):
        return None
    weight = base.weight.detach().to(dtype).float()
    for a in active:
        weight = weight + layer.get_delta_weight(a).detach().float()
    return weight


@contextlib.contextmanager
def packed_bf16_linears(body, device: torch.device, rows: int):
    """While decoding under bf16 autocast on a CPU with native bf16 (AMX / AVX512-BF16), every linear layer of
    the decoder body runs on a copy of its weight reordered once into oneDNN's blocked layout, instead of oneDNN
    reordering (and, for a float32 weight, autocast casting) the weight at every call of every step. A LoRA
    layer's copy is its effective weight, bf16 base + scale x B A summed in float32 and rounded to bf16, so a
    step runs 7 matmuls a block instead of 21 and none of PEFT's per-call casts, scalings and additions.

    Numbers: for a plain linear the product is autocast's bf16 F.linear bit for bit (the same kernel); for a
    LoRA layer it differs from the unmerged bf16 path by the rounding of the merged weight to bf16, the order of
    the bf16 rounding the compute dtype already brings, so the sampled tokens' log-probs stay within bf16
    precision of training's recomputation (the ratio itself uses the recomputed old log-probs, so it is 1 on a
    batch's first epoch regardless). Speed (2-core Xeon with AMX, SmolLM2-135M + LoRA, 16 rows): see
    BENCHMARKS.md. The copies (the body's linear weights in bf16, 212 MB for SmolLM2-135M) live only inside this
    context, entered once per `sample_completions` call (one decoding batch): trained weights are packed
    anew at every rollout. A no-op where `_can_pack` says no; layers it
    cannot merge (DoRA, disabled adapters) keep their own forward."""
    if not _can_pack(device):
        yield
        return
    dtype = torch.bfloat16
    patched, skip = [], set()
    with torch.no_grad(), torch.autocast("cpu", enabled=False):  # the deltas B A in float32, not autocast's bf16
        for module in body.modules():
            if id(module) in skip:
                continue
            if isinstance(getattr(module, "lora_A", None), torch.nn.ModuleDict):  # a PEFT LoRA layer
                weight, base = _merged_weight(module, dtype), module.base_layer
                skip |= {id(m) for m in module.modules() if m is not module and (weight is not None or m is not base)}
            elif isinstance(module, torch.nn.Linear):
                weight, base = module.weight.detach(), module
            else:
                continue
            if weight is None or weight.device != device:
                continue
            packed = torch.ops.mkldnn._reorder_linear_weight(weight.to(dtype).contiguous(), rows)
            bias = base.bias.detach().to(dtype) if base.bias is not None else None
            patched.append((module, functools.partial(_packed_linear, packed, bias, dtype)))
    with forwards_replaced(patched):
        yield


def _parts(model):
    """The decoder body and the bias-free output head weight (TrainModule, DDP, PEFT or plain HF model)."""
    tm = train_module(as_train_module(model))
    head = tm.output_head
    if getattr(head, "bias", None) is not None:
        raise TuneforgeError("generation assumes a bias-free output head (every supported causal LM has one)")
    return tm.body(), head.weight


def row_uniforms(seeds: Sequence[int], length: int) -> torch.Tensor:
    """(len(seeds), length) uniforms in [0, 1), row r drawn from a generator seeded by seeds[r] alone: a row's
    draws never depend on which rows share its decoding batch (RL rollouts split over ranks and batches sample
    what one batch would). One small draw per row, not per token: about 10 microseconds a row."""
    if not seeds:
        return torch.empty(0, length)
    return torch.stack([torch.rand(length, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


def inverse_cdf(weights: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """(B, V) non-negative weights, (B,) uniforms in [0, 1) -> (B,) ids: per row the first token whose
    cumulative weight exceeds u x the row's total (inverse transform sampling), so a token of weight 0 is never
    drawn and each row uses its own uniform only."""
    cdf = weights.cumsum(-1)  # (B, V), per row
    target = uniforms.to(cdf.dtype)[:, None] * cdf[:, -1:]
    token = torch.searchsorted(cdf, target, right=True).squeeze(1)
    over = token >= weights.shape[-1]
    if bool(over.any()):  # u x total rounded up to the total: the row's last token with weight
        last = weights.shape[-1] - 1 - (weights.flip(-1) > 0).to(torch.int8).argmax(-1)
        token = torch.where(over, last, token)
    return token


def lora_model(model):
    """The PEFT LoRA tuner (peft.tuners.lora.LoraModel) inside `model`, or None."""
    from peft.tuners.lora import LoraModel
    return next((m for m in model.modules() if isinstance(m, LoraModel)), None)


def adapter_hooks(model, names: Sequence[str] | None):
    """A context in which every row of the body's batch goes through its own adapter, `names[r]` (PEFT's
    mixed-adapter batches; "__base__" for the base alone); a no-op without names."""
    if names is None:
        return contextlib.nullcontext()
    tuner = lora_model(model)
    if tuner is None:
        if any(n != BASE_ADAPTER for n in names):
            raise TuneforgeError("per-row adapters need a model with LoRA adapters loaded")
        return contextlib.nullcontext()
    return tuner._enable_peft_forward_hooks(adapter_names=list(names))


BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in a mixed batch


def _mixed_lora_forward(layer, a_cat, b_cat, masks, x, *args, **kwargs):
    y = layer.base_layer(x, *args, **kwargs)
    low = F.linear(x.to(a_cat.dtype), a_cat) * masks  # (B, T, R): each row keeps its own adapter's slice
    return y + F.linear(low, b_cat).to(y.dtype)


@contextlib.contextmanager
def mixed_lora(model, names: Sequence[str]):
    """Rows of one batch through different LoRA adapters, by hand: in every LoRA linear layer the A matrices of
    the adapters the batch uses are concatenated (R = the sum of their ranks) and the B matrices likewise, each
    slice scaled by its adapter's alpha / r, so a row's update is F.linear(F.linear(x, A_cat) * mask_row, B_cat)
    with mask_row one on its adapter's slice (zero everywhere for the base's rows). Two thin matmuls and a
    product a layer whatever the number of adapters, where PEFT's mixed batches (`adapter_hooks`) run a
    gather, two matmuls and a scatter per adapter: on a CPU, where decoding a small model is bound by the
    number of kernels, that is the difference between batching paying and not (BENCHMARKS.md, serving).
    The extra products over the other adapters' slices are R x (in + out) multiply-adds a token, under 3% of
    the base layer's for four r-16 adapters. Layers that are not plain LoRA linears (DoRA, other variants) make
    it fall back to PEFT's hooks."""
    from peft.tuners.lora import Linear as LoraLinear
    used = sorted({n for n in names if n != BASE_ADAPTER})
    layers = [m for m in model.modules() if isinstance(m, LoraLinear)]
    plain = all(isinstance(m.base_layer, torch.nn.Linear) and not m.merged
                and not any(m.use_dora.get(a, False) or m.lora_variant.get(a) for a in used) for m in layers)
    if not plain:
        with adapter_hooks(model, names):
            yield
        return
    patched = []
    for layer in layers:
        present = [a for a in used if a in layer.lora_A]
        if not present:  # only base rows pass here: the base layer alone, whatever adapter PEFT has active
            patched.append((layer, layer.base_layer.forward))
            continue
        weight = layer.lora_A[present[0]].weight
        a_cat = torch.cat([layer.lora_A[a].weight.detach() for a in present])  # (R, in)
        b_cat = torch.cat([layer.lora_B[a].weight.detach() * layer.scaling[a] for a in present], 1)  # (out, R)
        spans, at = {}, 0
        for a in present:
            spans[a] = (at, at + layer.r[a])
            at += layer.r[a]
        masks = torch.zeros(len(names), 1, at, dtype=weight.dtype, device=weight.device)
        for row, name in enumerate(names):
            if name in spans:
                masks[row, :, spans[name][0]:spans[name][1]] = 1.0
        patched.append((layer, functools.partial(_mixed_lora_forward, layer, a_cat, b_cat, masks)))
    with forwards_replaced(patched):
        yield


@torch.no_grad()
def sample_completions(model, prompts: list[list[int]], max_new_tokens: int, stop_ids: Sequence[int], pad_id: int,
                       temperature: float = 1.0, top_p: float = 1.0, do_sample: bool = True,
                       generator: torch.Generator | None = None, seeds: Sequence[int] | None = None,
                       adapter_names: Sequence[str] | None = None, row_limits: Sequence[int] | None = None,
                       on_step: Callable | None = None) -> Completions:
    """The one token-level generation core (eval, chat, rank and RL rollouts all run on it).

    Prompts are left-padded into one batch; the model's own forward fills a transformers DynamicCache with the
    prompt (a prompt repeated in consecutive rows, as an RL group's samples are, once: its cache is copied to
    its rows), then decodes one token per step on top of it. Only the last position's hidden state reaches the
    output head each step (a (B, V) tensor, never logits for the whole prompt). A row stops at any of
    `stop_ids` (kept as its last token) or after `max_new_tokens`; the loop exits once every row stopped.

    Sampling (do_sample and temperature > 0) draws from softmax(logits / temperature) restricted to the top-p
    nucleus by inverse transform sampling: row r's token at step t comes from its own uniform u[r, t], drawn up
    front from `seeds[r]` (`row_uniforms`: a row samples the same whatever batch it is in) or else from
    `generator` (None: torch's global generator). Greedy
    otherwise (argmax of the logits). The log-prob returned for each token is the one under the
    temperature-scaled FULL softmax (temperature 1 when greedy), not under the renormalised nucleus: the same
    quantity training recomputes from hidden / temperature (objectives/functional.py `token_logps`), so the
    rollout's numbers and training's are the same numbers from two paths. The temperature is applied to the
    hidden state before the projection, as there. Runs in eval mode (no dropout); modes are restored after.

    Serving (tuneforge serve) adds: `adapter_names`, one LoRA adapter per row (`adapter_hooks`; the bf16 weight
    packing, which merges one adapter into the weights, is then off); `row_limits`, a row's own token limit
    (at most max_new_tokens); `on_step(tokens, live)`, called after every step with the (B,) new ids and which
    rows were still live before it, returning None or a (B,) bool tensor of rows to stop now (a client gone).
    """
    from transformers import DynamicCache

    body, weight = _parts(model)
    device = weight.device
    if torch.is_autocast_enabled(device.type):  # the head in the compute dtype once, not a copy per token
        weight = weight.to(torch.get_autocast_dtype(device.type))
    sampling = do_sample and temperature > 0
    scale = temperature if sampling else 1.0
    # a prompt repeated in consecutive rows (an RL group's samples) is prefilled once; its cache is then copied
    firsts, expand = [], []  # the rows that start a run of equal prompts (and adapters); each row's run
    for r, prompt in enumerate(prompts):
        if r == 0 or prompt != prompts[r - 1] or adapter_names is not None:  # per-row adapters: every row its own
            firsts.append(r)
        expand.append(len(firsts) - 1)
    if adapter_names is not None and len(adapter_names) != len(prompts):
        raise TuneforgeError(f"sample_completions: {len(adapter_names)} adapter names for {len(prompts)} rows")
    expand = torch.tensor(expand, dtype=torch.long, device=device)
    ids, mask = left_pad([prompts[r] for r in firsts], pad_id)
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp_(min=0)  # left padding: each prompt's first real token is position 0
    stops = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    rows = len(prompts)
    if sampling and seeds is not None:
        if len(seeds) != rows:
            raise TuneforgeError(f"sample_completions: {len(seeds)} seeds for {rows} prompt rows")
        uniforms = row_uniforms(seeds, max_new_tokens).to(device)  # (B, L)
    elif sampling:
        where = generator.device if generator is not None else torch.device("cpu")
        uniforms = torch.rand((rows, max_new_tokens), generator=generator, device=where).to(device)
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    limits = None
    if row_limits is not None:
        limits = torch.tensor([min(int(n), max_new_tokens) for n in row_limits], dtype=torch.long, device=device)
    steps_tok, steps_logp, steps_live = [], [], []
    cache = DynamicCache(config=unwrap(model).config)
    packing = packed_bf16_linears(body, device, rows) if adapter_names is None else contextlib.nullcontext()
    mixed = mixed_lora(model, adapter_names) if adapter_names is not None else contextlib.nullcontext()
    with eval_mode(model), thin_lora_in_float32(model, device), packing, mixed:
        hidden = body(input_ids=ids, attention_mask=None if bool(mask.all()) else mask, position_ids=positions,
                      cache=cache, use_cache=True).last_hidden_state[:, -1]  # (distinct prompts, H)
        if len(firsts) < rows:
            cache.batch_select_indices(expand)
            hidden, mask, positions = hidden[expand], mask[expand], positions[expand]  # (B, ...)
        position = positions[:, -1]
        if bool(mask.all()):
            mask = None  # no padding: causal attention needs no mask (as transformers' generate does)
        for step in range(max_new_tokens):
            logits = head_logits(hidden / scale if scale != 1.0 else hidden, weight)  # (B, V) float32
            logp_all = torch.log_softmax(logits, dim=-1)
            if sampling:
                probs = logp_all.exp()
                probs = probs.masked_fill_(~nucleus_mask(probs, top_p), 0.0)
                token = inverse_cdf(probs, uniforms[:, step])
            else:
                token = logits.argmax(-1)
            steps_live.append(~done)  # a row that stopped goes on decoding in the batch; its tokens are cut
            steps_tok.append(token)
            steps_logp.append(logp_all.gather(1, token[:, None]).squeeze(1))
            live = ~done
            done = done | torch.isin(token, stops)
            if limits is not None:
                done = done | (limits <= step + 1)
            if on_step is not None:
                cut = on_step(token, live)
                if cut is not None:
                    done = done | cut.to(device)
            if step == max_new_tokens - 1 or bool(done.all()):
                break
            position = position + 1
            if mask is not None:
                mask = torch.cat([mask, mask.new_ones(rows, 1)], dim=1)
            hidden = body(input_ids=token[:, None], attention_mask=mask, position_ids=position[:, None],
                          cache=cache, use_cache=True).last_hidden_state[:, -1]
    tokens, logps, live = (torch.stack(x, 1).cpu() for x in (steps_tok, steps_logp, steps_live))  # (B, L)
    lengths = live.sum(1).tolist()
    ended = torch.isin(tokens, stops.cpu()) & live  # a row's stop is its last live token, if it hit one
    return Completions(tokens=[tokens[r, :n].tolist() for r, n in enumerate(lengths)],
                       logps=[logps[r, :n].clone() for r, n in enumerate(lengths)],
                       stopped=ended.any(1).tolist() if limits is not None or on_step is not None
                       else done.cpu().tolist())
