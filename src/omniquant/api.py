"""The public functions: `quantize`, `evaluate`, `load`."""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from omniquant import __version__
from omniquant.activations import (
    STORE_DTYPES,
    MemoryBudget,
    MemoryPlan,
    default_max_memory,
    parse_bytes,
    peak_device_bytes,
    peak_rss_bytes,
    work_factor,
)
from omniquant.block_loop import BlockReport, LoopMemory, StateStore, calibrate_blocks
from omniquant.capture import CapturedInputs, capture_block_inputs
from omniquant.config import OmniQuantConfig
from omniquant.data import bos_token_id, calibration_windows, eval_windows, load_text, tokenize_text
from omniquant.end_to_end import teacher_targets, train_step_sizes
from omniquant.errors import ConfigError, ModelError, OutputError
from omniquant.eval.perplexity import perplexity
from omniquant.formats import (
    check_format_holds,
    check_format_model,
    check_format_name,
    resolve_format,
    write_packed_format,
)
from omniquant.formats.gguf.writer import GGUF_FILE, GgufOptions, check_gguf_tokenizer
from omniquant.formats.packed import load_packed, use_kernels
from omniquant.kernels.head import HEAD_DTYPES, use_half_head
from omniquant.memory import parameters_on_meta
from omniquant.model_io import folder_quantization, load_config, load_model, one_line, save_model
from omniquant.models import block_linears, decoder_layers, get_architecture, get_module
from omniquant.models.architecture import Architecture
from omniquant.paths import check_new_output
from omniquant.quant.activation import attach_act_quantizers
from omniquant.quant.lwc import LWC
from omniquant.quant.qparams import GRIDS_FILE, attach_grids, save_grids
from omniquant.report import write_run_report
from omniquant.runfile import RUN_FILE, read_run_record, record_config, record_format
from omniquant.runtime import Runtime, check_device, runtime_for
from omniquant.stream import (
    SafetensorsWeights,
    ShardWriter,
    StreamedBlocks,
    capture_embedding,
    drop,
    fill,
    merge_grid_parts,
    outside_names,
    tied_sources,
    write_rest,
)
from omniquant.transforms.let import LetPlan, attention_shape, plan_let

log = logging.getLogger(__name__)

REPORT_FILE = RUN_FILE
OUTPUT_STAGE = "output"  # the final folder is written here inside <output>.partial, then renamed
EVAL_SPLITS = {"wikitext2": "test", "ptb": "test", "c4": "validation"}


@dataclass
class QuantizeResult:
    """The quantized model (fake-quantized weights, in memory) and what happened."""

    model: nn.Module
    tokenizer: Any
    report: dict[str, Any]
    output: Path | None


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


def linear_widths(model: nn.Module) -> dict[str, int]:
    """The input width of every linear in the decoder blocks, by module path."""
    arch = get_architecture(model)
    return {
        f"{arch.layers}.{i}.{name}": linear.in_features
        for i, block in enumerate(decoder_layers(model, arch))
        for name, linear in block_linears(block).items()
    }


def check_group_size(widths: dict[str, int], config: OmniQuantConfig) -> None:
    g = config.weight.group_size
    for name, width in widths.items():
        if g and g > width:
            raise ConfigError(
                f"group size {g} is larger than the width {width} of {name}; "
                f"use a group size <= {width} or per-channel (--group-size 0)"
            )


def check_setting(
    model: nn.Module, config: OmniQuantConfig, fmt: str, gguf: GgufOptions | None = None
) -> None:
    """Refuse a group size wider than a layer, or what the output format cannot hold."""
    widths = linear_widths(model)
    check_group_size(widths, config)
    check_format_holds(fmt, config, widths, gguf)
    check_format_model(fmt, model.config)


def model_skeleton(name: str | os.PathLike[str] | None) -> nn.Module:
    """The model built from its config alone, its parameters on the meta device: the layers and
    their widths without reading (or allocating) a single weight."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    config = load_config(name)
    try:
        with parameters_on_meta(), no_init_weights():
            model = AutoModelForCausalLM.from_config(config)
    except ValueError as e:
        raise ModelError(f"could not load model {name!r} as a causal LM: {one_line(e)}") from e
    model.tie_weights()  # the meta parameters are new objects: tie them again (a tied lm_head)
    return model


def check_float_source(name: str | os.PathLike[str] | None) -> None:
    """Refuse to quantize a folder that holds an already quantized model."""
    quantized = folder_quantization(Path(str(name))) if name is not None else None
    if quantized is not None:
        raise ModelError(
            f"{name} is already quantized ({quantized}); quantizing it again would round rounded "
            f"weights: quantize the float model it came from (evaluate or generate with this one)"
        )


def check_loaded_is_float(model: nn.Module, name: str) -> None:
    """Refuse a model that transformers loaded as quantized (a GPTQ/AWQ/... Hub checkpoint)."""
    quant = getattr(model.config, "quantization_config", None)
    if quant is not None:
        method = quant.get("quant_method") if isinstance(quant, dict) else quant.quant_method
        raise ModelError(
            f"{name} is already quantized ({method}); quantize the float model it came from"
        )


def _prepare_output(output: Path | None, resume: bool) -> Path | None:
    """The work folder `<output>.partial`; refuses an output that exists or cannot be created,
    and a stale partial run without --resume."""
    if output is None:
        return None
    check_new_output(output)
    partial = output.with_name(output.name + ".partial")
    if partial.exists() and not resume:
        raise OutputError(
            f"{partial} holds an interrupted run; pass --resume to continue it, or delete it"
        )
    if resume and not partial.exists():
        log.warning("--resume: there is no interrupted run at %s; starting afresh", partial)
    return partial


def settings_diff(saved: Any, now: Any, prefix: str = "") -> list[str]:
    """Where two nested settings differ, one 'path: saved -> now' entry per leaf."""
    if isinstance(saved, dict) and isinstance(now, dict):
        keys = sorted(set(saved) | set(now), key=str)
        return [
            line
            for key in keys
            for line in settings_diff(
                saved.get(key, "(absent)"), now.get(key, "(absent)"), f"{prefix}{key}."
            )
        ]
    return [] if saved == now else [f"{prefix.rstrip('.')}: {saved!r} -> {now!r}"]


def _check_resume(partial: Path, run: dict[str, Any]) -> None:
    path = partial / "run.json"
    if path.exists():
        try:
            saved = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise OutputError(f"--resume: {path} is unreadable ({e}); delete {partial}") from e
        diff = settings_diff(saved, run)
        if diff:
            raise OutputError(
                f"--resume: {partial} was started with other settings ({'; '.join(diff)}; "
                f"started -> now); rerun with the same settings, or delete it to start afresh"
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


def calibration_batches(
    tokenizer: Any, config: OmniQuantConfig, text: str | None = None
) -> list[torch.Tensor]:
    """The calibration windows split into batches: `nsamples` training windows, then the guard's
    `val_windows` held-out ones. All come from one seeded draw, so the training windows are the
    same with or without validation windows (`text`: the calibration text when it was read
    already)."""
    c = config.calib
    tokens = tokenize_text(tokenizer, text if text is not None else load_text(c.calib_dataset))
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


def _log_resume(store: StateStore, partial: Path, blocks: int) -> None:
    done = store.completed()
    if done >= blocks:
        log.info("resuming %s: all %d blocks are done; writing the output", partial, blocks)
    elif done:
        log.info("resuming %s from block %d of %d (%d done)", partial, done, blocks, done)


def _after_failure(partial: Path | None, store: StateStore) -> None:
    """An interrupted or failed run: keep the partial folder when it holds finished blocks."""
    if partial is None:
        return
    done = store.completed()
    if done == 0:
        shutil.rmtree(partial, ignore_errors=True)
    else:
        log.error(
            "interrupted; %s keeps %d finished blocks: rerun with --resume to continue",
            partial,
            done,
        )


def memory_plan(
    model: nn.Module,
    config: OmniQuantConfig,
    stream: bool,
    max_memory: int | str | None,
    loaded: bool = False,
) -> MemoryPlan:
    """The run's memory plan from the model's shape (a meta skeleton will do). `loaded`: the
    model is in memory already, so the free memory (the default budget) excludes it."""
    if isinstance(max_memory, str):
        try:
            max_memory = parse_bytes(max_memory)
        except ValueError as e:
            raise ConfigError(f"--max-memory: {e}") from e
    arch = get_architecture(model)
    blocks = decoder_layers(model, arch)
    block_params = max(sum(p.numel() for p in b.parameters()) for b in blocks)
    total = sum(p.numel() for p in model.parameters())  # tied tensors counted once
    in_blocks = sum(p.numel() for b in blocks for p in b.parameters())
    c = config.calib
    hidden = model.config.get_text_config().hidden_size
    n_windows = c.nsamples + c.val_windows
    factor = work_factor(c.trains, c.recompute, c.trains and c.weight_lr > 0)
    return MemoryPlan(
        max_memory=default_max_memory() if max_memory is None else int(max_memory),
        stream=stream,
        block_bytes=4 * block_params,
        work_bytes=4 * block_params * factor,
        outside_bytes=4 * (total - in_blocks),
        resident_bytes=0 if stream or (loaded and max_memory is None) else 4 * total,
        batch_bytes=4 * c.batch_size * c.seqlen * hidden,
        n_batches=n_windows // c.batch_size,
        store_itemsize=STORE_DTYPES[c.activation_dtype].itemsize,
        copies=LoopMemory().copies(c),
    )


def memory_report(
    plan: MemoryPlan, budget: MemoryBudget, runtime: Runtime, config: OmniQuantConfig
) -> dict[str, Any]:
    """What the run used: peak RSS, peak device memory, activations spilled, against the plan."""
    return {
        **plan.to_dict(),
        **budget.to_dict(),
        "activation_dtype": config.calib.activation_dtype,
        "peak_rss_bytes": peak_rss_bytes(),
        "peak_device_bytes": peak_device_bytes(runtime.device),
    }


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
    stream: bool = False,
    max_memory: int | str | None = None,
    gguf: GgufOptions | None = None,
) -> QuantizeResult:
    """Quantize a causal LM with OmniQuant (or RTN) block by block.

    `model` is a loaded Hugging Face model (changed in place) or a name/path for `load_model`
    (None: the embedded SmolLM2 default). With `output`, the result is written as a folder that
    `transformers.AutoModelForCausalLM.from_pretrained` loads, plus `omniquant.json`; while running,
    the work lives in `<output>.partial` and `resume=True` continues it from the next block (or,
    when every block is done, writes the output again). `format`: "fake" (float weights on the
    grid), "compressed-tensors", "omniquant-packed", "gguf" (`gguf`: how it stores embeddings
    and the head) or "auto" (see `omniquant.formats`). Every refusal (settings, format, output,
    model, text, memory) comes before the model's weights are loaded and before anything is
    written.

    `stream=True` never loads the whole model: each block is read from the safetensors files
    when it is calibrated and written to the output as soon as it is done (`omniquant.stream`);
    it needs a model path, an `output` and the fake format, and the returned model is the
    skeleton (its weights on the meta device): load the output to use it. `max_memory` (bytes,
    or '24GB'; default: the free memory minus a margin) bounds the run: activations beyond what
    it leaves spill to files in the partial folder, and a budget too small for one block is
    refused before anything is loaded.
    """
    config = config or OmniQuantConfig()
    check_format_name(format)
    fmt = format if output is not None else "fake"
    runtime = runtime_for(device, dtype, progress)
    out = Path(output) if output is not None else None
    if stream:
        check_stream_settings(model, out, fmt, config)
    partial = _prepare_output(out, resume)
    model_name = str(model) if not isinstance(model, nn.Module) else type(model).__name__
    source = None
    if not isinstance(model, nn.Module):
        check_float_source(model)
        skeleton = model_skeleton(model)
        check_setting(skeleton, config, fmt, gguf)
        plan = memory_plan(skeleton, config, stream, max_memory)
        plan.check(model_name)
        text = load_text(config.calib.calib_dataset)
        if stream:
            from transformers import AutoTokenizer

            from omniquant.stream import weights_folder

            folder = weights_folder(model)
            source = SafetensorsWeights(folder)
            tokenizer = AutoTokenizer.from_pretrained(folder)
            model = skeleton.eval()
        else:
            del skeleton
            model, tokenizer = load_model(model)
        check_loaded_is_float(model, model_name)
    else:
        check_setting(model, config, fmt, gguf)
        plan = memory_plan(model, config, False, max_memory, loaded=True)
        plan.check(model_name)
        text = load_text(config.calib.calib_dataset)
    if tokenizer is None:
        raise ModelError("pass the tokenizer with a model object: quantize(model, tokenizer=...)")
    if fmt == "gguf":
        check_gguf_tokenizer(tokenizer)
    arch = get_architecture(model)
    blocks = decoder_layers(model, arch)
    let_plan = let_plan_for(model, arch, config)
    batches = calibration_batches(tokenizer, config, text)
    run_id = {"model": model_name, "config": config.to_dict()}
    store = StateStore(None)
    if partial is not None:
        _check_resume(partial, run_id)
        store = StateStore(partial / "state")
        _log_resume(store, partial, len(blocks))
    budget = MemoryBudget(
        limit=max(plan.activation_budget, 0),
        folder=partial / "activations" if partial is not None else None,
    )
    memory = LoopMemory(STORE_DTYPES[config.calib.activation_dtype], budget)
    torch.manual_seed(config.calib.seed)
    t0 = time.perf_counter()
    try:
        val_batches = config.calib.val_windows // config.calib.batch_size
        weights = None
        teacher = None  # the float model's targets for the end-to-end stage's distillation
        if source is not None:
            assert partial is not None
            writer = ShardWriter(partial / OUTPUT_STAGE)
            weights = StreamedBlocks(model, arch.layers, source, writer)
            captured = _capture_streamed(model, blocks, batches, runtime, source, arch)
        else:
            if config.calib.e2e_epochs and config.calib.e2e_loss == "distill":
                teacher = teacher_targets(model, batches, config.calib.e2e_topk, runtime)
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
            val_batches=val_batches,
            memory=memory,
            weights=weights,
            consume=True,
        )
        del captured
        if config.quantize_lm_head and source is None:
            quantize_lm_head(model, config, arch.lm_head)
        e2e = None
        if config.calib.e2e_epochs:
            n_val = len(batches) - val_batches
            train, val = batches[:n_val], batches[n_val:]
            e2e = train_step_sizes(model, train, val, config.calib, runtime, teacher)
            del teacher
        seconds = time.perf_counter() - t0
        report = build_report(model_name, arch.name, config, runtime, reports, seconds)
        if e2e is not None:
            report["end_to_end"] = e2e.to_dict()
        report["memory"] = memory_report(plan, budget, runtime, config)
        log.info("calibrated %d blocks in %.1f s", len(reports), seconds)
        if source is not None and out is not None and partial is not None:
            report["format"] = {"name": "fake"}
            write_streamed_output(model, tokenizer, report, partial, out, source, writer, config)
        elif out is not None and partial is not None:
            written = resolve_format(fmt, model, config)
            report["format"] = {"name": written}
            write_output(model, tokenizer, report, partial, out, written, config, gguf)
    except BaseException:
        _after_failure(partial, store)
        raise
    finally:
        budget.cleanup()
    return QuantizeResult(model, tokenizer, report, out)


def check_stream_settings(
    model: Any, out: Path | None, fmt: str, config: OmniQuantConfig | None = None
) -> None:
    """What --stream needs: a model path, an output folder (the blocks are written there as
    they finish) and the fake format (packed formats are written from a whole model); no
    end-to-end stage (it trains the whole model at once)."""
    if config is not None and config.calib.e2e_epochs:
        raise ConfigError(
            "--e2e-epochs trains the whole model at once, which --stream never holds: drop one"
        )
    if isinstance(model, nn.Module):
        raise ConfigError("stream=True reads the weights from disk: pass a model path, not a model")
    if out is None:
        raise ConfigError("--stream writes each block as it finishes: it needs --output")
    if fmt != "fake":
        raise ConfigError(
            f"--stream writes the fake format; export it afterwards to {fmt} with `omniquant "
            f"export` (which loads the quantized model)"
        )


def _capture_streamed(
    model: nn.Module,
    blocks: nn.ModuleList,
    batches: list[torch.Tensor],
    runtime: Runtime,
    source: SafetensorsWeights,
    arch: Architecture,
) -> CapturedInputs:
    """Block 0's inputs with only the modules outside the blocks read from disk (the lm_head
    left out: the forward stops before it), and dropped again after."""
    token_embedding = arch.embeddings[0]
    names = [
        n
        for n in outside_names(model, arch.layers)
        if not n.startswith((arch.lm_head + ".", token_embedding + "."))
        and n not in tied_sources(model)
    ]
    fill(model, source, names)
    ids, restore = capture_embedding(model, source, token_embedding, batches)
    try:
        return capture_block_inputs(model, blocks, ids, runtime.device)
    finally:
        restore()
        drop(model, names)


def write_streamed_output(
    model: nn.Module,
    tokenizer: Any,
    report: dict[str, Any],
    partial: Path,
    out: Path,
    source: SafetensorsWeights,
    writer: ShardWriter,
    config: OmniQuantConfig,
) -> None:
    """Finish the folder whose block shards the loop wrote: the tensors outside the blocks (the
    lm_head rounded when asked), the shard index, config, tokenizer, grids and the run record;
    then rename it to the output, as `write_output` does."""
    arch = get_architecture(model)
    quantize_head = None
    if config.quantize_lm_head:
        if getattr(model.config, "tie_word_embeddings", False):
            model.config.tie_word_embeddings = False

        def quantize_head(weight: torch.Tensor) -> torch.Tensor:
            q = LWC(weight.shape[0], weight.shape[1], config.weight, learnable=False)
            with torch.no_grad():
                return q(weight.clone())

    write_rest(model, source, writer, arch.layers, arch.lm_head, quantize_head)
    writer.finish()
    report["memory"]["peak_rss_bytes"] = peak_rss_bytes()  # the writing included
    stage = writer.folder
    model.config.dtype = torch.float32
    model.config.save_pretrained(stage)
    if (source.folder / "generation_config.json").exists():
        from transformers import GenerationConfig

        GenerationConfig.from_pretrained(source.folder).save_pretrained(stage)
    tokenizer.save_pretrained(stage)
    merge_grid_parts(stage, stage / GRIDS_FILE)  # the blocks' grids, written as they finished
    (stage / REPORT_FILE).write_text(json.dumps(report, indent=2))
    write_run_report(stage, report)
    stage.rename(out)
    shutil.rmtree(partial, ignore_errors=True)


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
    gguf: GgufOptions | None = None,
) -> None:
    """Write the finished folder (omniquant.json, report.md and plots beside the model) inside
    the partial folder, rename it to the output in one step, and only then delete the partial
    folder with its saved blocks: a run killed while writing is finished by --resume without
    training any block again."""
    stage = partial / OUTPUT_STAGE
    shutil.rmtree(stage, ignore_errors=True)  # what an interrupted write left
    if fmt == "fake":
        save_model(model, tokenizer, stage)
        save_grids(model, stage)
        if "memory" in report:
            report["memory"]["peak_rss_bytes"] = peak_rss_bytes()  # the writing included
        (stage / REPORT_FILE).write_text(json.dumps(report, indent=2))
    else:
        write_packed_format(
            fmt, model, tokenizer, config or OmniQuantConfig(), report, stage, gguf=gguf
        )
    write_run_report(stage, report)
    stage.rename(out)
    shutil.rmtree(partial, ignore_errors=True)


def quantized_source(folder: Path) -> dict[str, Any]:
    """The run record of a folder that quantize or export wrote, or a clear error."""
    if not folder.exists():
        raise ModelError(f"{folder} does not exist: export takes a folder that quantize wrote")
    record = read_run_record(folder) if folder.is_dir() else None
    if record is None:
        raise ModelError(
            f"{folder} holds no {REPORT_FILE}: export takes a folder that quantize wrote"
        )
    return record


def export(
    model: str | os.PathLike[str],
    output: str | os.PathLike[str],
    format: str = "auto",
    progress: bool = False,
    gguf: GgufOptions | None = None,
) -> Path:
    """Write a model folder from `quantize` (fake format) as compressed-tensors,
    omniquant-packed or gguf ('auto': compressed-tensors where it holds the setting). Atomic: the
    folder appears complete or not at all; what the format cannot hold is refused before
    loading."""
    out = Path(output)
    check_format_name(format)
    if format == "fake":
        raise ConfigError(
            "export writes a packed format: compressed-tensors, omniquant-packed or gguf"
        )
    check_new_output(out)
    src = Path(str(model))
    config = record_config(quantized_source(src))
    report = read_run_record(src) or {}
    check_format_holds(format, config, {}, gguf)  # bits and activations; widths once loaded
    if format == "gguf":  # the family, from config.json alone (the source may be packed)
        from transformers import AutoConfig

        check_format_model(format, AutoConfig.from_pretrained(src))
    log.info("loading %s", src)
    loaded, tokenizer = load(src, progress=progress)
    fmt = resolve_format(format, loaded, config)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    log.info("writing %s as %s", out, fmt)
    try:
        write_packed_format(
            fmt,
            loaded,
            tokenizer,
            config,
            {**report, "format": {"name": fmt}},
            partial,
            progress=progress,
            gguf=gguf,
        )
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    partial.rename(out)
    return out


@dataclass(frozen=True)
class PerplexityResult:
    """A perplexity and what it was measured on: the text and the windows."""

    perplexity: float
    dataset: str
    seqlen: int
    windows: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def protocol(self) -> str:
        """'austen:emma, 80 x 512'."""
        return f"{self.dataset}, {self.windows} x {self.seqlen}"


def check_eval_settings(seqlen: int, max_windows: int | None, batch_size: int) -> None:
    """Refuse perplexity settings that cannot work, before anything is loaded."""
    if seqlen < 2:
        raise ConfigError(f"--eval-seqlen must be at least 2, got {seqlen}")
    if max_windows is not None and max_windows < 1:
        raise ConfigError(f"--eval-windows must be 0 (all) or positive, got {max_windows}")
    if batch_size < 1:
        raise ConfigError(f"--eval-batch-size must be at least 1, got {batch_size}")


def measure_perplexity(
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
    head: str = "float32",
    native: bool = False,
) -> PerplexityResult:
    """`evaluate`, with the text and the windows it was measured on."""
    check_eval_settings(seqlen, max_windows, batch_size)
    check_device(device)
    check_head(head, kernels or native)
    given = isinstance(model, nn.Module)
    if given and kernels:
        raise ConfigError("kernels=True needs a model path; or pass load(path, kernels=True)[0]")
    if native:
        check_native_settings(kernels, device)
    text = load_text(dataset, split=EVAL_SPLITS.get(dataset, "train"))  # before the model
    if native:
        return _native_perplexity(
            model, tokenizer, text, dataset, seqlen, max_windows, head, progress
        )
    if not given:
        model, tokenizer = load(model, kernels=kernels, device=device, progress=progress, head=head)
    if tokenizer is None:
        raise ModelError("pass the tokenizer with a model object: evaluate(model, tokenizer=...)")
    windows = eval_windows(
        tokenize_text(tokenizer, text), seqlen, bos_token_id(tokenizer), max_windows
    )
    model.to(device)
    try:
        ppl = perplexity(model, windows, device, batch_size, progress)
    finally:
        if given:  # the caller's model goes back where models live between steps
            model.to("cpu")
    return PerplexityResult(ppl, dataset, seqlen, windows.shape[0])


def check_native_settings(kernels: bool, device: str) -> None:
    """Refuse, before loading, what the native decoder cannot be combined with; find the C++
    compiler it is built with."""
    from omniquant.kernels.native import compiler

    if kernels:
        raise ConfigError("the native decoder runs its own kernels: drop --kernels (kernels=True)")
    if device != "cpu":
        raise ConfigError(f"the native decoder runs on the CPU, not {device}: use --device cpu")
    compiler()


def check_native_config(config: OmniQuantConfig) -> None:
    """Refuse, from a run's recorded settings and before any weight is read, what the native
    decoder cannot run."""
    from omniquant.kernels.native import check_bits_and_group

    if config.act.enabled:
        raise ConfigError(
            f"this model quantizes activations ({config.label}): the native decoder runs "
            "weight-only models; decode it without --native"
        )
    check_bits_and_group("this model", config.weight.bits, config.weight.group_size)


def _native_perplexity(
    model: str | os.PathLike[str] | nn.Module | None,
    tokenizer: Any,
    text: str,
    dataset: str,
    seqlen: int,
    max_windows: int | None,
    head: str,
    progress: bool,
) -> PerplexityResult:
    """Perplexity through the native decoder: each window fed through its KV cache in chunks,
    every position's logits kept (`NativeDecoder.sequence_logits`)."""
    from omniquant.kernels.native import NativeDecoder

    if isinstance(model, nn.Module):
        if tokenizer is None:
            raise ModelError(
                "pass the tokenizer with a model object: evaluate(model, tokenizer=...)"
            )
        decoder = NativeDecoder(model, head=head)
    else:
        decoder, tokenizer = load_native(model, head=head, progress=progress)
    windows = eval_windows(
        tokenize_text(tokenizer, text), seqlen, bos_token_id(tokenizer), max_windows
    )
    total, count = 0.0, 0
    for window in tqdm(windows, desc="perplexity (native)", leave=False, disable=not progress):
        logits = decoder.sequence_logits(window.tolist())[:-1]
        total += float(F.cross_entropy(logits, window[1:], reduction="sum"))
        count += window.numel() - 1
    return PerplexityResult(math.exp(total / count), dataset, seqlen, windows.shape[0])


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
    head: str = "float32",
    native: bool = False,
) -> float:
    """Perplexity per the austen-v1 protocol (defaults) or on another text source.

    kernels=True (a quantized folder given by path): the perplexity of the model as it runs with
    the integer kernels (`load(path, kernels=True)`), bf16 activations included.
    native=True: as the native decoder runs it (`load_native`; int16 activations, the KV cache,
    `head` float32 or float16), on the CPU."""
    return measure_perplexity(
        model,
        tokenizer=tokenizer,
        dataset=dataset,
        seqlen=seqlen,
        max_windows=max_windows,
        device=device,
        batch_size=batch_size,
        progress=progress,
        kernels=kernels,
        head=head,
        native=native,
    ).perplexity


def load(
    path: str | os.PathLike[str] | None,
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
    folder = Path(str(path)) if path is not None else None
    record = read_run_record(folder) if folder is not None and folder.is_dir() else None
    config = record_config(record) if record is not None else None
    fmt = record_format(record) if record is not None else None
    if kernels:
        check_kernels_source(path, fmt)
    if folder is not None and fmt == "gguf":
        return load_gguf_folder(folder, device)
    if folder is not None and config is not None and fmt == "omniquant-packed":
        model, tokenizer, _ = load_packed(
            folder,
            kernels,
            device,
            prepare=lambda m: attach_act_quantizers_all(m, config),
            progress=progress,
        )
        if head == "float16":
            use_half_head(model)
        return model.to(device), tokenizer
    model, tokenizer = load_model(path)
    if folder is not None and config is not None and fmt == "fake":
        attach_grids(model, folder, config.weight)
    if config is not None and fmt != "compressed-tensors":
        attach_act_quantizers_all(model, config)
    if kernels and use_kernels(model, device) == 0:
        raise ModelError(
            f"{path}: --kernels found no quantization grids (quant_grids.safetensors) to run; "
            f"export the folder with --format omniquant-packed and use that"
        )
    if head == "float16":
        use_half_head(model)
    model.to(device)
    return model, tokenizer


def check_head(head: str, kernels: bool) -> None:
    """Refuse an unknown head dtype, or a float16 head without the kernels."""
    if head not in HEAD_DTYPES:
        raise ConfigError(f"head must be one of {', '.join(HEAD_DTYPES)}, got {head!r}")
    if head == "float16" and not kernels:
        raise ConfigError("a float16 head (--head float16) runs with the kernels: add --kernels")


def _gguf_rope_parameters(folder: Path) -> dict[str, Any] | None:
    """The RoPE settings a scaled model's GGUF folder recorded in its report, if any."""
    report = folder / "omniquant.json"
    if not report.is_file():
        return None
    saved = json.loads(report.read_text()).get("format", {}).get("rope_parameters")
    return saved if isinstance(saved, dict) else None


def load_native(
    path: str | os.PathLike[str] | None,
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
    folder = Path(str(path)) if path is not None else None
    record = read_run_record(folder) if folder is not None and folder.is_dir() else None
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


def load_gguf_folder(folder: Path, device: str = "cpu") -> tuple[nn.Module, Any]:
    """(model, tokenizer) of a gguf folder through transformers' own GGUF loader, which
    dequantizes every block to float32 with the `gguf` package."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(folder, gguf_file=GGUF_FILE)
    saved = _gguf_rope_parameters(folder)
    if saved is not None:  # transformers' GGUF loader reads no RoPE scaling: ours, as written
        config.rope_parameters = saved.get("default", saved)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=GGUF_FILE, config=config, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    return model.eval().to(device), tokenizer


def check_kernels_source(path: str | os.PathLike[str] | None, fmt: str | None) -> None:
    """Refuse kernels=True, before loading, for a model that omniquant did not quantize or a
    compressed-tensors export (which runs through vLLM's or transformers' own kernels)."""
    if fmt is None:
        raise ModelError(
            f"{path} is not a model quantized by omniquant (no {REPORT_FILE}): --kernels needs an "
            f"omniquant-packed folder or quantize's output; drop --kernels for a float model"
        )
    if fmt == "compressed-tensors":
        raise ModelError(
            f"{path} is a compressed-tensors export, which runs through vLLM's or transformers' "
            f"own kernels: drop --kernels, or export quantize's output with --format "
            f"omniquant-packed for ours"
        )
    if fmt == "gguf":
        raise ModelError(
            f"{path} is a GGUF export, which runs in llama.cpp; drop --kernels (it is then read "
            f"through transformers' GGUF loader), or export with --format omniquant-packed"
        )
