"""Tiny models and a tiny tokenizer, built in a second from code, for tests and examples.

The tokenizer is a real byte-level BPE (trained here on a small built-in corpus) with a ChatML chat template
like SmolLM2's, including its traps: pad == end-of-turn (`<|im_end|>`), a document separator
(`<|endoftext|>`) that differs from the end-of-turn token, and a default system prompt injected when the
conversation has none.
"""

from __future__ import annotations

import os

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny helpful assistant.<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? The capital of France is Paris.",
    "Translate to French: hello world. Bonjour le monde.",
    "system user assistant You are a tiny helpful assistant.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 100 2024 3.14",
    "Instruction: summarise the text. Input: a long story. Output: a short story.",
    "def add(a, b):\n    return a + b\n",
    "Reply with yes or no. Yes. No. Maybe.",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ !?.,;:'\"()[]{}-_=+*/\\",
]


def make_tiny_tokenizer(vocab_size: int = 384, save_dir: str | None = None):
    """A byte-level BPE tokenizer with ChatML special tokens and chat template (PreTrainedTokenizerFast)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=None, eos_token="<|im_end|>", pad_token="<|im_end|>",
        unk_token=None, additional_special_tokens=SPECIAL_TOKENS,
    )
    fast.chat_template = CHATML_TEMPLATE
    fast.model_max_length = 2048
    if save_dir:
        os.makedirs(save_dir, exist_ok=True)
        fast.save_pretrained(save_dir)
    return fast


def make_tiny_llama(tokenizer, hidden_size: int = 32, layers: int = 2, seed: int = 0):
    """A randomly initialised 2-layer Llama sized to the tokenizer (float32, eager-free sdpa attention)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=False, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def make_tiny_model_dir(path: str, seed: int = 0, hidden_size: int = 32) -> str:
    """Write a tiny Llama + tokenizer as a normal HF folder (safetensors) and return its path."""
    tok = make_tiny_tokenizer(save_dir=path)
    model = make_tiny_llama(tok, hidden_size=hidden_size, seed=seed)
    model.save_pretrained(path)
    return path


def make_tiny_bert_dir(path: str, seed: int = 0, hidden_size: int = 32, dropout: float = 0.1) -> str:
    """Write a tiny random BERT encoder (AutoModel: BertModel) + the tiny tokenizer as an HF folder, for the
    encoder path of embedding models; dropout on, as in all-MiniLM-L6-v2, so cached passes must replay it."""
    import torch
    from transformers import BertConfig, BertModel

    tok = make_tiny_tokenizer(save_dir=path)
    config = BertConfig(vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
                        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=512,
                        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
                        pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(path)
    return path
