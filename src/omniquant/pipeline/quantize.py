"""`quantize`: a causal LM quantized block by block, as a sequence of named steps.

validate   every setting, the format, the output place (`config.check_run`, `checks`,
           `output.prepare_output`): seconds, before any weight is read
load       the model, or streamed: its skeleton and safetensors files (`source`)
capture    block 0's inputs for every calibration window (`capture`, `stream`)
block loop each block calibrated on its inputs, in turn (`block_loop`)
end to end every scale trained together, when asked (`end_to_end`)
report     the run record (`omniquant.json`, `report.md`)
write      the output folder in its format, renamed into place (`output`, `formats`)
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from omniquant.activations import STORE_DTYPES, MemoryBudget, peak_rss_bytes
from omniquant.block_loop import BlockReport, LoopMemory, StateStore, calibrate_blocks
from omniquant.capture import CapturedInputs, capture_block_inputs
from omniquant.checks import check_output_space, check_stream_settings, check_windows, output_bytes
from omniquant.config import OmniQuantConfig, check_run
from omniquant.data import bos_token_id, calibration_windows, load_text, tokenize_text
from omniquant.end_to_end import EndToEndReport, teacher_targets, train_step_sizes
from omniquant.formats import WriteJob, check_format_name, resolve_format, write_format
from omniquant.formats.gguf.writer import GgufOptions, check_gguf_tokenizer
from omniquant.models import decoder_layers, get_architecture, get_module
from omniquant.models.architecture import Architecture
from omniquant.models.registry import unregistered_model_errors
from omniquant.pipeline.output import (
    OUTPUT_STAGE,
    after_failure,
    open_state,
    prepare_output,
    publish,
    stage_folder,
    write_failed,
)
from omniquant.pipeline.plan import memory_report
from omniquant.pipeline.source import ModelArg, Source, check_model, model_name, open_source
from omniquant.quant.experts import run_summary
from omniquant.quant.lwc import LWC
from omniquant.quant.qparams import GRIDS_FILE
from omniquant.report import write_run_report
from omniquant.runfile import versions, write_run_record
from omniquant.runtime import Runtime, runtime_for
from omniquant.stream import (
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
from omniquant.transforms.let import head_dim_of, let_plan_for

log = logging.getLogger(__name__)


@dataclass
class QuantizeResult:
    """The quantized model (fake-quantized weights, in memory) and what happened."""

    model: nn.Module
    tokenizer: Any
    report: dict[str, Any]
    output: Path | None


def quantize(
    model: ModelArg = None,
    config: OmniQuantConfig | None = None,
    *,
    tokenizer: Any = None,
    output: str | Path | None = None,
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
    model, text, memory, disk space) comes before the model's weights are loaded and before
    anything is written.

    `stream=True` never loads the whole model: each block is read from the safetensors files
    when it is calibrated and written to the output as soon as it is done (`omniquant.stream`);
    it needs a model path, an `output` and the fake format, and the returned model is the
    skeleton (its weights on the meta device): load the output to use it. `max_memory` (bytes,
    or '24GB'; default: the free memory minus a margin) bounds the run: activations beyond what
    it leaves spill to files in the partial folder, and a budget too small for one block is
    refused before anything is loaded.
    """
    # validate
    config = config or OmniQuantConfig()
    check_run(config)
    check_format_name(format)
    fmt = format if output is not None else "fake"
    runtime = runtime_for(device, dtype, progress)
    out = Path(output) if output is not None else None
    if stream:
        check_stream_settings(model, out, fmt, config)
    partial = prepare_output(out, resume)
    shape, plan, coverage = check_model(model, config, fmt, gguf, stream, max_memory)
    if out is not None:
        check_output_space(out, output_bytes(shape, config, fmt))
    text = load_text(config.calib.calib_dataset)
    # load
    source = open_source(model, shape, plan, tokenizer, stream)
    if fmt == "gguf":
        check_gguf_tokenizer(source.tokenizer)
    batches = calibration_batches(source.tokenizer, config, text)
    name = model_name(model)
    arch = get_architecture(source.model)
    store = open_state(partial, {"model": name, "config": config.to_dict()}, n_blocks(source))
    budget = MemoryBudget(
        limit=max(plan.activation_budget, 0),
        folder=partial / "activations" if partial is not None else None,
    )
    torch.manual_seed(config.calib.seed)
    t0 = time.perf_counter()
    try:
        with unregistered_model_errors(source.model):  # one line, not a traceback
            reports, e2e, writer = calibrate(
                source, arch, config, batches, runtime, store, budget, partial
            )
        seconds = time.perf_counter() - t0
        # report
        report = build_report(name, arch.name, config, runtime, reports, seconds)
        if e2e is not None:
            report["end_to_end"] = e2e.to_dict()
        report["memory"] = memory_report(plan, budget, runtime, config)
        report["coverage"] = coverage.to_dict()
        log.info("calibrated %d blocks in %.1f s", len(reports), seconds)
        # write
        if out is not None and partial is not None:
            try:
                write(source, config, report, partial, out, fmt, gguf, writer)
            except OSError as e:
                raise write_failed(e, out, partial) from e
    except BaseException as e:
        after_failure(partial, store, e)
        raise
    finally:
        budget.cleanup()
    return QuantizeResult(source.model, source.tokenizer, report, out)


def n_blocks(source: Source) -> int:
    return len(decoder_layers(source.model, get_architecture(source.model)))


def calibration_batches(
    tokenizer: Any, config: OmniQuantConfig, text: str | None = None
) -> list[torch.Tensor]:
    """The calibration windows split into batches: `nsamples` training windows, then the guard's
    `val_windows` held-out ones. All come from one seeded draw, so the training windows are the
    same with or without validation windows (`text`: the calibration text when it was read
    already). A run that learns nothing (RTN) takes one batch: the block loop only measures
    its error on it."""
    c = config.calib
    tokens = tokenize_text(tokenizer, text if text is not None else load_text(c.calib_dataset))
    check_windows(tokens.numel(), c.windows, c.seqlen, c.val_windows)
    windows = calibration_windows(tokens, c.windows, c.seqlen, bos_token_id(tokenizer), c.seed)
    return list(windows.split(c.batch_size))


def calibrate(
    source: Source,
    arch: Architecture,
    config: OmniQuantConfig,
    batches: list[torch.Tensor],
    runtime: Runtime,
    store: StateStore,
    budget: MemoryBudget,
    partial: Path | None,
) -> tuple[list[BlockReport], EndToEndReport | None, ShardWriter | None]:
    """Capture, the block loop and the end-to-end stage: the blocks' reports, the end-to-end
    report (when it ran) and, streamed, the writer that holds the finished blocks' shards."""
    model, calib = source.model, config.calib
    blocks = decoder_layers(model, arch)
    weights, writer, teacher = None, None, None
    # capture
    if source.weights is not None:
        assert partial is not None
        writer = ShardWriter(partial / OUTPUT_STAGE)  # resumed: the finished blocks' shards
        weights = StreamedBlocks(model, arch.layers, source.weights, writer)
        captured = capture_streamed(model, blocks, batches, runtime, source, arch)
    else:
        if calib.e2e_epochs and calib.e2e_loss == "distill":
            teacher = teacher_targets(model, batches, calib.e2e_topk, runtime)
        captured = capture_block_inputs(model, blocks, batches, runtime.device)
    # block loop
    val_batches = calib.val_windows // calib.batch_size
    reports = calibrate_blocks(
        blocks,
        captured,
        config.weight,
        calib,
        runtime,
        store,
        act=config.act,
        let_plan=let_plan_for(model, arch, config),
        arch=arch,
        head_dim=head_dim_of(model, arch),
        val_batches=val_batches,
        memory=LoopMemory(STORE_DTYPES[calib.activation_dtype], budget),
        weights=weights,
        consume=True,
    )
    del captured
    if config.quantize_lm_head and source.weights is None:
        quantize_lm_head(model, config, arch.lm_head)
    # end to end
    e2e = None
    if calib.e2e_epochs:
        n_train = len(batches) - val_batches
        e2e = train_step_sizes(model, batches[:n_train], batches[n_train:], calib, runtime, teacher)
    return reports, e2e, writer


def capture_streamed(
    model: nn.Module,
    blocks: nn.ModuleList,
    batches: list[torch.Tensor],
    runtime: Runtime,
    source: Source,
    arch: Architecture,
) -> CapturedInputs:
    """Block 0's inputs with only the modules outside the blocks read from disk (the lm_head
    left out: the forward stops before it), and dropped again after."""
    assert source.weights is not None
    token_embedding = arch.embeddings[0]
    names = [
        n
        for n in outside_names(model, arch.layers)
        if not n.startswith((arch.lm_head + ".", token_embedding + "."))
        and n not in tied_sources(model)
    ]
    fill(model, source.weights, names)
    ids, restore = capture_embedding(model, source.weights, token_embedding, batches)
    try:
        return capture_block_inputs(model, blocks, ids, runtime.device)
    finally:
        restore()
        drop(model, names)


def round_head(weight: torch.Tensor, config: OmniQuantConfig) -> torch.Tensor:
    """The lm_head's weight rounded to nearest on the weight grid."""
    q = LWC(weight.shape[0], weight.shape[1], config.weight, learnable=False)
    with torch.no_grad():
        return q(weight.detach().clone())


def quantize_lm_head(model: nn.Module, config: OmniQuantConfig, lm_head_path: str) -> None:
    """Round-to-nearest the lm_head (untied from the embeddings first)."""
    head = get_module(model, lm_head_path)
    assert isinstance(head, nn.Linear)
    head.weight = nn.Parameter(round_head(head.weight, config), requires_grad=False)
    if getattr(model.config, "tie_word_embeddings", False):
        model.config.tie_word_embeddings = False


def build_report(
    model_name: str,
    arch: str,
    config: OmniQuantConfig,
    runtime: Runtime,
    reports: list[BlockReport],
    seconds: float,
) -> dict[str, Any]:
    """The run record: the settings, the runtime, each block's report, the versions."""
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
        "expert_tokens": run_summary([r.expert_tokens for r in reports]),
        "blocks": [r.to_dict() for r in reports],
        "versions": versions(),
        "command": " ".join(sys.argv),
    }


def write(
    source: Source,
    config: OmniQuantConfig,
    report: dict[str, Any],
    partial: Path,
    out: Path,
    fmt: str,
    gguf: GgufOptions | None,
    writer: ShardWriter | None,
) -> None:
    """Write the finished folder inside the partial folder and rename it to the output."""
    if writer is not None:
        report["format"] = {"name": "fake"}
        write_streamed_output(source, config, report, writer)
        stage = writer.folder
    else:
        written = resolve_format(fmt, source.model, config)
        report["format"] = {"name": written}
        stage = stage_folder(partial)
        write_output(source, config, report, stage, written, gguf)
    write_run_report(stage, report)
    publish(stage, out, partial)


def write_output(
    source: Source,
    config: OmniQuantConfig,
    report: dict[str, Any],
    stage: Path,
    fmt: str,
    gguf: GgufOptions | None = None,
) -> None:
    """A whole model's folder in its format, with its run record (`formats.write_format`)."""

    def measure() -> None:
        report["memory"]["peak_rss_bytes"] = peak_rss_bytes()  # the writing included

    job = WriteJob(source.model, source.tokenizer, config, report, stage, gguf=gguf)
    write_format(fmt, job, after_write=measure)


def write_streamed_output(
    source: Source, config: OmniQuantConfig, report: dict[str, Any], writer: ShardWriter
) -> None:
    """Finish the folder whose block shards the loop wrote: the tensors outside the blocks (the
    lm_head rounded when asked), the shard index, config, tokenizer, grids and the run record."""
    assert source.weights is not None
    model = source.model
    arch = get_architecture(model)
    quantize_head = None
    if config.quantize_lm_head:
        if getattr(model.config, "tie_word_embeddings", False):
            model.config.tie_word_embeddings = False

        def quantize_head(weight: torch.Tensor) -> torch.Tensor:
            return round_head(weight, config)

    write_rest(model, source.weights, writer, arch.layers, arch.lm_head, quantize_head)
    writer.finish()
    report["memory"]["peak_rss_bytes"] = peak_rss_bytes()  # the writing included
    stage = writer.folder
    model.config.dtype = torch.float32
    model.config.save_pretrained(stage)
    if (source.weights.folder / "generation_config.json").exists():
        from transformers import GenerationConfig

        GenerationConfig.from_pretrained(source.weights.folder).save_pretrained(stage)
    source.tokenizer.save_pretrained(stage)
    merge_grid_parts(stage, stage / GRIDS_FILE)  # the blocks' grids, written as they finished
    write_run_record(stage, report)
