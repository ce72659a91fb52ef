"""The checks of a run that need the model's shape or the output format, made before any weight
is loaded (from a meta skeleton) and before anything is written.

The checks that need no model live in `config.py` (`check_run`). Settings are named as the
library's fields and arguments in backticks (`group_size`, `max_memory`); the CLI names them
as its flags.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from torch import nn

from omniquant.config import OmniQuantConfig
from omniquant.errors import ConfigError, DataError, ModelError, OutputError
from omniquant.formats import REGISTRY, check_format_holds, check_format_model
from omniquant.formats.gguf.writer import GgufOptions
from omniquant.kernels.head import HEAD_DTYPES
from omniquant.models import block_linears, decoder_layers, get_architecture
from omniquant.paths import existing_ancestor
from omniquant.quant.experts import check_no_fused_experts, expert_weights
from omniquant.runfile import RUN_FILE

log = logging.getLogger(__name__)

GiB = 1 << 30


def linear_widths(model: nn.Module) -> dict[str, int]:
    """The input width of every linear in the decoder blocks, by module path."""
    arch = get_architecture(model)
    return {
        f"{arch.layers}.{i}.{name}": linear.in_features
        for i, block in enumerate(decoder_layers(model, arch))
        for name, linear in block_linears(block).items()
    }


def check_group_size(widths: dict[str, int], config: OmniQuantConfig) -> None:
    """Refuse a group wider than a layer it would quantize."""
    g = config.weight.group_size
    for name, width in widths.items():
        if g and g > width:
            raise ConfigError(
                f"`group_size` {g} is larger than the width {width} of {name}; "
                f"use a group size <= {width} or per-channel (`group_size` 0)"
            )


def check_setting(
    model: nn.Module,
    config: OmniQuantConfig,
    fmt: str,
    gguf: GgufOptions | None = None,
    stream: bool = False,
) -> None:
    """Refuse a group size wider than a layer, what fused experts cannot have yet, what the
    output format cannot hold, and windows longer than the model's context."""
    widths = linear_widths(model)
    check_group_size(widths, config)
    check_experts(model, config, fmt, stream)
    check_format_holds(fmt, config, widths, gguf)
    check_format_model(fmt, model.config)
    check_context(model.config, config.calib.seqlen)


def check_experts(model: nn.Module, config: OmniQuantConfig, fmt: str, stream: bool) -> None:
    """Refuse what fused mixture-of-experts weights cannot be given yet: a packed format,
    quantized activations (their inputs would stay float), the end-to-end stage (it trains the
    linears' step sizes only), a group wider than an expert's input, and `stream` (transformers
    converts their checkpoint tensors, per-expert `w1`/`w2`/`w3`, on load; reading the files
    block by block does not)."""
    experts = expert_weights(model)
    if not experts:
        return
    first = next(iter(experts))
    if stream:
        raise ConfigError(
            f"`stream` reads the checkpoint's tensors as they are, and this model's fused "
            f"experts ({first}, ...) are converted from them on load: drop `stream`"
        )
    if fmt != "fake":
        check_no_fused_experts(model, fmt)
    if config.act.enabled:
        raise ConfigError(
            f"this model's fused experts ({first}, ...) are quantized weight-only so far; "
            f"quantize weights only (`act.bits` 16)"
        )
    if config.calib.e2e_epochs:
        raise ConfigError(
            f"`e2e_epochs` trains the step sizes of linears; this model's fused experts ({first}, "
            f"...) would be left out: drop it"
        )
    g = config.weight.group_size
    narrow = min(e.in_features for e in experts.values())
    if g and g > narrow:
        raise ConfigError(
            f"`group_size` {g} is larger than the experts' input width {narrow} ({first}); "
            f"use a group size <= {narrow} or per-channel (`group_size` 0)"
        )


def model_context(model_config: Any) -> int | None:
    """The longest sequence the model was built for (`max_position_embeddings`), if it says."""
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else None
    for source in (text, model_config):
        n = getattr(source, "max_position_embeddings", None)
        if isinstance(n, int) and n > 0:
            return n
    return None


def check_context(model_config: Any, seqlen: int) -> None:
    """Refuse calibration windows longer than the model's context: positions it never saw (and
    RoPE tables it never built) would be trained on."""
    context = model_context(model_config)
    if context is not None and seqlen > context:
        raise ConfigError(
            f"`seqlen` {seqlen} is longer than the model's context of {context} tokens "
            f"(max_position_embeddings): use `seqlen` {context} or less"
        )


def check_windows(tokens: int, windows: int, seqlen: int, val_windows: int) -> None:
    """Refuse calibration windows that the text can only give by overlapping when a guard holds
    some of them out: the held-out windows would repeat training text and protect nothing;
    warn when training windows alone overlap."""
    need = windows * seqlen
    if tokens >= need:
        return
    numbers = (
        f"{windows} windows x {seqlen} tokens need {need:,} tokens and the calibration text "
        f"has {tokens:,}"
    )
    if val_windows:
        raise DataError(
            f"{numbers}: the windows would overlap, so the guard's {val_windows} held-out "
            f"windows would repeat training text; give a longer text (`calib_dataset`), fewer "
            f"windows (`nsamples`, `val_samples`) or shorter ones (`seqlen`)"
        )
    log.warning(
        "%s: the windows overlap (each token is seen about %.1f times)", numbers, need / tokens
    )


def check_stream_settings(
    model: Any, out: Path | None, fmt: str, config: OmniQuantConfig | None = None
) -> None:
    """What streaming needs: a model path, an output folder (the blocks are written there as
    they finish) and the fake format (packed formats are written from a whole model); no
    end-to-end stage (it trains the whole model at once)."""
    if config is not None and config.calib.e2e_epochs:
        raise ConfigError(
            "`e2e_epochs` trains the whole model at once, which `stream` never holds: drop one"
        )
    if isinstance(model, nn.Module):
        raise ConfigError("`stream` reads the weights from disk: pass a model path, not a model")
    if out is None:
        raise ConfigError("`stream` writes each block as it finishes: it needs an `output`")
    if fmt != "fake":
        raise ConfigError(
            f"`stream` writes the fake format; export it afterwards to {fmt} with `omniquant "
            f"export` (which loads the quantized model)"
        )


def output_bytes(model: nn.Module, config: OmniQuantConfig, fmt: str) -> int:
    """About the bytes a run writes: the output (float32 for the fake format, the packed codes
    otherwise) and the per-block state kept for resume (the weights too when they train)."""
    arch = get_architecture(model)
    blocks = decoder_layers(model, arch)
    in_blocks = sum(p.numel() for b in blocks for p in b.parameters())
    total = sum(p.numel() for p in model.parameters())
    if fmt == "fake":
        written = 4 * total
    else:  # codes, a scale and zero point per group, and the float tensors outside the blocks
        written = in_blocks * config.weight.bits // 8 * 5 // 4 + 4 * (total - in_blocks)
    state = 4 * in_blocks if config.calib.weight_lr > 0 else in_blocks // 8
    return written + state


def check_output_space(output: Path, need: int) -> None:
    """Refuse, before calibrating, an output on a disk without room for what the run writes."""
    folder = existing_ancestor(output / "x")
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return  # cannot tell: the write step reports a failure in one line
    if free < need:
        raise OutputError(
            f"{folder} has {free / GiB:.2f} GiB free and the run writes about {need / GiB:.2f} "
            f"GiB (the output and the state kept for resume): free space or choose another "
            f"`output`"
        )


def check_eval_settings(seqlen: int, max_windows: int | None, batch_size: int) -> None:
    """Refuse perplexity settings that cannot work, before anything is loaded."""
    if seqlen < 2:
        raise ConfigError(f"`seqlen` must be at least 2, got {seqlen}")
    if max_windows is not None and max_windows < 1:
        raise ConfigError(f"`max_windows` must be 0 (all) or positive, got {max_windows}")
    if batch_size < 1:
        raise ConfigError(f"`batch_size` must be at least 1, got {batch_size}")


def check_head(head: str, kernels: bool) -> None:
    """Refuse an unknown head dtype, or a float16 head without the kernels."""
    if head not in HEAD_DTYPES:
        raise ConfigError(f"`head` must be one of {', '.join(HEAD_DTYPES)}, got {head!r}")
    if head == "float16" and not kernels:
        raise ConfigError("`head` float16 runs with the kernels: add `kernels`")


def check_native_settings(kernels: bool, device: str) -> None:
    """Refuse, before loading, what the native decoder cannot be combined with; find the C++
    compiler it is built with."""
    from omniquant.kernels.native import compiler

    if kernels:
        raise ConfigError("the `native` decoder runs its own kernels: drop `kernels`")
    if device != "cpu":
        raise ConfigError(f"the `native` decoder runs on the CPU, not {device}: `device` cpu")
    compiler()


def check_native_config(config: OmniQuantConfig) -> None:
    """Refuse, from a run's recorded settings and before any weight is read, what the native
    decoder cannot run."""
    from omniquant.kernels.native import check_bits_and_group

    if config.act.enabled:
        raise ConfigError(
            f"this model quantizes activations ({config.label}): the native decoder runs "
            "weight-only models; decode it without `native`"
        )
    check_bits_and_group("this model", config.weight.bits, config.weight.group_size)


def check_kernels_source(path: str | os.PathLike[str] | None, fmt: str | None) -> None:
    """Refuse `kernels`, before loading, for a model that omniquant did not quantize or a format
    our kernels do not run (each format's record says why: `Format.kernels`)."""
    if fmt is None:
        raise ModelError(
            f"{path} is not a model quantized by omniquant (no {RUN_FILE}): `kernels` needs an "
            f"omniquant-packed folder or quantize's output; drop `kernels` for a float model"
        )
    reason = REGISTRY[fmt].kernels
    if reason is not None:
        raise ModelError(f"{path} is {reason}")
