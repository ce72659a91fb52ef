"""The public functions: `quantize`, `evaluate`, `load`."""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from omniquant import __version__
from omniquant.calibrate import BlockReport, Runtime, StateStore, calibrate_blocks
from omniquant.capture import capture_block_inputs
from omniquant.config import OmniQuantConfig
from omniquant.data import bos_token_id, calibration_windows, eval_windows, load_text, tokenize_text
from omniquant.errors import ConfigError, ModelError, OutputError
from omniquant.eval.perplexity import perplexity
from omniquant.formats import FORMATS, resolve_format, write_packed_format
from omniquant.formats.packed import load_packed, use_kernels
from omniquant.model_io import load_model, save_model
from omniquant.models import block_linears, decoder_layers, get_architecture, get_module
from omniquant.models.architecture import Architecture
from omniquant.quant.activation import attach_act_quantizers
from omniquant.quant.lwc import LWC
from omniquant.quant.qparams import attach_grids, save_grids
from omniquant.report import write_run_report
from omniquant.transforms.let import LetPlan, attention_shape, plan_let

log = logging.getLogger(__name__)

REPORT_FILE = "omniquant.json"
EVAL_SPLITS = {"wikitext2": "test", "ptb": "test", "c4": "validation"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class QuantizeResult:
    """The quantized model (fake-quantized weights, in memory) and what happened."""

    model: nn.Module
    tokenizer: Any
    report: dict[str, Any]
    output: Path | None


def runtime_for(device: str, dtype: str = "auto", progress: bool = True) -> Runtime:
    """Device and autocast choice: 'auto' is float32 on the CPU and bf16 autocast on CUDA."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "--device cuda was asked but no CUDA device is available; use --device cpu"
        )
    if dtype == "auto":
        autocast = torch.bfloat16 if dev.type == "cuda" else None
    elif dtype in DTYPES:
        autocast = None if dtype == "float32" else DTYPES[dtype]
    else:
        raise ConfigError(f"dtype must be auto, {', '.join(DTYPES)}; got {dtype!r}")
    return Runtime(device=dev, autocast_dtype=autocast, progress=progress)


def let_plan_for(model: nn.Module, arch: Architecture, config: OmniQuantConfig) -> LetPlan | None:
    """The LET plan of a run: identity start for weight-only runs, SmoothQuant α otherwise."""
    if not config.calib.let:
        return None
    if not (arch.qkv or arch.mlp_in):
        raise ConfigError(f"LET needs a registered architecture; {arch.name} is not registered")
    calib = config.calib
    alpha = calib.let_alpha
    if alpha is None and calib.let_init == "reference":
        alpha = 0.5  # the reference code's --alpha default, weight-only runs included
    elif alpha is None and config.act.enabled:
        alpha = 0.75 if config.act.bits <= 4 else 0.5
    return plan_let(arch, model.config, alpha, config.act.enabled, calib.let_scale, calib.let_init)


def head_dim_of(model: nn.Module, arch: Architecture) -> int | None:
    """Channels per attention head, where the architecture names its q/k/v projections."""
    if len(arch.qkv) != 3:
        return None
    return attention_shape(model.config, arch).head_dim


def attach_act_quantizers_all(model: nn.Module, config: OmniQuantConfig) -> None:
    """Attach the activation quantizers of a weight-activation config to every block."""
    if not config.act.enabled:
        return
    arch = get_architecture(model)
    head_dim = head_dim_of(model, arch)
    for block in decoder_layers(model, arch):
        attach_act_quantizers(block, config.act, arch, head_dim)


def _check_group_size(blocks: nn.ModuleList, config: OmniQuantConfig) -> None:
    g = config.weight.group_size
    if not g:
        return
    for name, linear in block_linears(blocks[0]).items():
        if g > linear.in_features:
            raise ConfigError(
                f"group size {g} is larger than the width {linear.in_features} of {name}; "
                f"use a group size <= {linear.in_features} or per-channel (--group-size 0)"
            )


def _prepare_output(output: Path | None, resume: bool) -> Path | None:
    """The work folder `<output>.partial`; refuses an existing output or a stale partial run."""
    if output is None:
        return None
    if output.exists():
        raise OutputError(f"output folder {output} exists already; choose another --output")
    partial = output.with_name(output.name + ".partial")
    if partial.exists() and not resume:
        raise OutputError(
            f"{partial} holds an interrupted run; pass --resume to continue it, or delete it"
        )
    return partial


def _check_resume(partial: Path, run: dict[str, Any]) -> None:
    path = partial / "run.json"
    if path.exists():
        saved = json.loads(path.read_text())
        if saved != run:
            raise OutputError(
                f"--resume: {partial} was started with other settings ({saved}); "
                f"delete it or rerun with the same settings"
            )
    else:
        partial.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(run, indent=2))


def versions() -> dict[str, str]:
    import transformers

    return {
        "omniquant": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def calibration_batches(tokenizer: Any, config: OmniQuantConfig) -> list[torch.Tensor]:
    """The calibration windows split into batches: `nsamples` training windows, then the guard's
    `val_windows` held-out ones. All come from one seeded draw, so the training windows are the
    same with or without validation windows."""
    c = config.calib
    tokens = tokenize_text(tokenizer, load_text(c.calib_dataset))
    n = c.nsamples + c.val_windows
    windows = calibration_windows(tokens, n, c.seqlen, bos_token_id(tokenizer), c.seed)
    return list(windows.split(c.batch_size))


def quantize_lm_head(model: nn.Module, config: OmniQuantConfig, lm_head_path: str) -> None:
    """Round-to-nearest the lm_head (untied from the embeddings first)."""
    head = get_module(model, lm_head_path)
    assert isinstance(head, nn.Linear)
    with torch.no_grad():
        q = LWC(head.out_features, head.in_features, config.weight, learnable=False)
        head.weight = nn.Parameter(q(head.weight.detach().clone()), requires_grad=False)
    if getattr(model.config, "tie_word_embeddings", False):
        model.config.tie_word_embeddings = False


def quantize(
    model: str | os.PathLike[str] | nn.Module | None = None,
    config: OmniQuantConfig | None = None,
    *,
    tokenizer: Any = None,
    output: str | os.PathLike[str] | None = None,
    device: str = "cpu",
    dtype: str = "auto",
    resume: bool = False,
    progress: bool = True,
    format: str = "fake",
) -> QuantizeResult:
    """Quantize a causal LM with OmniQuant (or RTN) block by block.

    `model` is a loaded Hugging Face model (changed in place) or a name/path for `load_model`
    (None: the embedded SmolLM2 default). With `output`, the result is written as a folder that
    `transformers.AutoModelForCausalLM.from_pretrained` loads, plus `omniquant.json`; while running,
    the work lives in `<output>.partial` and `resume=True` continues it from the next block.
    `format`: "fake" (float weights on the grid), "compressed-tensors", "omniquant-packed" or
    "auto" (see `omniquant.formats`); a format that cannot hold the setting is refused up front.
    """
    config = config or OmniQuantConfig()
    if format not in (*FORMATS, "auto"):
        raise ConfigError(f"format must be auto or one of {', '.join(FORMATS)}; got {format!r}")
    runtime = runtime_for(device, dtype, progress)
    out = Path(output) if output is not None else None
    partial = _prepare_output(out, resume)
    model_name = str(model) if not isinstance(model, nn.Module) else type(model).__name__
    if not isinstance(model, nn.Module):
        model, tokenizer = load_model(model)
    if tokenizer is None:
        raise ModelError("pass the tokenizer with a model object: quantize(model, tokenizer=...)")
    arch = get_architecture(model)
    blocks = decoder_layers(model, arch)
    _check_group_size(blocks, config)
    let_plan = let_plan_for(model, arch, config)
    batches = calibration_batches(tokenizer, config)
    run_id = {"model": model_name, "config": config.to_dict()}
    store = StateStore(None)
    if partial is not None:
        _check_resume(partial, run_id)
        store = StateStore(partial / "state")
    torch.manual_seed(config.calib.seed)
    t0 = time.perf_counter()
    try:
        captured = capture_block_inputs(model, blocks, batches, runtime.device)
        reports = calibrate_blocks(
            blocks,
            captured,
            config.weight,
            config.calib,
            runtime,
            store,
            act=config.act,
            let_plan=let_plan,
            arch=arch,
            head_dim=head_dim_of(model, arch),
            val_batches=config.calib.val_windows // config.calib.batch_size,
        )
    except BaseException:
        if partial is not None:
            if store.completed() == 0:
                shutil.rmtree(partial, ignore_errors=True)
            else:
                log.error("interrupted; %s keeps the finished blocks: rerun with --resume", partial)
        raise
    if config.quantize_lm_head:
        quantize_lm_head(model, config, arch.lm_head)
    seconds = time.perf_counter() - t0
    report = build_report(model_name, arch.name, config, runtime, reports, seconds)
    log.info("calibrated %d blocks in %.1f s", len(reports), seconds)
    if out is not None and partial is not None:
        fmt = resolve_format(format, model, config)
        report["format"] = {"name": fmt}
        write_output(model, tokenizer, report, partial, out, fmt, config)
    return QuantizeResult(model, tokenizer, report, out)


def build_report(
    model_name: str,
    arch: str,
    config: OmniQuantConfig,
    runtime: Runtime,
    reports: list[BlockReport],
    seconds: float,
) -> dict[str, Any]:
    return {
        "model": model_name,
        "architecture": arch,
        "setting": config.label,
        "config": config.to_dict(),
        "runtime": {
            "device": str(runtime.device),
            "autocast": str(runtime.autocast_dtype) if runtime.autocast_dtype else "float32",
            "threads": torch.get_num_threads(),
        },
        "calibration_seconds": seconds,
        # the epochs' time vs the rest (capture, targets, the "before" pass, fold, advance)
        "train_seconds": sum(r.train_seconds for r in reports),
        "fixed_seconds": seconds - sum(r.train_seconds for r in reports),
        "nan_events": sum(r.nan_events for r in reports),
        "val_windows": config.calib.val_windows,
        "fallbacks": [r.index for r in reports if r.fell_back],
        "blocks": [r.to_dict() for r in reports],
        "versions": versions(),
        "command": " ".join(sys.argv),
    }


def write_output(
    model: nn.Module,
    tokenizer: Any,
    report: dict[str, Any],
    partial: Path,
    out: Path,
    fmt: str = "fake",
    config: OmniQuantConfig | None = None,
) -> None:
    """Save into the partial folder with omniquant.json and report.md (plus plots), then rename
    it to the output in one step."""
    shutil.rmtree(partial / "state", ignore_errors=True)
    (partial / "run.json").unlink(missing_ok=True)
    if fmt == "fake":
        save_model(model, tokenizer, partial)
        save_grids(model, partial)
        (partial / REPORT_FILE).write_text(json.dumps(report, indent=2))
    else:
        write_packed_format(fmt, model, tokenizer, config or OmniQuantConfig(), report, partial)
    write_run_report(partial, report)
    partial.rename(out)


def export(
    model: str | os.PathLike[str],
    output: str | os.PathLike[str],
    format: str = "auto",
) -> Path:
    """Write a model folder from `quantize` (fake format) as compressed-tensors or
    omniquant-packed ('auto': compressed-tensors where it holds the setting). Atomic: the folder
    appears complete or not at all."""
    out = Path(output)
    if out.exists():
        raise OutputError(f"output folder {out} exists already; choose another")
    src = Path(str(model))
    report_path = src / REPORT_FILE
    if not report_path.is_file():
        raise ModelError(f"{src} holds no {REPORT_FILE}: export takes a folder that quantize wrote")
    report = json.loads(report_path.read_text())
    config = OmniQuantConfig.from_dict(report["config"])
    loaded, tokenizer = load(src)
    fmt = resolve_format(format, loaded, config)
    if fmt == "fake":
        raise ConfigError("export writes a packed format: compressed-tensors or omniquant-packed")
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        write_packed_format(
            fmt, loaded, tokenizer, config, {**report, "format": {"name": fmt}}, partial
        )
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    partial.rename(out)
    return out


def evaluate(
    model: str | os.PathLike[str] | nn.Module | None = None,
    *,
    tokenizer: Any = None,
    dataset: str = "austen:emma",
    seqlen: int = 512,
    max_windows: int | None = 80,
    device: str = "cpu",
    batch_size: int = 4,
    progress: bool = True,
    kernels: bool = False,
) -> float:
    """Perplexity per the austen-v1 protocol (defaults) or on another text source.

    kernels=True (a quantized folder given by path): the perplexity of the model as it runs with
    the integer kernels (`load(path, kernels=True)`), bf16 activations included."""
    given = isinstance(model, nn.Module)
    if given and kernels:
        raise ConfigError("kernels=True needs a model path; or pass load(path, kernels=True)[0]")
    if not given:
        model, tokenizer = load(model, kernels=kernels, device=device, progress=progress)
    if tokenizer is None:
        raise ModelError("pass the tokenizer with a model object: evaluate(model, tokenizer=...)")
    tokens = tokenize_text(tokenizer, load_text(dataset, split=EVAL_SPLITS.get(dataset, "train")))
    windows = eval_windows(tokens, seqlen, bos_token_id(tokenizer), max_windows)
    model.to(device)
    try:
        return perplexity(model, windows, device, batch_size, progress)
    finally:
        if given:  # the caller's model goes back where models live between steps
            model.to("cpu")


def load(
    path: str | os.PathLike[str] | None,
    kernels: bool = False,
    device: str = "cpu",
    progress: bool = False,
) -> tuple[nn.Module, Any]:
    """Load a model folder written by `quantize` or `export` (or any model `load_model` takes):
    (model, tokenizer), with its activation quantizers attached where the run had them.

    kernels=True runs every quantized linear through `QuantLinear` (int4 / int8 kernels, or
    unpacking on the fly), from an omniquant-packed folder or a fake-quantized one with its grids.
    """
    folder = Path(str(path)) if path is not None else None
    report = folder / REPORT_FILE if folder is not None else None
    config = None
    if report is not None and report.is_file():
        saved = json.loads(report.read_text())
        config = OmniQuantConfig.from_dict(saved["config"])
        fmt = saved.get("format", {}).get("name", "fake")
    if folder is not None and config is not None and fmt == "omniquant-packed":
        model, tokenizer, _ = load_packed(
            folder,
            kernels,
            device,
            prepare=lambda m: attach_act_quantizers_all(m, config),
            progress=progress,
        )
        return model.to(device), tokenizer
    model, tokenizer = load_model(path)
    if folder is not None and config is not None:
        attach_grids(model, folder, config.weight)
    if config is not None and fmt != "compressed-tensors":
        attach_act_quantizers_all(model, config)
    if kernels and (config is None or use_kernels(model, device) == 0):
        raise ModelError(
            f"{path}: kernels=True needs a quantized model folder from omniquant "
            f"(omniquant-packed, or quantize's output with its grids)"
        )
    model.to(device)
    return model, tokenizer
