"""One function per subcommand (`COMMANDS`), each a thin layer over the public API."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import torch

import omniquant
from omniquant import checks, runfile, runtime
from omniquant.activations import gib
from omniquant.cli.parser import EVAL_DEFAULTS
from omniquant.cli.settings import (
    changed_flags,
    check_eval_flags,
    config_from_args,
    gguf_options,
    refuse_unused,
)
from omniquant.config import check_run
from omniquant.data import load_text
from omniquant.demo import demo_rows, demo_table, recipe
from omniquant.errors import ConfigError
from omniquant.eval.zeroshot import format_table, require_lm_eval, zeroshot
from omniquant.model_io import DEFAULT_MODEL, load_model
from omniquant.report import combine_runs, eval_folder, save_eval


def _eval(
    model: object, tokenizer: object, a: argparse.Namespace, **options: Any
) -> omniquant.PerplexityResult:
    """The perplexity the `--eval-*` flags ask for (`options`: kernels, head, native)."""
    return omniquant.measure_perplexity(
        model,
        tokenizer=tokenizer,
        dataset=a.eval_dataset,
        seqlen=a.eval_seqlen,
        max_windows=a.eval_windows or None,
        device=a.device,
        batch_size=a.eval_batch_size,
        progress=not a.quiet,
        **options,
    )


def cmd_quantize(a: argparse.Namespace) -> int:
    gguf = gguf_options(a)
    if a.eval:
        check_eval_flags(a)
    else:
        refuse_unused(
            changed_flags(a, EVAL_DEFAULTS), "only {verb} with --eval: add --eval, or drop it"
        )
    config = config_from_args(a)
    result = omniquant.quantize(
        a.model,
        config,
        output=a.output,
        device=a.device,
        dtype=a.dtype,
        resume=a.resume,
        progress=not a.quiet,
        format=a.format,
        stream=a.stream,
        max_memory=a.max_memory,
        gguf=gguf,
    )
    r = result.report
    print(
        f"{r['setting']} {config.calib.method}: {len(r['blocks'])} blocks in "
        f"{r['calibration_seconds']:.1f} s ({r['runtime']['threads']} threads), "
        f"NaN events {r['nan_events']}; written to {a.output}"
    )
    m = r["memory"]
    print(
        f"peak RSS {gib(m['peak_rss_bytes'])}, peak device memory "
        f"{gib(m['peak_device_bytes'])}, activations spilled {gib(m['spilled_bytes'])}"
    )
    print(r["coverage"]["summary"])
    tokens = r.get("expert_tokens")
    if tokens:
        print(
            f"calibration tokens per expert: min {tokens['min']}, median of the blocks' medians "
            f"{tokens['median_of_blocks']}, max {tokens['max']}; experts that got none: "
            f"{tokens['without_tokens']} (they keep their starting clipping)"
        )
    if a.eval:
        model = a.output if a.stream else result.model  # streamed: the weights are on disk
        ppl = _eval(model, result.tokenizer if not a.stream else None, a)
        print(f"perplexity ({ppl.protocol}): {ppl.perplexity:.4f}")
    return 0


def cmd_eval(a: argparse.Namespace) -> int:
    if a.native and a.tasks:
        raise ConfigError("--native measures perplexity: drop --tasks (or --native)")
    if a.native:
        checks.check_native_settings(a.kernels, a.device)
    if a.tasks:
        perplexity_only = {k: v for k, v in EVAL_DEFAULTS.items() if k != "eval_batch_size"}
        refuse_unused(
            changed_flags(a, perplexity_only), "{verb} to perplexity, not to --tasks: drop it"
        )
    else:
        refuse_unused(
            changed_flags(a, {"tasks_include": None, "limit": None}),
            "only {verb} with --tasks: add --tasks TASK,..., or drop it",
        )
        check_eval_flags(a)
    folder = eval_folder(a.model) if a.save else None
    result = _zeroshot(a) if a.tasks else _perplexity(a)
    if folder is not None:
        print(f"saved to {save_eval(folder, result)}")
    return 0


def _perplexity(a: argparse.Namespace) -> dict[str, object]:
    ppl = _eval(a.model, None, a, kernels=a.kernels, head=a.head, native=a.native)
    result = {**ppl.to_dict(), "kernels": a.kernels, "native": a.native, "head": a.head}
    print(json.dumps({"model": a.model, **result}))
    return result


def _zeroshot(a: argparse.Namespace) -> dict[str, object]:
    tasks = [t.strip() for t in a.tasks.split(",") if t.strip()]
    require_lm_eval()  # before loading the model
    model, tokenizer = omniquant.load(
        a.model, kernels=a.kernels, device=a.device, progress=not a.quiet, head=a.head
    )
    metrics = zeroshot(
        model,
        tokenizer,
        tasks,
        include_path=a.tasks_include,
        limit=a.limit,
        batch_size=a.eval_batch_size,
        device=a.device,
        progress=not a.quiet,
    )
    limit = f", at most {a.limit} documents per task" if a.limit else ""
    print(f"zero-shot accuracy of {a.model}{limit}")
    print(format_table(metrics))
    return {"zeroshot": metrics}


def cmd_report(a: argparse.Namespace) -> int:
    print(f"written {combine_runs(a.runs, a.output)}")
    return 0


def _with_eval_dataset(a: argparse.Namespace, dataset: str) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(a), "eval_dataset": dataset})


def cmd_demo(a: argparse.Namespace) -> int:
    check_eval_flags(a)
    runtime.check_device(a.device)
    config = config_from_args(a)
    check_run(config)
    model, tokenizer = load_model(a.model)
    datasets = [a.eval_dataset, a.ood_dataset]
    for dataset in datasets:  # a missing text fails now, not after the calibrations
        load_text(dataset)
    rows = demo_rows(
        model,
        tokenizer,
        config,
        datasets,
        lambda m, d: _eval(m, tokenizer, _with_eval_dataset(a, d)).perplexity,
        device=a.device,
        dtype=a.dtype,
        progress=not a.quiet,
    )
    name = "SmolLM2-135M-Instruct" if a.model == DEFAULT_MODEL else a.model
    windows = f"first {a.eval_windows} windows" if a.eval_windows else "all windows"
    print(
        f"\n{name}, perplexity on the {windows} of {a.eval_seqlen} tokens of each text "
        f"(OmniQuant: {recipe(config)}; {torch.get_num_threads()} threads)"
    )
    print(demo_table(rows, datasets))
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    out = omniquant.export(a.input, a.output, a.format, progress=not a.quiet, gguf=gguf_options(a))
    fmt = json.loads((out / runfile.RUN_FILE).read_text())["format"]["name"]
    print(f"{fmt} model written to {out}")
    return 0


def cmd_generate(a: argparse.Namespace) -> int:
    from omniquant.generate import check_generation, generate

    check_generation(a.prompt, a.max_new_tokens, a.temperature)
    if a.native:
        from omniquant.generate import generate_native

        check_native(a.kernels, a.compile, a.device)
        decoder, tokenizer = omniquant.load_native(a.model, head=a.head, progress=not a.quiet)
        torch.manual_seed(a.seed)
        generate_native(
            decoder, tokenizer, a.prompt, a.max_new_tokens, a.temperature, a.chat, sys.stdout
        )
        return 0
    checks.check_head(a.head, a.kernels)
    model, tokenizer = omniquant.load(
        a.model,
        kernels=a.kernels,
        device=a.device,
        progress=not a.quiet,
        head=a.head,
    )
    torch.manual_seed(a.seed)
    generate(
        model,
        tokenizer,
        a.prompt,
        a.max_new_tokens,
        a.temperature,
        a.chat,
        sys.stdout,
        compile=a.compile,
    )
    return 0


def check_native(kernels: bool, compile: bool, device: str) -> None:
    """Refuse, before loading, what generate --native cannot be combined with."""
    if compile:
        raise ConfigError("--native decodes on its own: drop --compile")
    checks.check_native_settings(kernels, device)


COMMANDS = {
    "quantize": cmd_quantize,
    "eval": cmd_eval,
    "demo": cmd_demo,
    "report": cmd_report,
    "export": cmd_export,
    "generate": cmd_generate,
}
