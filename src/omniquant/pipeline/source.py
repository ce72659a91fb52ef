"""The model a run quantizes: a loaded model, a model loaded by name, or a streamed one.

`open_source` checks everything it can from the model's config alone (a meta skeleton: the
layers and their widths, no weight read) and only then loads the weights, or, streamed, opens
the safetensors files that each block is read from when its turn comes.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from omniquant.activations import MemoryPlan
from omniquant.checks import check_setting
from omniquant.config import OmniQuantConfig
from omniquant.coverage import Coverage, check_coverage, measure_coverage
from omniquant.errors import ModelError
from omniquant.formats.gguf.writer import GgufOptions
from omniquant.memory import parameters_on_meta
from omniquant.model_io import folder_quantization, load_config, load_model, one_line
from omniquant.models import get_architecture
from omniquant.pipeline.plan import memory_plan
from omniquant.stream import SafetensorsWeights

log = logging.getLogger(__name__)

ModelArg = str | os.PathLike[str] | nn.Module | None


@dataclass
class Source:
    """The model to quantize, its tokenizer, the memory plan it was checked against, and (when
    streamed) the safetensors files its blocks are read from."""

    model: nn.Module
    tokenizer: Any
    plan: MemoryPlan
    weights: SafetensorsWeights | None = None


def model_name(model: ModelArg) -> str:
    """How the run record names the model: its path or name, or its class."""
    return type(model).__name__ if isinstance(model, nn.Module) else str(model)


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


def check_model(
    model: ModelArg,
    config: OmniQuantConfig,
    fmt: str,
    gguf: GgufOptions | None,
    stream: bool,
    max_memory: int | str | None,
) -> tuple[nn.Module, MemoryPlan, Coverage]:
    """Every check that needs the model's shape, from its skeleton (or the given model): what
    it would leave in float, the setting against its widths, the format against its family, the
    memory plan. Returns the skeleton (or the model), the plan and the coverage."""
    name = model_name(model)
    if isinstance(model, nn.Module):
        shape, loaded = model, True
    else:
        check_float_source(model)
        shape, loaded = model_skeleton(model), False
    arch = get_architecture(shape)
    coverage = check_coverage(
        measure_coverage(shape, arch, config.quantize_lm_head), config.keep_float
    )
    check_setting(shape, config, fmt, gguf, stream)
    plan = memory_plan(shape, config, stream, max_memory, loaded=loaded)
    plan.check(name)
    return shape, plan, coverage


def open_source(
    model: ModelArg, shape: nn.Module, plan: MemoryPlan, tokenizer: Any, stream: bool
) -> Source:
    """Load the checked model (or, streamed, open its safetensors files and keep the skeleton)."""
    if isinstance(model, nn.Module):
        if tokenizer is None:
            raise ModelError(
                "pass the tokenizer with a model object: quantize(model, tokenizer=...)"
            )
        return Source(model, tokenizer, plan)
    name = model_name(model)
    if stream:
        from transformers import AutoTokenizer

        from omniquant.stream import weights_folder

        folder = weights_folder(model)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        source = Source(shape.eval(), tokenizer, plan, SafetensorsWeights(folder))
    else:
        del shape
        loaded, tokenizer = load_model(model)
        source = Source(loaded, tokenizer, plan)
    check_loaded_is_float(source.model, name)
    return source
