"""Writing quantized models in the formats inference engines load.

fake                the float model with weights on the grid (plain transformers loads it),
                    plus `quant_grids.safetensors` so it can be exported later;
compressed-tensors  vLLM's and llm-compressor's format (`compressed_tensors.py`);
omniquant-packed    our packed layout for every setting (`packed.py`);
gguf                one file llama.cpp runs, written from the learned grids (`gguf.py`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from torch import nn

from omniquant.config import OmniQuantConfig
from omniquant.errors import ConfigError, ExportError
from omniquant.formats.compressed_tensors import (
    check_compressed_tensors,
    check_compressed_tensors_setting,
    check_compressed_tensors_widths,
    write_compressed_tensors,
)
from omniquant.formats.gguf.writer import (
    GgufOptions,
    check_gguf_setting,
    check_gguf_widths,
    gguf_architecture,
    write_gguf_folder,
)
from omniquant.formats.packed import write_packed

log = logging.getLogger(__name__)

FORMATS = ("fake", "compressed-tensors", "omniquant-packed", "gguf")


def check_format_name(fmt: str) -> None:
    if fmt not in (*FORMATS, "auto"):
        raise ConfigError(f"format must be auto or one of {', '.join(FORMATS)}; got {fmt!r}")


def check_format_holds(
    fmt: str,
    config: OmniQuantConfig,
    widths: dict[str, int],
    gguf: GgufOptions | None = None,
) -> None:
    """Refuse, before any calibration, a setting that `fmt` cannot hold: from the config and the
    input widths of the linears to quantize (module path -> width) alone (`gguf`: the GGUF
    options, which may ask for an approximate mapping)."""
    check_format_name(fmt)
    if fmt == "compressed-tensors":
        check_compressed_tensors_setting(config)
        check_compressed_tensors_widths(widths, config.weight.group_size)
    elif fmt == "gguf":
        check_gguf_setting(config, gguf)
        approximate = gguf is not None and gguf.approximate is not None
        check_gguf_widths(widths, config.weight.group_size, approximate)


def check_format_model(fmt: str, model_config: Any) -> None:
    """Refuse, before any weight is loaded, a model family that `fmt` cannot describe (from
    the transformers config alone)."""
    if fmt == "gguf":
        gguf_architecture(model_config)


def resolve_format(fmt: str, model: nn.Module, config: OmniQuantConfig) -> str:
    """'auto' is compressed-tensors where it holds the setting, omniquant-packed otherwise."""
    check_format_name(fmt)
    if fmt != "auto":
        return fmt
    try:
        check_compressed_tensors(model, config)
        return "compressed-tensors"
    except ExportError as e:
        log.info("omniquant-packed, because %s", e)
        return "omniquant-packed"


def write_packed_format(
    fmt: str,
    model: nn.Module,
    tokenizer: Any,
    config: OmniQuantConfig,
    report: dict[str, Any],
    folder: Path,
    progress: bool = False,
    gguf: GgufOptions | None = None,
) -> None:
    """Write `model` as compressed-tensors, omniquant-packed or gguf into `folder` (`progress`:
    a bar over the layers being packed; `gguf`: how GGUF stores embeddings and the head)."""
    if fmt == "compressed-tensors":
        write_compressed_tensors(model, tokenizer, config, folder, progress)
        report = {**report, "format": {"name": "compressed-tensors"}}
        (folder / "omniquant.json").write_text(json.dumps(report, indent=2))
    elif fmt == "omniquant-packed":
        write_packed(model, tokenizer, report, folder, progress)
    elif fmt == "gguf":
        write_gguf_folder(model, tokenizer, config, report, folder, gguf)
    else:
        raise ConfigError(f"{fmt!r} is not a packed format")
