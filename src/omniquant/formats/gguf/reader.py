"""Reading a gguf folder back into torch: transformers' own GGUF loader, which dequantizes every
block to float32 with the `gguf` package (what `omniquant.load` and `eval` use; llama.cpp and
Ollama read the file themselves)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from omniquant.formats.base import LoadJob
from omniquant.formats.gguf.writer import GGUF_FILE
from omniquant.runfile import RUN_FILE


def gguf_rope_parameters(folder: Path) -> dict[str, Any] | None:
    """The RoPE settings a scaled model's GGUF folder recorded in its run record, if any."""
    report = folder / RUN_FILE
    if not report.is_file():
        return None
    saved = json.loads(report.read_text()).get("format", {}).get("rope_parameters")
    return saved if isinstance(saved, dict) else None


def load_gguf_folder(folder: Path, device: str = "cpu") -> tuple[nn.Module, Any]:
    """(model, tokenizer) of a gguf folder through transformers' GGUF loader."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(folder, gguf_file=GGUF_FILE)
    saved = gguf_rope_parameters(folder)
    if saved is not None:  # transformers' GGUF loader reads no RoPE scaling: ours, as written
        config.rope_parameters = saved.get("default", saved)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=GGUF_FILE, config=config, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    return model.eval().to(device), tokenizer


def load(job: LoadJob) -> tuple[nn.Module, Any]:
    return load_gguf_folder(job.folder, job.device)
