"""`omniquant demo`: the float model, round-to-nearest and OmniQuant side by side.

Each quantized row starts from a fresh copy of the loaded model; every row is scored on several
texts (by default Austen's *Emma* and the Debian Policy Manual, out of domain for a model
calibrated on *Pride and Prejudice*). `DEMO_DEFAULTS` is the setting `omniquant demo` runs:
W3A16g128, where round-to-nearest loses most and OmniQuant's safe recipe (LWC + scale-aware weight
training under the guard) recovers most of it, sized to about ten minutes on two CPU threads.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from torch import nn

import omniquant
from omniquant.config import OmniQuantConfig

DEMO_DEFAULTS: dict[str, Any] = {
    "wbits": 3,
    "group_size": 128,
    "nsamples": 16,
    "seqlen": 512,
    "epochs": 2,
    "weight_lr": 0.007,  # quantization steps: about the absolute 1e-3 of SmolLM2's W3g128 recipe
    "eval_windows": 40,  # half the austen-v1 protocol's 80, to fit six evaluations in the time
}
"""The demo's flag values, the defaults of `omniquant demo` (other flags as for quantize)."""

Evaluate = Callable[[nn.Module, str], float]  # (model, text source) -> perplexity


@dataclass
class DemoRow:
    """One line of the demo table."""

    method: str
    setting: str
    perplexity: dict[str, float]  # by text source
    calib_seconds: float = 0.0
    fallbacks: int = 0  # blocks whose training the guard undid


def with_method(config: OmniQuantConfig, method: str) -> OmniQuantConfig:
    """The same run with another calibration method ("rtn" or "omniquant"); the RTN baseline
    without the end-to-end stage (plain round-to-nearest)."""
    e2e = config.calib.e2e_epochs if method == "omniquant" else 0
    return replace(config, calib=replace(config.calib, method=method, e2e_epochs=e2e))


def demo_rows(
    model: nn.Module,
    tokenizer: Any,
    config: OmniQuantConfig,
    datasets: Sequence[str],
    evaluate: Evaluate,
    **quantize_kwargs: Any,
) -> list[DemoRow]:
    """Float, RTN and OmniQuant rows; `quantize_kwargs` go to `omniquant.quantize` (device, ...)."""
    rows = [DemoRow("float", "-", {d: evaluate(model, d) for d in datasets})]
    for method in ("rtn", "omniquant"):
        cfg = with_method(config, method)
        result = omniquant.quantize(
            copy.deepcopy(model), cfg, tokenizer=tokenizer, **quantize_kwargs
        )
        rows.append(
            DemoRow(
                method,
                cfg.label,
                {d: evaluate(result.model, d) for d in datasets},
                result.report["calibration_seconds"],
                len(result.report["fallbacks"]),
            )
        )
    return rows


def recipe(config: OmniQuantConfig) -> str:
    """The OmniQuant row's recipe in words."""
    c = config.calib
    parts = ["LWC"] + (["LET"] if c.let else [])
    if c.weight_lr:
        bound = f", within {c.weight_bound:g} steps" if c.weight_bound is not None else ""
        parts.append(f"weight training (lr {c.weight_lr:g} steps{bound})")
    if c.lr_schedule != "constant":
        parts.append(f"{c.lr_schedule} lr")
    if c.e2e_epochs:
        parts.append(f"end-to-end scales ({c.e2e_loss}, lr {c.e2e_lr:g}, {c.e2e_epochs} epochs)")
    guard = f"guard on {c.val_windows} held-out windows" if c.val_windows else "no guard"
    return f"{' + '.join(parts)}, {c.nsamples}x{c.seqlen}, {c.epochs} epochs, {guard}"


def demo_table(rows: Sequence[DemoRow], datasets: Sequence[str]) -> str:
    """The rows as a markdown table: one perplexity column per text."""
    width = max(12, *(len(d) + 2 for d in datasets))
    head = f"| {'method':<10} | {'setting':<10} |"
    head += "".join(f" {d:>{width}} |" for d in datasets)
    head += f" {'calib s':>8} | {'fallbacks':>9} |"
    rule = f"|{'-' * 12}|{'-' * 12}|" + f"{'-' * (width + 2)}|" * len(datasets)
    rule += f"{'-' * 10}|{'-' * 11}|"
    lines = [head, rule]
    for r in rows:
        cells = "".join(f" {r.perplexity[d]:>{width}.2f} |" for d in datasets)
        fallbacks = str(r.fallbacks) if r.method == "omniquant" else "-"
        lines.append(
            f"| {r.method:<10} | {r.setting:<10} |{cells} {r.calib_seconds:>8.1f} "
            f"| {fallbacks:>9} |"
        )
    return "\n".join(lines)
