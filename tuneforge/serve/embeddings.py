"""Embedding models served on /v1/embeddings: a tuneforge embedder (a contrastive run's final/), or any
sentence-transformers folder (the embedded all-MiniLM-L6-v2 included).

The folder's own sentence-transformers files say how it embeds: the pooling of 1_Pooling/config.json, whether
a Normalize module follows (modules.json), the longest input (sentence_bert_config.json `max_seq_length`: longer
inputs are cut there, as sentence-transformers cuts them) and the prompts (config_sentence_transformers.json:
the query and document prefixes training used, which a request picks with `input_type`). Vectors come from the
one embedding path training and retrieval evaluation use (objectives/contrastive.py `embed_ids`), so a served
vector equals tuneforge's and `SentenceTransformer(folder).encode`'s (tested). The server's
--max-prompt-tokens bounds what a client sends (an input's tokens before the cut). One embedder computes one
request at a time (a lock); a request's inputs are embedded together, 32 at a time, sorted by length.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tuneforge.errors import TuneforgeError

POOLING_KEYS = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls", "pooling_mode_lasttoken": "last"}


def sentence_transformer_settings(folder: str | Path) -> dict:
    """{pooling, normalize, max_length, prompts} from a sentence-transformers folder's module files."""
    folder = Path(folder)
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        raise TuneforgeError(f"{folder}: not a sentence-transformers folder (no modules.json); serve an embedder "
                             "trained by tuneforge (a contrastive run's final/) or a sentence-transformers model")
    try:
        modules = json.loads(modules_file.read_text())
        kinds = {m["type"].rsplit(".", 1)[-1]: m.get("path", "") for m in modules}
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise TuneforgeError(f"{modules_file}: not a sentence-transformers module list: {exc}") from None
    if "Pooling" not in kinds:
        raise TuneforgeError(f"{modules_file}: no Pooling module; tuneforge serves mean, cls or last-token pooling")
    pooling_file = folder / kinds["Pooling"] / "config.json"
    try:
        pooling_config = json.loads(pooling_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise TuneforgeError(f"{pooling_file}: cannot read the pooling settings: {exc}") from None
    modes = [mode for key, mode in POOLING_KEYS.items() if pooling_config.get(key)]
    others = [k for k, v in pooling_config.items() if k.startswith("pooling_mode_") and v and k not in POOLING_KEYS]
    if len(modes) != 1 or others:
        raise TuneforgeError(f"{pooling_file}: tuneforge serves exactly one of mean, cls or last-token pooling, "
                             f"this folder asks for {', '.join(modes + others) or 'none'}")
    extra = set(kinds) - {"Transformer", "Pooling", "Normalize"}
    if extra:
        raise TuneforgeError(f"{modules_file}: modules tuneforge does not compute: {', '.join(sorted(extra))}")
    bert = _json(folder / "sentence_bert_config.json")
    st = _json(folder / "config_sentence_transformers.json")
    prompts = {k: v for k, v in (st.get("prompts") or {}).items() if isinstance(v, str) and v}
    return {"pooling": modes[0], "normalize": "Normalize" in kinds, "max_length": bert.get("max_seq_length"),
            "prompts": prompts}


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError as exc:
        raise TuneforgeError(f"{path}: not JSON: {exc}") from None


@dataclass
class Embedder:
    """One served embedding model: `tokens(text)` tokenises as training did, `embed(sequences)` gives their
    (N, H) float32 vectors."""

    name: str
    module: torch.nn.Module  # the TrainModule around the encoder body
    tokenizer: object
    pooling: str
    normalize: bool
    max_length: int
    prompts: dict = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def dim(self) -> int:
        return int(self.module.model.config.hidden_size)

    def tokens(self, text: str, input_type: str | None = None) -> tuple[list[int], int]:
        """(token ids, tokens before the cut) of a text as training tokenised it: the prompt of `input_type`
        before it, special tokens, cut at max_length."""
        from tuneforge.data.builders import embedder_tokens
        prefix = self.prompts.get(input_type, "") if input_type else ""
        return embedder_tokens(self.tokenizer, prefix + text, self.max_length)

    def embed(self, sequences: list[list[int]]) -> torch.Tensor:
        from tuneforge.objectives.contrastive import embed_ids
        with self.lock:
            return embed_ids(self.module, sequences, self.tokenizer.pad_token_id, self.pooling, self.normalize)


def load_embedder_folder(name: str, spec: str, threads: int | None = None) -> Embedder:
    """An Embedder served as `name` from a sentence-transformers folder or an embedded embedding model's name."""
    from tuneforge.config.schema import RunConfig
    from tuneforge.models.embedder import load_embedder
    from tuneforge.models.heads import TrainModule
    from tuneforge.models.load import resolve_spec
    if threads:
        torch.set_num_threads(threads)
    kind, location = resolve_spec(spec)
    if kind != "folder":
        raise TuneforgeError(f"--embedder {name}: {spec} is not a local folder or an embedded model")
    settings = sentence_transformer_settings(location)
    model, tokenizer = load_embedder(RunConfig.model_validate({"model": {"name": location}}))
    model.eval()
    limit = settings["max_length"] or getattr(tokenizer, "model_max_length", None) or 512
    limit = min(int(limit), int(getattr(model.config, "max_position_embeddings", limit) or limit))
    return Embedder(name, TrainModule(model), tokenizer, settings["pooling"], settings["normalize"], limit,
                    settings["prompts"])
