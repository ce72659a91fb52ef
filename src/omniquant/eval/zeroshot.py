"""Zero-shot accuracy through EleutherAI's lm-eval (the optional extra `zeroshot`).

The model is scored by `omniquant.eval.lm_adapter.ModuleLM`, so a float, fake-quantized or packed
model in memory is evaluated as it is. Tasks are lm-eval task names (`piqa`, `arc_easy`, ...,
which need the Hugging Face Hub or its cache) or the names of task YAMLs in `include_path`, a
folder that also works offline when its YAMLs read local files (`dataset_path: json`).
"""

from __future__ import annotations

import importlib
import logging
import math
from pathlib import Path
from types import ModuleType
from typing import Any

from torch import nn

from omniquant.errors import ConfigError, DataError, MissingDependencyError

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'omniquant[zeroshot]'"
METRICS = ("acc", "acc_norm")


def require_lm_eval() -> ModuleType:
    """The `lm_eval` package, or an error that says how to install it."""
    try:
        return importlib.import_module("lm_eval")
    except ImportError as e:
        raise MissingDependencyError(
            f"zero-shot evaluation needs EleutherAI's lm-eval, which is not installed: "
            f"{INSTALL_HINT}"
        ) from e


def task_manager(tasks: list[str], include_path: str | None) -> Any:
    """An lm-eval TaskManager that knows `tasks`; only `include_path` is indexed when it holds
    them all (indexing lm-eval's own few thousand task files takes seconds)."""
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        if not Path(include_path).is_dir():
            raise ConfigError(f"--tasks-include {include_path} is not a folder of task YAMLs")
        local = TaskManager(include_path=include_path, include_defaults=False)
        if set(tasks) <= set(local.all_tasks):
            return local
    manager = TaskManager(include_path=include_path)
    unknown = sorted(set(tasks) - set(manager.all_tasks))
    if unknown:
        raise ConfigError(
            f"unknown zero-shot task(s): {', '.join(unknown)}; use lm-eval task names "
            f"(e.g. piqa, arc_easy) or pass --tasks-include FOLDER with their YAMLs"
        )
    return manager


def zeroshot(
    model: nn.Module,
    tokenizer: Any,
    tasks: list[str],
    *,
    include_path: str | None = None,
    limit: int | None = None,
    batch_size: int = 4,
    device: str = "cpu",
    progress: bool = True,
) -> dict[str, dict[str, float]]:
    """Zero-shot accuracy per task: {task: {"acc": ..., "acc_norm": ...}} (acc_norm where the
    task defines it). `limit` caps the documents per task."""
    lm_eval = require_lm_eval()
    from omniquant.eval.lm_adapter import ModuleLM

    if not tasks:
        raise ConfigError("no zero-shot tasks given: pass --tasks piqa,arc_easy,...")
    manager = task_manager(tasks, include_path)
    lm = ModuleLM(model, tokenizer, batch_size=batch_size, device=device, progress=progress)
    model.eval()
    model.to(device)
    try:
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=tasks,
            task_manager=manager,
            limit=limit,
            bootstrap_iters=0,
            log_samples=False,
        )
    except OSError as e:  # ConnectionError, offline mode, a missing cached dataset
        raise DataError(
            f"could not get the data of task(s) {', '.join(tasks)}: "
            f"{' '.join(str(e).split())[:200]}; standard tasks need the Hugging Face Hub (or its "
            f"cache): offline, use --tasks-include FOLDER with tasks that read local files"
        ) from e
    finally:
        model.to("cpu")
    return task_metrics(out["results"])


def task_metrics(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """acc / acc_norm of each task from lm-eval's `results` section ("acc,none": 0.61, ...)."""
    metrics: dict[str, dict[str, float]] = {}
    for task, values in results.items():
        found = {m: float(values[f"{m},none"]) for m in METRICS if f"{m},none" in values}
        if found:
            metrics[task] = found
    return metrics


def mean_metrics(metrics: dict[str, dict[str, float]]) -> dict[str, float]:
    """The mean of each metric over the tasks that define it."""
    means: dict[str, float] = {}
    for m in METRICS:
        values = [v[m] for v in metrics.values() if m in v]
        if values:
            means[m] = math.fsum(values) / len(values)
    return means


def format_table(metrics: dict[str, dict[str, float]]) -> str:
    """A markdown table: one row per task, then the mean."""
    width = max([len("mean"), *(len(t) for t in metrics)])
    lines = [
        f"| {'task':<{width}} |    acc | acc_norm |",
        f"|{'-' * (width + 2)}|--------|----------|",
    ]
    rows = [*metrics.items(), ("mean", mean_metrics(metrics))]
    for task, v in rows:
        acc = f"{v['acc']:.4f}" if "acc" in v else "—"
        norm = f"{v['acc_norm']:.4f}" if "acc_norm" in v else "—"
        lines.append(f"| {task:<{width}} | {acc:>6} | {norm:>8} |")
    return "\n".join(lines)
