"""GGUF, the one-file format llama.cpp and Ollama run: the writer (`writer`), the tokenizer
vocabulary (`vocab`), the RoPE scaling (`rope`), all from the learned grids, and the reader
(`reader`, through transformers' GGUF loader)."""

from typing import Any

from omniquant.formats.base import Format
from omniquant.formats.gguf import reader
from omniquant.formats.gguf.writer import check_gguf, gguf_architecture, write_gguf_folder


def check_gguf_model(hf: Any) -> None:
    """Refuse a family llama.cpp (or transformers' GGUF loader) does not read."""
    gguf_architecture(hf)


FORMAT = Format(
    name="gguf",
    holds="one file llama.cpp runs, <output>/model.gguf (weight-only: 2-5-bit grids exactly "
    "in Q4_0/Q4_1/Q5_0/Q5_1 blocks, 2-3 bits as 4-bit blocks; 6-7-bit and symmetric 8-bit in "
    "Q8_0; groups of a multiple of 32 or per-channel)",
    engine="llama.cpp, Ollama, LM Studio; transformers' GGUF loader",
    check=check_gguf,
    write=write_gguf_folder,
    load=reader.load,
    check_model=check_gguf_model,
    kernels="a GGUF export, which runs in llama.cpp; drop `kernels` (it is then read through "
    "transformers' GGUF loader), or export with `format` omniquant-packed",
)
