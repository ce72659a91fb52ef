"""The run's memory plan, from the model's shape alone (a meta skeleton will do), and what the
run used against it."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from torch import nn

from omniquant.activations import (
    STORE_DTYPES,
    MemoryBudget,
    MemoryPlan,
    available_memory_bytes,
    default_max_memory,
    gib,
    parse_bytes,
    peak_device_bytes,
    peak_rss_bytes,
    work_factor,
)
from omniquant.block_loop import LoopMemory
from omniquant.config import OmniQuantConfig
from omniquant.errors import ConfigError
from omniquant.models import decoder_layers, get_architecture
from omniquant.runtime import Runtime

log = logging.getLogger(__name__)


def parse_max_memory(max_memory: int | str | None) -> int | None:
    """Bytes, from an int or text such as '24GB' (None: the default)."""
    if not isinstance(max_memory, str):
        return max_memory
    try:
        return parse_bytes(max_memory)
    except ValueError as e:
        raise ConfigError(f"`max_memory`: {e}") from e


def memory_plan(
    model: nn.Module,
    config: OmniQuantConfig,
    stream: bool,
    max_memory: int | str | None,
    loaded: bool = False,
) -> MemoryPlan:
    """The run's memory plan from the model's shape. `loaded`: the model is in memory already,
    so the free memory (the default budget) excludes it.

    Without `max_memory` the budget is the free memory minus a margin; a plan that needs more
    than that but fits the free memory itself runs at its minimum (activations spilled to disk)
    with a warning, rather than being refused because of the margin."""
    limit = parse_max_memory(max_memory)
    arch = get_architecture(model)
    blocks = decoder_layers(model, arch)
    block_params = max(sum(p.numel() for p in b.parameters()) for b in blocks)
    total = sum(p.numel() for p in model.parameters())  # tied tensors counted once
    in_blocks = sum(p.numel() for b in blocks for p in b.parameters())
    c = config.calib
    hidden = model.config.get_text_config().hidden_size
    factor = work_factor(c.trains, c.recompute, c.trains and c.weight_lr > 0)
    plan = MemoryPlan(
        max_memory=default_max_memory() if limit is None else int(limit),
        stream=stream,
        block_bytes=4 * block_params,
        work_bytes=4 * block_params * factor,
        outside_bytes=4 * (total - in_blocks),
        resident_bytes=0 if stream or (loaded and limit is None) else 4 * total,
        batch_bytes=4 * c.batch_size * c.seqlen * hidden,
        n_batches=c.windows // c.batch_size,
        store_itemsize=STORE_DTYPES[c.activation_dtype].itemsize,
        copies=LoopMemory().copies(c),
        given=limit is not None,
    )
    if limit is None and plan.max_memory < plan.minimum:
        free = available_memory_bytes()
        if free is not None and plan.minimum <= free:
            log.warning(
                "the run needs %s and the machine has %s free: running at the minimum, its "
                "activations spilled to disk (set `max_memory` to choose)",
                gib(plan.minimum),
                gib(free),
            )
            plan = dataclasses.replace(plan, max_memory=plan.minimum)
        elif free is not None:
            plan = dataclasses.replace(plan, max_memory=free)
    return plan


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
