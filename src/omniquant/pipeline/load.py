"""Loading what `quantize` and `export` wrote: `load` (torch, through the format's own loader in
`omniquant.formats`) and `load_native` (the native decoder). The folder's run record
(`omniquant.json`) says its format and settings; every refusal comes before a weight is read."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from omniquant.checks import check_head, check_kernels_source, check_native_config
from omniquant.formats import LoadJob, load_format
from omniquant.formats.packed import load_packed
from omniquant.kernels.head import use_half_head
from omniquant.model_io import load_model
from omniquant.quant.activation import attach_act_quantizers_all
from omniquant.runfile import read_run_record, record_config, record_format
from omniquant.runtime import check_device

PathArg = str | os.PathLike[str] | None


def folder_record(path: PathArg) -> tuple[Path | None, dict[str, Any] | None]:
    """The folder and its checked run record (None for a model omniquant did not write)."""
    folder = Path(str(path)) if path is not None else None
    record = read_run_record(folder) if folder is not None and folder.is_dir() else None
    return folder, record


def load(
    path: PathArg,
    kernels: bool = False,
    device: str = "cpu",
    progress: bool = False,
    head: str = "float32",
) -> tuple[nn.Module, Any]:
    """Load a model folder written by `quantize` or `export` (or any model `load_model` takes):
    (model, tokenizer), with its activation quantizers attached where the run had them.

    kernels=True runs every quantized linear through `QuantLinear` (int4 / int8 kernels, or
    unpacking on the fly), from an omniquant-packed folder or a fake-quantized one with its grids.
    head="float16" (with kernels=True) keeps the output head, and an embedding tied to it, in
    float16 (`kernels.head`): half its bytes, and on the CPU a decode step's head product about
    3x faster.
    """
    check_device(device)
    check_head(head, kernels)
    folder, record = folder_record(path)
    if kernels:
        check_kernels_source(path, record_format(record) if record is not None else None)
    if folder is not None and record is not None:
        job = LoadJob(folder, record_config(record), kernels, device, progress)
        model, tokenizer = load_format(record_format(record), job)
    else:  # a model omniquant did not write
        model, tokenizer = load_model(path)
    if head == "float16":
        use_half_head(model)
    return model.to(device), tokenizer


def load_native(
    path: PathArg,
    head: str = "float16",
    threads: int | None = None,
    activations: int = 16,
    progress: bool = False,
) -> tuple[Any, Any]:
    """(NativeDecoder, tokenizer) for a folder `load` takes, decoding on the CPU in native code
    (`kernels.native`). An omniquant-packed folder goes straight from its codes to the decoder
    (no float copy of the blocks); a fake-quantized folder is read with its grids; a float model
    runs its linears in float32."""
    from omniquant.kernels.native import NativeDecoder, compiler

    compiler()  # no compiler: refused before anything is read
    folder, record = folder_record(path)
    config = record_config(record) if record is not None else None
    if config is not None:
        check_native_config(config)
    if folder is not None and config is not None and record_format(record) == "omniquant-packed":
        model, tokenizer, _ = load_packed(
            folder,
            prepare=lambda m: attach_act_quantizers_all(m, config),
            progress=progress,
            native=True,
        )
    else:
        model, tokenizer = load(path, progress=progress)
    decoder = NativeDecoder(model, head=head, threads=threads, activations=activations)
    return decoder, tokenizer
