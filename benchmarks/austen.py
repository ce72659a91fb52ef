"""austen-v1 benchmark rows: float, RTN and OmniQuant perplexity on SmolLM2 (BENCHMARK.md).

Each row quantizes a fresh copy of the model, measures calibration wall seconds at a stated thread
count, evaluates perplexity on emma (80 windows of 512) and on an out-of-domain text, the Debian
Policy Manual (`debian:policy`, 80 windows of 512; `ood_perplexity`), and appends one JSON line to
--results.
With --zeroshot it also measures next-sentence accuracy on persuasion (`zeroshot_acc`,
`zeroshot_acc_norm`; see omniquant.eval.austen_tasks). `--table` prints the markdown table of a
results file (what benchmarks/README.md shows).

Examples:
  python benchmarks/austen.py --threads 1 --settings W3A16g128 --methods omniquant \
      --nsamples 32 --epochs 5                                   # the reference code's budget
  python benchmarks/austen.py --threads 2 --settings W4A16g128 --methods float,rtn
  python benchmarks/austen.py --threads 2 --settings W3A16g128 --methods float,rtn --zeroshot
  python benchmarks/austen.py --table --results benchmarks/results/austen.jsonl
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

import omniquant
from omniquant.config import ActQuant, CalibConfig, OmniQuantConfig, WeightQuant
from omniquant.eval.austen_tasks import write_austen_task
from omniquant.eval.zeroshot import zeroshot
from omniquant.model_io import load_model

DEFAULT_RESULTS = Path(__file__).parent / "results" / "austen.jsonl"
SETTING = re.compile(r"^W(\d)A(\d+)(?:g(\d+))?$")
ZEROSHOT_SEED = 0  # the same next-sentence items for every row, whatever the calibration seed
OOD_DATASET = "debian:policy"  # the out-of-domain perplexity text (technical documentation)


def parse_setting(s: str) -> tuple[WeightQuant, ActQuant]:
    m = SETTING.match(s)
    if not m:
        raise SystemExit(f"bad setting {s!r}: use e.g. W4A16, W3A16g128")
    group = int(m.group(3)) if m.group(3) else None
    return WeightQuant(int(m.group(1)), group), ActQuant(int(m.group(2)))


ACT_FIELDS = {f.name for f in dataclasses.fields(ActQuant)}


def variant_fields(pairs: list[str]) -> dict[str, object]:
    """`FIELD=VALUE` pairs as CalibConfig keyword arguments (true/false, numbers, strings)."""
    out: dict[str, object] = {}
    for pair in pairs:
        key, _, text = pair.partition("=")
        value: object = {"true": True, "false": False}.get(text.lower(), text)
        if isinstance(value, str):
            try:
                value = float(text) if "." in text or "e" in text.lower() else int(text)
            except ValueError:
                value = text
        out[key.replace("-", "_")] = value
    return out


def device_name(device: str) -> str:
    """What a row ran on: 'cpu', or the CUDA device's name (rows from other machines differ
    in the last digits; their seconds are not CPU seconds)."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name(torch.device(device))}"
    return device


def run_row(method: str, setting: str, a: argparse.Namespace) -> dict[str, object]:
    model, tokenizer = load_model(a.model)
    row: dict[str, object] = {"method": method, "setting": setting if method != "float" else "-"}
    seconds = 0.0
    if method != "float":
        weight, act = parse_setting(setting)
        variant = variant_fields(a.set)
        act_fields = {k: variant.pop(k) for k in list(variant) if k in ACT_FIELDS}
        act = ActQuant(**{**act.__dict__, **act_fields})
        calib = CalibConfig(
            method="omniquant" if method == "omniquant" else "rtn",
            let=method == "smoothquant" or (method == "omniquant" and a.let),
            let_lr=a.let_lr,
            lwc_lr=a.lwc_lr,
            epochs=a.epochs,
            nsamples=a.nsamples,
            seqlen=a.seqlen,
            weight_lr=a.weight_lr,
            loss=a.loss,
            aug_loss=a.aug_loss,
            batch_size=a.batch_size,
            seed=a.seed,
            shuffle=a.shuffle,
            val_samples=a.val_samples,
            patience=a.patience,
            **variant,
        )
        config = OmniQuantConfig(weight, act, calib)
        t0 = time.perf_counter()
        result = omniquant.quantize(
            model, config, tokenizer=tokenizer, device=a.device, dtype=a.dtype, progress=False
        )
        seconds = time.perf_counter() - t0
        model = result.model
        blocks = result.report["blocks"]
        row.update(
            nsamples=a.nsamples,
            seqlen=a.seqlen,
            epochs=a.epochs if method == "omniquant" else 0,
            let=calib.let,
            lwc_lr=a.lwc_lr,
            weight_lr=a.weight_lr,
            # quantization steps (rows without it: absolute weight units)
            weight_lr_unit="steps" if calib.weight_lr_unit == "step" else "absolute",
            loss=a.loss,
            aug_loss=a.aug_loss,
            dtype=a.dtype,
            nan_events=result.report["nan_events"],
            train_seconds=round(result.report["train_seconds"], 1),
            fixed_seconds=round(result.report["fixed_seconds"], 1),
            variant=variant_fields(a.set),
            shuffle=a.shuffle,
            val_windows=calib.val_windows,
            patience=a.patience,
            fallbacks=result.report["fallbacks"],
            loss_before=[b["loss_before"] for b in blocks],
            loss_after=[b["loss_after"] for b in blocks],
            # the guard's held-out loss at the start and after folding (NaN: no held-out windows)
            val_before=[b["val_losses"][0] if b["val_losses"] else None for b in blocks],
            val_after=[b["val_loss_after"] for b in blocks],
            # the end-to-end stage (--set e2e_epochs=N): held-out losses, fell_back, seconds
            end_to_end=result.report.get("end_to_end"),
        )
    windows = {"device": a.device, "max_windows": a.eval_windows, "progress": False}
    ppl = omniquant.evaluate(model, tokenizer=tokenizer, **windows)
    ood = omniquant.evaluate(model, tokenizer=tokenizer, dataset=OOD_DATASET, **windows)
    row.update(calib_seconds=round(seconds, 1), threads=torch.get_num_threads(), perplexity=ppl)
    row.update(device=device_name(a.device), eval_windows=a.eval_windows)
    row.update(ood_dataset=OOD_DATASET, ood_perplexity=ood)
    if a.zeroshot:
        row.update(zeroshot_row(model, tokenizer, a.task_folder, a.task))
        row.update(zeroshot_items=a.zeroshot_items)
    return row


def zeroshot_row(
    model: torch.nn.Module, tokenizer: object, folder: str, task: str
) -> dict[str, object]:
    """Next-sentence accuracy on the Austen task written into `folder`."""
    metrics = zeroshot(model, tokenizer, [task], include_path=folder, progress=False)[task]
    return {
        "zeroshot_task": task,
        "zeroshot_acc": metrics["acc"],
        "zeroshot_acc_norm": metrics.get("acc_norm"),
    }


def _zeroshot_cell(r: dict[str, object]) -> str:
    if "zeroshot_acc" not in r:
        return "—"
    norm = r.get("zeroshot_acc_norm")
    return f"{r['zeroshot_acc']:.3f}" + (f" / {norm:.3f}" if norm is not None else "")


def _method_label(r: dict[str, object]) -> str:
    if r["method"] == "omniquant":
        label = "OmniQuant (LWC + LET)" if r.get("let") else "OmniQuant (LWC)"
        label += " + weight training" if r.get("weight_lr") else ""
    else:
        names = {"float": "float", "rtn": "RTN", "smoothquant": "SmoothQuant-style + RTN"}
        label = names[str(r["method"])]
    e2e = r.get("end_to_end")
    if isinstance(e2e, dict):
        label += f" + end-to-end scales ({e2e['loss']}, {e2e['epochs']} ep.)"
    return label


def _weight_lr_cell(r: dict[str, object]) -> str:
    """The weight learning rate; rows from before scale-aware training say "abs." (absolute
    weight units) where newer ones count quantization steps."""
    if not r.get("weight_lr"):
        return "—"
    return f"{r['weight_lr']}" + ("" if r.get("weight_lr_unit") == "steps" else " abs.")


def _ood_cell(r: dict[str, object]) -> str:
    """The out-of-domain perplexity, "—" for rows measured before it existed."""
    return f"{r['ood_perplexity']:,.2f}" if "ood_perplexity" in r else "—"


def table(results: Path) -> str:
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    with_zeroshot = any("zeroshot_acc" in r for r in rows)
    lines = [
        "| method | setting | nsamples × seqlen | epochs | loss | weight lr | dtype | calib s "
        f"| threads | perplexity (emma) | perplexity ({OOD_DATASET}) |"
        + (" next-sentence acc / acc_norm |" if with_zeroshot else ""),
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
        + (" --- |" if with_zeroshot else ""),
    ]
    for r in rows:
        calib = f"{r['nsamples']} × {r['seqlen']}" if "nsamples" in r else "—"
        if r["method"] == "rtn" and not r.get("let"):
            calib = "—"
        lines.append(
            f"| {_method_label(r)} | {r['setting']} | {calib} | {r.get('epochs', '—')} "
            f"| {r.get('loss', '—') if r['method'] == 'omniquant' else '—'} "
            f"| {_weight_lr_cell(r)} "
            f"| {r.get('dtype', 'float32')} | {r['calib_seconds']:.0f} | {r['threads']} "
            f"| {r['perplexity']:,.2f} | {_ood_cell(r)} |"
            + (f" {_zeroshot_cell(r)} |" if with_zeroshot else "")
        )
    return "\n".join(lines)


# BENCHMARK.md's rows (austen-v1): RTN (plain PyTorch), GPTQ (llm-compressor), reference OmniQuant
PUBLISHED = {
    "W4A16": {"rtn": 54.12, "omniquant_ref": 48.63},
    "W4A16g128": {"rtn": 41.73, "gptq": 41.10},
    "W3A16g128": {"rtn": 119.84, "gptq": 66.72, "omniquant_ref": 67.27},
    "W2A16g128": {},
    "W2A16g64": {"rtn": 637702, "gptq": 1685.8, "omniquant_ref": 53684},
}
TARGETS = {"W4A16g128": 36.0, "W4A16": 40.0, "W3A16g128": 45.0, "W2A16g64": 250.0}


def _fmt(x: float | None) -> str:
    return "—" if x is None else f"{x:,.2f}"


def compare(results: Path) -> str:
    """benchmarks/README.md's two comparison tables: the reference budget, and the best recipe."""
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    ours = {r["setting"]: r for r in rows if r["method"] == "rtn"}
    ref = {
        r["setting"]: r
        for r in rows
        if r["method"] == "omniquant"
        and not r.get("weight_lr")
        and r["nsamples"] == 32
        and r["epochs"] == 5
        and not r.get("let")
    }
    best: dict[str, dict] = {}  # per setting, the lowest-perplexity LWC + weight-training row
    for r in rows:
        candidate = r["method"] == "omniquant" and r.get("weight_lr") and not r.get("let")
        if candidate and r["perplexity"] < best.get(r["setting"], {}).get("perplexity", 1e30):
            best[r["setting"]] = r
    out = [
        "| setting | RTN (ours) | RTN† | GPTQ† | reference OmniQuant† | **ours (LWC)** "
        "| calib s | threads |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for setting, pub in PUBLISHED.items():
        r = ref.get(setting)
        out.append(
            f"| {setting} | {_fmt(ours[setting]['perplexity']) if setting in ours else '—'} "
            f"| {_fmt(pub.get('rtn'))} | {_fmt(pub.get('gptq'))} "
            f"| {_fmt(pub.get('omniquant_ref'))} "
            f"| **{_fmt(r['perplexity']) if r else '—'}** | {r['calib_seconds'] if r else '—'} "
            f"| {r['threads'] if r else '—'} |"
        )
    out += [
        "",
        "| setting | target | **ours** | nsamples × seqlen | epochs | weight lr | calib s "
        "| threads |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for setting, target in TARGETS.items():
        r = best.get(setting)
        if r:
            out.append(
                f"| {setting} | ≤ {target} | **{_fmt(r['perplexity'])}** | {r['nsamples']} × "
                f"{r['seqlen']} | {r['epochs']} | {r['weight_lr']} | {r['calib_seconds']} "
                f"| {r['threads']} |"
            )
    return "\n".join(out)


WA_TARGETS = {"W8A8": "≤ 34.0", "W6A6": "≤ 36.7", "W4A4": "≤ RTN / 5 and < SmoothQuant-style"}


def _pick(rows: list[dict], method: str, setting: str, let: bool) -> dict | None:
    """The latest row of a method/setting; OmniQuant rows: the 16 × 512, 2-epoch, weight-lr 1e-3
    recipe that the LET comparison uses."""
    found = [
        r
        for r in rows
        if r["method"] == method
        and r["setting"] == setting
        and bool(r.get("let")) == let
        and (
            method != "omniquant"
            or (r.get("nsamples"), r.get("epochs"), r.get("weight_lr")) == (16, 2, 0.001)
        )
    ]
    return found[-1] if found else None


def _ppl(r: dict | None) -> str:
    return _fmt(r["perplexity"] if r else None)


def compare_let(results: Path) -> str:
    """benchmarks/README.md's LET tables: weight-activation settings, and LWC + LET against LWC
    alone."""
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    out = [
        "| setting | target | RTN | SmoothQuant-style + RTN | **OmniQuant (LWC + LET)** "
        "| calib s | threads |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for setting, target in WA_TARGETS.items():
        om = _pick(rows, "omniquant", setting, True)
        out.append(
            f"| {setting} | {target} | {_ppl(_pick(rows, 'rtn', setting, False))} "
            f"| {_ppl(_pick(rows, 'smoothquant', setting, True))} | **{_ppl(om)}** "
            f"| {om['calib_seconds'] if om else '—'} | {om['threads'] if om else '—'} |"
        )
    out += [
        "",
        "| setting | LWC | **LWC + LET** | LWC calib s | LWC + LET calib s | threads |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for setting in ("W4A16", "W3A16g128"):
        lwc, let = _pick(rows, "omniquant", setting, False), _pick(rows, "omniquant", setting, True)
        out.append(
            f"| {setting} | {_ppl(lwc)} | **{_ppl(let)}** "
            f"| {lwc['calib_seconds'] if lwc else '—'} | {let['calib_seconds'] if let else '—'} "
            f"| {let['threads'] if let else '—'} |"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="smollm2", help="model to measure (default smollm2)")
    p.add_argument("--settings", default="W4A16,W4A16g128,W3A16g128,W2A16g128,W2A16g64")
    p.add_argument(
        "--methods",
        default="float,rtn,omniquant",
        help="float, rtn, smoothquant (RTN after LET's SmoothQuant-style start, no training), "
        "omniquant",
    )
    p.add_argument("--let", action="store_true", help="omniquant rows: LWC + LET")
    p.add_argument("--let-lr", type=float, default=5e-3)
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--lwc-lr", type=float, default=1e-2)
    p.add_argument("--weight-lr", type=float, default=0.0)
    p.add_argument("--loss", default="mse", choices=["mse", "token-normalized"])
    p.add_argument("--aug-loss", action="store_true")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="any other CalibConfig field (an ablation), e.g. --set zero_point_ste=false",
    )
    p.add_argument("--shuffle", action="store_true", help="reshuffle the windows every epoch")
    p.add_argument(
        "--val-samples", type=int, default=None, help="held-out windows (default nsamples / 8)"
    )
    p.add_argument("--patience", type=int, default=2, help="guard patience, 0 = no early stop")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--device",
        default="cpu",
        help="cpu or cuda[:N]: where calibration and evaluation run (float32 unless --dtype)",
    )
    p.add_argument(
        "--eval-windows",
        type=int,
        default=80,
        help="windows of 512 per evaluation text (80 = austen-v1; fewer only for smoke runs)",
    )
    p.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    p.add_argument("--table", action="store_true", help="print the table of --results and exit")
    p.add_argument(
        "--compare", action="store_true", help="print the comparison tables of benchmarks/README.md"
    )
    p.add_argument(
        "--compare-let",
        action="store_true",
        help="print the LET / W-A tables of benchmarks/README.md",
    )
    p.add_argument(
        "--zeroshot",
        action="store_true",
        help="also measure next-sentence accuracy on persuasion (needs lm-eval)",
    )
    p.add_argument(
        "--zeroshot-items", type=int, default=500, help="next-sentence items (default 500)"
    )
    a = p.parse_args(argv)
    if a.compare_let:
        print(compare_let(a.results))
        return 0
    if a.table or a.compare:
        print(table(a.results) if a.table else compare(a.results))
        return 0
    torch.set_num_threads(a.threads)
    a.results.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="austen-tasks-") as folder:
        if a.zeroshot:
            a.task_folder = folder
            a.task = write_austen_task(folder, n=a.zeroshot_items, seed=ZEROSHOT_SEED)
        run_rows(a)
    return 0


def run_rows(a: argparse.Namespace) -> None:
    """Measure every method × setting row and append each to --results."""
    methods = a.methods.split(",")
    for method in methods:
        settings = ["-"] if method == "float" else a.settings.split(",")
        for setting in settings:
            row = run_row(method, setting, a)
            with a.results.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps({k: v for k, v in row.items() if not k.startswith("loss_")}))
            sys.stdout.flush()


if __name__ == "__main__":
    raise SystemExit(main())
