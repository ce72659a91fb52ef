"""The format interface: what each output format declares, so that `quantize`, `export`, `load`,
the CLI's help and the README's table all read one record instead of comparing format names.

A format is a `Format` record (one per module: `fake.FORMAT`, `compressed_tensors.FORMAT`,
`packed.FORMAT`, `gguf.FORMAT`), listed in `omniquant.formats.REGISTRY`. A new format is a new
module with its record, added to the registry; nothing else names it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from omniquant.config import OmniQuantConfig

if TYPE_CHECKING:
    from omniquant.formats.gguf.writer import GgufOptions


@dataclass(frozen=True)
class WriteJob:
    """What a format's writer gets: the quantized model (fake-quantized, with its grids), the run's
    settings and report, and the folder to fill (the caller makes it atomic and writes the run
    record with the entry the writer returns)."""

    model: nn.Module
    tokenizer: Any
    config: OmniQuantConfig
    report: dict[str, Any]
    folder: Path
    progress: bool = False
    gguf: GgufOptions | None = None


@dataclass(frozen=True)
class LoadJob:
    """What a format's loader gets: the folder, the run's settings from its record, and how the
    caller wants it (`kernels`: our integer kernels; `device`; `progress`: a bar)."""

    folder: Path
    config: OmniQuantConfig
    kernels: bool = False
    device: str = "cpu"
    progress: bool = False


def no_model_check(model_config: Any) -> None:
    """For formats that describe every family the model code runs."""


@dataclass(frozen=True)
class Format:
    """One output format.

    name        as `--format` and the run record's `"format": {"name": ...}` spell it
    holds       which settings it holds, one phrase (help text and the README's format table)
    engine      what runs it
    check       refuse a setting it cannot hold: (config, input widths by module path, GGUF
                options); widths may be empty when not known yet (export checks them again)
    write       fill `WriteJob.folder`; returns the run record's "format" entry
    load        (model, tokenizer) from a folder it wrote
    check_model refuse a model family it cannot describe, from the transformers config alone
    kernels     None when `load(kernels=True)` runs our kernels on it, else why not
    packed      whether `export` writes it (every format but fake)
    """

    name: str
    holds: str
    engine: str
    check: Callable[[OmniQuantConfig, dict[str, int], GgufOptions | None], None]
    write: Callable[[WriteJob], dict[str, Any]]
    load: Callable[[LoadJob], tuple[nn.Module, Any]]
    check_model: Callable[[Any], None] = no_model_check
    kernels: str | None = None
    packed: bool = True

    def help(self) -> str:
        return f"{self.name} = {self.holds}"
