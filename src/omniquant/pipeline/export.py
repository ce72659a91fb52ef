"""`export`: a folder that `quantize` wrote (fake format) written again in a packed format.

Atomic: the folder appears complete or not at all; what the format cannot hold is refused from
the run record and the model's config before any weight is loaded.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from omniquant.errors import ConfigError, ModelError
from omniquant.formats import (
    PACKED_FORMATS,
    check_format_holds,
    check_format_model,
    check_format_name,
    resolve_format,
    write_packed_format,
)
from omniquant.formats.gguf.writer import GgufOptions
from omniquant.paths import check_new_output
from omniquant.pipeline.load import load
from omniquant.pipeline.output import partial_folder
from omniquant.runfile import RUN_FILE, read_run_record, record_config

log = logging.getLogger(__name__)


def quantized_source(folder: Path) -> dict[str, Any]:
    """The run record of a folder that quantize or export wrote, or a clear error."""
    if not folder.exists():
        raise ModelError(f"{folder} does not exist: export takes a folder that quantize wrote")
    record = read_run_record(folder) if folder.is_dir() else None
    if record is None:
        raise ModelError(f"{folder} holds no {RUN_FILE}: export takes a folder that quantize wrote")
    return record


def export(
    model: str | os.PathLike[str],
    output: str | os.PathLike[str],
    format: str = "auto",
    progress: bool = False,
    gguf: GgufOptions | None = None,
) -> Path:
    """Write a model folder from `quantize` (fake format) as compressed-tensors,
    omniquant-packed or gguf ('auto': compressed-tensors where it holds the setting)."""
    out = Path(output)
    check_format_name(format)
    if format not in (*PACKED_FORMATS, "auto"):
        raise ConfigError(f"export writes a packed format: {', '.join(PACKED_FORMATS)} or auto")
    check_new_output(out)
    src = Path(str(model))
    record = quantized_source(src)
    config = record_config(record)
    check_format_holds(format, config, {}, gguf)  # bits and activations; widths once loaded
    if format != "auto":  # the family, from config.json alone (the source may be packed)
        from transformers import AutoConfig

        check_format_model(format, AutoConfig.from_pretrained(src))
    log.info("loading %s", src)
    loaded, tokenizer = load(src, progress=progress)
    fmt = resolve_format(format, loaded, config)
    partial = partial_folder(out)
    shutil.rmtree(partial, ignore_errors=True)
    log.info("writing %s as %s", out, fmt)
    try:
        write_packed_format(
            fmt,
            loaded,
            tokenizer,
            config,
            {**record, "format": {"name": fmt}},
            partial,
            progress=progress,
            gguf=gguf,
        )
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    partial.rename(out)
    return out
