"""The output formats, one module and one `Format` record each (`base.Format`), in `REGISTRY`:

fake                the float model with weights on the grid (plain transformers loads it),
                    plus `quant_grids.safetensors` so it can be exported later (`fake.py`);
compressed-tensors  vLLM's and llm-compressor's format (`compressed_tensors.py`);
omniquant-packed    our packed layout for every setting (`packed.py`);
gguf                one file llama.cpp runs, written from the learned grids (`gguf/`).

Everything that depends on the format (what it holds, writing, loading, `kernels`, the CLI's
help) reads its record; the run record `omniquant.json` is written here, once, for every format.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from omniquant.config import OmniQuantConfig
from omniquant.errors import ConfigError, ExportError
from omniquant.formats import compressed_tensors, fake, gguf, packed
from omniquant.formats.base import Format, LoadJob, WriteJob
from omniquant.formats.compressed_tensors import check_compressed_tensors
from omniquant.formats.gguf.writer import GgufOptions
from omniquant.quant.experts import check_no_fused_experts
from omniquant.runfile import write_run_record

log = logging.getLogger(__name__)

REGISTRY: dict[str, Format] = {
    f.name: f for f in (fake.FORMAT, compressed_tensors.FORMAT, packed.FORMAT, gguf.FORMAT)
}
FORMATS = tuple(REGISTRY)
PACKED_FORMATS = tuple(name for name, f in REGISTRY.items() if f.packed)
AUTO_HELP = "auto = compressed-tensors where it holds the setting, else omniquant-packed"


def check_format_name(fmt: str) -> None:
    if fmt not in (*FORMATS, "auto"):
        raise ConfigError(f"format must be auto or one of {', '.join(FORMATS)}; got {fmt!r}")


def get_format(fmt: str) -> Format:
    check_format_name(fmt)
    if fmt == "auto":
        raise ConfigError("format 'auto' is chosen once the model is quantized (resolve_format)")
    return REGISTRY[fmt]


def check_format_holds(
    fmt: str,
    config: OmniQuantConfig,
    widths: dict[str, int],
    gguf: GgufOptions | None = None,
) -> None:
    """Refuse, before any calibration, a setting that `fmt` cannot hold: from the config and the
    input widths of the linears to quantize (module path -> width) alone (`gguf`: the GGUF
    options, which may ask for an approximate mapping). 'auto' holds every setting."""
    check_format_name(fmt)
    if fmt != "auto":
        REGISTRY[fmt].check(config, widths, gguf)


def check_format_model(fmt: str, model_config: Any) -> None:
    """Refuse, before any weight is loaded, a model family that `fmt` cannot describe (from
    the transformers config alone)."""
    check_format_name(fmt)
    if fmt != "auto":
        REGISTRY[fmt].check_model(model_config)


def resolve_format(fmt: str, model: nn.Module, config: OmniQuantConfig) -> str:
    """'auto' is compressed-tensors where it holds the setting, omniquant-packed otherwise."""
    check_format_name(fmt)
    if fmt != "auto":
        return fmt
    try:
        check_compressed_tensors(model, config)
        return compressed_tensors.FORMAT.name
    except ExportError as e:
        log.info("omniquant-packed, because %s", e)
        return packed.FORMAT.name


def write_format(fmt: str, job: WriteJob, after_write: Callable[[], None] | None = None) -> None:
    """Write `job.model` in `fmt` into `job.folder`, then the run record: `job.report` and the
    format's own entry (its name and whatever it records of itself). `after_write` runs between
    the two (quantize measures its peak memory there)."""
    if get_format(fmt).packed:
        check_no_fused_experts(job.model, fmt)
    entry = get_format(fmt).write(job)
    if after_write is not None:
        after_write()
    write_run_record(job.folder, job.report, entry)


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
    if not get_format(fmt).packed:
        raise ConfigError(f"{fmt!r} is not a packed format")
    write_format(fmt, WriteJob(model, tokenizer, config, report, folder, progress, gguf))


def load_format(fmt: str, job: LoadJob) -> tuple[nn.Module, Any]:
    """(model, tokenizer) from a folder written in `fmt`."""
    return get_format(fmt).load(job)


def formats_help(packed_only: bool = False) -> str:
    """The CLI's help for `--format`: each format's name and what it holds, from the registry."""
    shown = [f for f in REGISTRY.values() if f.packed or not packed_only]
    return "; ".join([*(f.help() for f in shown), AUTO_HELP])


__all__ = [
    "FORMATS",
    "PACKED_FORMATS",
    "REGISTRY",
    "Format",
    "LoadJob",
    "WriteJob",
    "check_format_holds",
    "check_format_model",
    "check_format_name",
    "formats_help",
    "get_format",
    "load_format",
    "resolve_format",
    "write_format",
    "write_packed_format",
]
