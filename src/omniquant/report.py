"""What a run folder reports: `report.md` with PNG plots beside `omniquant.json`, the `eval.json`
that `omniquant eval --save` writes, and several runs combined (`omniquant report`).

Plots are drawn with matplotlib's Agg canvas (headless, no pyplot state), 800 px wide. Without
matplotlib (the `report` extra) the markdown is written alone, with a warning.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omniquant.errors import ModelError, OutputError
from omniquant.paths import check_new_output
from omniquant.runfile import RUN_FILE, read_run_record, record_config, record_setting

log = logging.getLogger(__name__)

EVAL_FILE = "eval.json"
REPORT_MD = "report.md"
BLOCK_PLOT = "block_loss.png"
EPOCH_PLOT = "epoch_loss.png"
BITS_PLOT = "perplexity_vs_bits.png"
LOG_RANGE = 30.0  # plot on a log scale when max / min of the values exceeds this
FIGSIZE = (8.0, 4.5)  # inches at DPI: 800 × 450 px, the plot width
DPI = 100


# ---------------------------------------------------------------- eval.json


def read_eval(folder: Path) -> dict[str, Any]:
    """The run folder's eval.json, or {} when there is none."""
    path = folder / EVAL_FILE
    if not path.is_file():
        return {}
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{path} is not readable JSON ({e}); delete it or restore it") from e
    if not isinstance(values, dict):
        raise ModelError(f"{path} is malformed: not a JSON object; delete it or restore it")
    return values


def eval_protocol(values: dict[str, Any]) -> str:
    """What a saved perplexity was measured on: 'austen:emma, 80 × 512' (text, windows × tokens);
    older eval.json files without the window record say so."""
    dataset = values.get("dataset") or "?"
    windows, seqlen = values.get("windows"), values.get("seqlen")
    if windows is None or seqlen is None:
        return f"{dataset}, windows not recorded"
    return f"{dataset}, {windows} × {seqlen}"


def eval_folder(model: str) -> Path:
    """The model folder that `omniquant eval --save` writes eval.json into."""
    folder = Path(model)
    if not folder.is_dir():
        raise OutputError(
            f"--save writes {EVAL_FILE} into the model folder, and {model!r} is not a folder"
        )
    return folder


def save_eval(folder: Path, values: dict[str, Any]) -> Path:
    """Merge `values` into the folder's eval.json: perplexity and zero-shot results add up, and
    zero-shot tasks add to those saved before."""
    merged = read_eval(eval_folder(str(folder)))
    for key, value in values.items():
        old = merged.get(key)
        merged[key] = (
            {**old, **value} if isinstance(old, dict) and isinstance(value, dict) else value
        )
    path = folder / EVAL_FILE
    path.write_text(json.dumps(merged, indent=2))
    return path


# ---------------------------------------------------------------- shared helpers


def finite(values: Sequence[float]) -> list[float]:
    return [v for v in values if isinstance(v, int | float) and math.isfinite(v)]


def needs_log(values: Sequence[float]) -> bool:
    """Whether positive values span more than LOG_RANGE (a linear axis would flatten them)."""
    pos = [v for v in finite(values) if v > 0]
    return len(pos) > 1 and max(pos) / min(pos) > LOG_RANGE


def fmt(x: Any, digits: int = 4) -> str:
    if not isinstance(x, int | float) or not math.isfinite(x):
        return "—"
    return f"{x:,.{digits}g}" if abs(x) < 1e4 else f"{x:,.0f}"


def method_label(config: dict[str, Any]) -> str:
    """`rtn`, `omniquant (LWC + LET)`, `omniquant (LWC) + weight training`, ..."""
    calib = config.get("calib", {})
    if calib.get("method", "omniquant") != "omniquant":
        return str(calib.get("method"))
    parts = [name for name in ("lwc", "let") if calib.get(name, name == "lwc")]
    label = f"omniquant ({' + '.join(p.upper() for p in parts) or 'no LWC/LET'})"
    return label + (" + weight training" if calib.get("weight_lr") else "")


def matplotlib_figure() -> Any:
    """A new 800-px-wide figure on the Agg canvas, or None (with a warning) without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        log.warning("matplotlib is not installed: report without plots (pip install matplotlib)")
        return None
    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Any, path: Path) -> Path:
    fig.savefig(path, dpi=DPI)
    return path


# ---------------------------------------------------------------- one run


def plot_block_loss(report: dict[str, Any], path: Path) -> Path | None:
    """Loss of each block before and after calibration (log y where the range demands it)."""
    fig = matplotlib_figure()
    if fig is None:
        return None
    blocks = report["blocks"]
    ax = fig.subplots()
    index = [b["index"] for b in blocks]
    before = [b["loss_before"] for b in blocks]
    after = [b["loss_after"] for b in blocks]
    if before == after:  # nothing was trained (RTN): one line
        ax.plot(index, after, "o-", ms=4, label="round-to-nearest (no calibration)")
    else:
        ax.plot(index, before, "o-", ms=4, label="before calibration (initial quantizers)")
        ax.plot(index, after, "s-", ms=4, label="after calibration")
    ax.set_xlabel("decoder block")
    ax.set_ylabel(f"block output loss ({report['config']['calib'].get('loss', 'mse')})")
    ax.set_title(f"{report['setting']} {method_label(report['config'])}: loss per block")
    if needs_log(before + after):
        ax.set_yscale("log")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend()
    return save_figure(fig, path)


def has_curve(block: dict[str, Any]) -> bool:
    """Whether a block trained for two or more epochs with finite, positive losses."""
    losses = block["epoch_losses"]
    return len(losses) > 1 and finite(losses) == losses and losses[0] > 0


def plot_epoch_loss(report: dict[str, Any], path: Path) -> Path | None:
    """Each block's per-epoch training loss relative to its first epoch (None: under 2 epochs)."""
    curves = [(b["index"], b["epoch_losses"]) for b in report["blocks"] if has_curve(b)]
    fig = matplotlib_figure() if curves else None
    if fig is None:
        return None
    from matplotlib import cm, colormaps, colors

    ax = fig.subplots()
    norm = colors.Normalize(vmin=0, vmax=max(len(report["blocks"]) - 1, 1))
    relative = []
    for index, losses in curves:
        rel = [v / losses[0] for v in losses]
        relative += rel
        epochs = range(1, len(rel) + 1)
        ax.plot(epochs, rel, "o-", ms=3, lw=1.2, color=colormaps["viridis"](norm(index)))
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss / loss of epoch 1")
    ax.set_title(f"{report['setting']}: training loss per epoch, one line per block")
    ax.xaxis.get_major_locator().set_params(integer=True)
    if needs_log(relative):
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    fig.colorbar(cm.ScalarMappable(norm=norm, cmap="viridis"), ax=ax, label="decoder block")
    return save_figure(fig, path)


def run_summary(report: dict[str, Any]) -> list[str]:
    """The key facts of a run as a two-column markdown table."""
    cfg = report["config"]
    calib, rt = cfg["calib"], report.get("runtime", {})
    versions = ", ".join(f"{k} {v}" for k, v in report.get("versions", {}).items())
    facts = [
        ("model", report.get("model", "—")),
        ("setting", report["setting"]),
        ("method", method_label(cfg)),
        (
            "calibration",
            f"{calib['nsamples']} × {calib['seqlen']} of {calib['calib_dataset']}, "
            f"{calib['epochs']} epochs, batch {calib['batch_size']}, loss {calib['loss']}",
        ),
        (
            "learning rates",
            f"LWC {calib['lwc_lr']}, LET {calib['let_lr']}, weights {calib.get('weight_lr', 0)}",
        ),
        ("calibration seconds", f"{report['calibration_seconds']:.1f}"),
        (
            "runtime",
            f"{rt.get('device', '?')}, {rt.get('autocast', '?')}, {rt.get('threads', '?')} threads",
        ),
        ("NaN events", str(report.get("nan_events", 0))),
        ("guard", guard_summary(report)),
        ("end-to-end scales", end_to_end_summary(report)),
        ("versions", versions or "—"),
    ]
    return ["| | |", "| --- | --- |", *(f"| {k} | {v} |" for k, v in facts)]


def guard_summary(report: dict[str, Any]) -> str:
    """The guard's settings and which blocks fell back to their starting quantizers."""
    blocks = report["blocks"]
    if not any(b.get("val_losses") for b in blocks):
        return "off (no held-out windows)"
    calib = report["config"]["calib"]
    fell_back = [str(b["index"]) for b in blocks if b.get("fell_back")]
    stopped = sum(bool(b.get("stopped_early")) for b in blocks)
    return (
        f"{report.get('val_windows', '?')} held-out windows, patience "
        f"{calib.get('patience')}; fell back: {', '.join(fell_back) or 'none'}; "
        f"stopped early: {stopped} blocks"
    )


def end_to_end_summary(report: dict[str, Any]) -> str:
    """What the end-to-end stage (end_to_end.py) did: its held-out loss and whether it kept
    its starting scales."""
    e2e = report.get("end_to_end")
    if not e2e:
        return "off"
    losses = e2e.get("val_losses") or []
    if not losses:
        held = "no held-out windows"
    elif e2e.get("fell_back"):
        held = f"held-out {fmt(losses[0])}, epochs {', '.join(fmt(v) for v in losses[1:])}: "
        held += "**kept the starting scales**"
    else:
        held = f"held-out {fmt(losses[0])} → {fmt(losses[e2e['best_epoch']])} "
        held += f"(epoch {e2e['best_epoch']})"
    return (
        f"{e2e['scales']} scales of {e2e['linears']} linears, {e2e['epochs']} epochs, lr "
        f"{e2e['lr']:g}; {held}; {e2e['seconds']:.1f} s, NaN events {e2e['nan_events']}"
    )


def held_out_cell(block: dict[str, Any]) -> str:
    """`start → best (epoch e)` of a block's held-out loss, `— ` without the guard."""
    losses = block.get("val_losses") or []
    if not losses:
        return "—"
    if block.get("fell_back"):
        epochs = ", ".join(fmt(v, 3) for v in losses[1:])
        return f"{fmt(losses[0])}, epochs {epochs}: **fell back** to the start"
    best = block.get("best_epoch", 0)
    return f"{fmt(losses[0])} → {fmt(losses[best])} (epoch {best})"


def block_table(blocks: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| block | loss before | loss after | after / before | seconds | epoch losses "
        "| held-out loss | NaN events | final lr scale |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for b in blocks:
        before, after = b["loss_before"], b["loss_after"]
        ratio = after / before if finite([before, after]) == [before, after] and before else None
        epochs = ", ".join(fmt(v, 3) for v in b["epoch_losses"]) or "—"
        lines.append(
            f"| {b['index']} | {fmt(before)} | {fmt(after)} | {fmt(ratio, 3)} "
            f"| {b['seconds']:.1f} | {epochs} | {held_out_cell(b)} | {b['nan_events']} "
            f"| {b['final_lr_scale']:g} |"
        )
    return lines


def run_markdown(report: dict[str, Any], plots: dict[str, Path | None]) -> str:
    lines = [f"# OmniQuant run: {report['setting']}, {method_label(report['config'])}", ""]
    lines += [*run_summary(report), "", "## Loss per block", ""]
    block_plot = plots.get(BLOCK_PLOT)
    lines += [f"![loss per block]({block_plot.name})" if block_plot else "(no plot)", ""]
    lines += ["## Training loss per epoch", ""]
    epoch_plot = plots.get(EPOCH_PLOT)
    if epoch_plot:
        lines.append(f"![training loss per epoch]({epoch_plot.name})")
    else:
        lines.append("No curve: fewer than two training epochs per block, or no plot library.")
    lines += ["", "## Blocks", "", *block_table(report["blocks"]), ""]
    return "\n".join(lines)


def write_run_report(folder: Path, report: dict[str, Any]) -> list[Path]:
    """Write report.md and its plots (block_loss.png, epoch_loss.png) into a run folder; returns
    the files written. Without matplotlib, report.md alone (a warning is logged)."""
    plots = {
        BLOCK_PLOT: plot_block_loss(report, folder / BLOCK_PLOT),
        EPOCH_PLOT: plot_epoch_loss(report, folder / EPOCH_PLOT),
    }
    md = folder / REPORT_MD
    md.write_text(run_markdown(report, plots), encoding="utf-8")
    return [md, *(p for p in plots.values() if p is not None)]


# ---------------------------------------------------------------- several runs


def run_row(folder: Path) -> dict[str, Any]:
    """One run folder as a table row: its omniquant.json (absent: a float model) and eval.json."""
    if not folder.is_dir():
        raise OutputError(f"{folder} does not exist or is not a folder; pass run folders")
    report, evals = read_run_record(folder), read_eval(folder)
    if report is None and not evals:
        raise OutputError(f"{folder} holds neither {RUN_FILE} nor {EVAL_FILE}; not a run folder")
    ppl = evals.get("perplexity")
    row: dict[str, Any] = {
        "name": folder.name,
        "perplexity": ppl if isinstance(ppl, int | float) else None,
        "dataset": evals.get("dataset"),
        "eval": eval_protocol(evals) if ppl is not None else None,
        "zeroshot": mean_accuracy(evals.get("zeroshot", {})),
    }
    if report is None:
        return {**row, "method": "float", "setting": "—", "bits": 16, "group": None}
    cfg = record_config(report).to_dict()
    return {
        **row,
        "method": method_label(cfg),
        "setting": record_setting(report),
        "bits": cfg["weight"]["bits"],
        "group": cfg["weight"].get("group_size"),
        "calib": f"{cfg['calib']['nsamples']} × {cfg['calib']['seqlen']}",
        "epochs": cfg["calib"]["epochs"] if cfg["calib"]["method"] == "omniquant" else None,
        "seconds": report.get("calibration_seconds"),
    }


def mean_accuracy(zeroshot: dict[str, dict[str, float]]) -> float | None:
    """The mean zero-shot acc of an eval.json's "zeroshot" section, or None."""
    if not isinstance(zeroshot, dict):
        return None
    accs = [v["acc"] for v in zeroshot.values() if isinstance(v, dict) and "acc" in v]
    return math.fsum(accs) / len(accs) if accs else None


def runs_table(rows: list[dict[str, Any]]) -> list[str]:
    """One line per run; a zero-shot column when some run has zero-shot results."""
    with_zeroshot = any(r["zeroshot"] is not None for r in rows)
    head = (
        "| run | method | setting | nsamples × seqlen | epochs | calib s "
        "| perplexity on (text, windows × tokens) | perplexity |"
    )
    rule = "| --- | --- | --- | --- | --- | --- | --- | --- |"
    if with_zeroshot:
        head, rule = head + " zero-shot acc (mean) |", rule + " --- |"
    lines = [head, rule]
    for r in rows:
        ppl = r["perplexity"]
        ppl_text = f"{ppl:,.2f}" if ppl is not None else f"not measured (no {EVAL_FILE})"
        seconds = f"{r['seconds']:.1f}" if r.get("seconds") is not None else "—"
        line = (
            f"| {r['name']} | {r['method']} | {r['setting']} | {r.get('calib', '—')} "
            f"| {r.get('epochs') or '—'} | {seconds} | {r.get('eval') or '—'} | {ppl_text} |"
        )
        if with_zeroshot:
            line += f" {fmt(r['zeroshot'])} |"
        lines.append(line)
    return lines


def series_label(row: dict[str, Any]) -> str:
    group = f"g{row['group']}" if row["group"] else "per-channel"
    return f"{row['method']}, {group}"


def plot_perplexity_vs_bits(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """Perplexity against weight bits, one line per method and grouping; float as a dashed line."""
    measured = [r for r in rows if r["perplexity"] is not None]
    fig = matplotlib_figure() if measured else None
    if fig is None:
        return None
    ax = fig.subplots()
    quantized = [r for r in measured if r["method"] != "float"]
    for label in sorted({series_label(r) for r in quantized}):
        points = sorted((r["bits"], r["perplexity"]) for r in quantized if series_label(r) == label)
        ax.plot(*zip(*points, strict=True), "o-", label=label)
    for r in (r for r in measured if r["method"] == "float"):
        label = "float" if r["name"] == "float" else f"float: {r['name']}"
        ax.axhline(r["perplexity"], ls="--", color="grey", label=label)
    datasets = {r["dataset"] for r in measured if r.get("dataset")}
    dataset = f" on {datasets.pop()}" if len(datasets) == 1 else ""
    ax.set_xlabel("weight bits")
    ax.set_ylabel(f"perplexity{dataset} (lower is better)")
    ax.set_title("Perplexity versus weight bits")
    ax.set_xticks(sorted({r["bits"] for r in quantized}) or [16])
    if needs_log([r["perplexity"] for r in measured]):
        ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return save_figure(fig, path)


def combine_runs(runs: list[Path], out: Path) -> Path:
    """Several run folders in one markdown table and a perplexity-versus-bits plot (written into
    `out`); returns the markdown file."""
    check_new_output(Path(out), "report folder")
    rows = [run_row(Path(run)) for run in runs]
    out.mkdir(parents=True)
    plot = plot_perplexity_vs_bits(rows, out / BITS_PLOT)
    lines = ["# OmniQuant runs", "", *runs_table(rows), ""]
    if plot is not None:
        lines += [f"![perplexity versus weight bits]({plot.name})", ""]
    md = out / REPORT_MD
    md.write_text("\n".join(lines), encoding="utf-8")
    return md
