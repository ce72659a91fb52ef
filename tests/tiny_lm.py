"""A word-level tokenizer and a tiny Llama trained to prefer given texts (zero-shot tests)."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]
WORDS = [f"w{i}" for i in range(32)]


def word_tokenizer(words: list[str] = WORDS) -> PreTrainedTokenizerFast:
    """One token per whitespace-separated word (plus punctuation), BOS <s>, EOS </s>."""
    vocab = {w: i for i, w in enumerate([*SPECIALS, *words, ".", ","])}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    )


def tiny_llama(vocab_size: int, seed: int = 0) -> torch.nn.Module:
    """A random 2-block Llama with hidden size 64, float32, eval mode."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=96,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
        vocab_size=vocab_size,
        max_position_embeddings=512,
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=0,
    )
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


def train_to_prefer(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast, texts: list[str], steps: int = 150
) -> torch.nn.Module:
    """Fit the model to the texts ([BOS] + words), so it prefers them over other word orders."""
    rows = [
        [tokenizer.bos_token_id, *tokenizer(t, add_special_tokens=False)["input_ids"]]
        for t in texts
    ]
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    labels = torch.tensor([r + [-100] * (width - len(r)) for r in rows])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: more threads only contend for the cores
    model.train()
    try:
        for _ in range(steps):
            opt.zero_grad()
            model(input_ids=ids, labels=labels).loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def save(model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast, folder: Path) -> Path:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
