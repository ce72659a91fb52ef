"""The `omniquant` command's flags: one argparse parser with a subcommand per verb; every
flag has its help (`omniquant <command> --help`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from omniquant.config import CalibConfig
from omniquant.demo import DEMO_DEFAULTS
from omniquant.formats import FORMATS, PACKED_FORMATS, formats_help
from omniquant.formats.gguf.writer import APPROXIMATE_TYPES, FLOAT_TYPES
from omniquant.kernels.head import HEAD_DTYPES
from omniquant.model_io import DEFAULT_MODEL
from omniquant.schedule import SCHEDULES

MODEL_HELP = (
    "model to load: a local Hugging Face folder, a .gguf file, a Hub id (needs the network), or "
    f"'{DEFAULT_MODEL}' for the embedded offline default SmolLM2-135M-Instruct (default)"
)


EVAL_DEFAULTS: dict[str, Any] = {
    "eval_dataset": "austen:emma",
    "eval_seqlen": 512,
    "eval_windows": 80,
    "eval_batch_size": 4,
}


def _add_threads_quiet(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for PyTorch (default: PyTorch's choice)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars or info logging")


def _add_runtime(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device", default="cpu", help="where to compute: cpu, cuda, cuda:1 ... (default cpu)"
    )
    _add_threads_quiet(p)


def _add_eval_data(p: argparse.ArgumentParser) -> None:
    d = EVAL_DEFAULTS
    p.add_argument(
        "--eval-dataset",
        default=d["eval_dataset"],
        help="perplexity text: austen:<novel>, debian:policy (technical documentation, the "
        "out-of-domain text), a .txt file or folder, wikitext2, c4, ptb "
        "(default austen:emma, the austen-v1 protocol)",
    )
    p.add_argument(
        "--eval-seqlen",
        type=int,
        default=d["eval_seqlen"],
        help=f"perplexity window length in tokens (default {d['eval_seqlen']})",
    )
    p.add_argument(
        "--eval-windows",
        type=int,
        default=d["eval_windows"],
        help=f"number of windows, 0 for all (default {d['eval_windows']})",
    )
    p.add_argument(
        "--eval-batch-size",
        type=int,
        default=d["eval_batch_size"],
        help=f"windows per forward pass (default {d['eval_batch_size']})",
    )


def _add_head(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--head",
        choices=HEAD_DTYPES,
        default="float32",
        help="with --kernels (or generate --native): keep the output head (and an embedding tied "
        "to it) in float16, as "
        "llama.cpp's f16 output does: half its bytes and, on the CPU, a faster decode step; the "
        "logits then carry float16 rounding (default float32)",
    )


def _add_zeroshot(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tasks",
        default=None,
        help="zero-shot accuracy on these comma-separated lm-eval tasks (piqa,arc_easy,...) "
        "instead of perplexity; needs pip install 'omniquant[zeroshot]'",
    )
    p.add_argument(
        "--tasks-include",
        default=None,
        help="folder of extra lm-eval task YAMLs (e.g. local JSONL tasks, which work offline)",
    )
    p.add_argument("--limit", type=int, default=None, help="at most this many documents per task")


def _add_quant_flags(p: argparse.ArgumentParser, method: bool = True) -> None:
    """The quantization flags; `method=False` for demo, which runs both methods."""
    d = CalibConfig()
    p.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)
    if method:
        p.add_argument(
            "--method",
            choices=["omniquant", "rtn"],
            default="omniquant",
            help="omniquant: learned calibration; rtn: round-to-nearest min-max baseline",
        )
    p.add_argument("--wbits", type=int, default=4, help="weight bits, 2..8 (default 4)")
    p.add_argument(
        "--abits",
        type=int,
        default=16,
        help="activation bits: 4..8 quantizes activations per token, 16 = not quantized "
        "(default 16)",
    )
    p.add_argument(
        "--qkv-quant",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="with --abits < 16, also quantize the query/key/value states per head (default on; "
        "--no-qkv-quant for a model that compressed-tensors can hold at W8A8)",
    )
    p.add_argument(
        "--qkv-point",
        choices=["attention", "projection"],
        default="attention",
        help="where q, k, v are quantized with --abits < 16: attention = as the attention "
        "reads them (after RoPE and q/k norms; keys and values as the KV cache holds them), as "
        "the reference code does (default); projection = the q/k/v projections' outputs",
    )
    p.add_argument(
        "--group-size",
        type=int,
        default=0,
        help="input channels per weight group; 0 = one scale per output channel "
        "(default 0). A ragged last group holds the remainder.",
    )
    p.add_argument(
        "--symmetric", action="store_true", help="symmetric weight grid (default asymmetric)"
    )
    p.add_argument(
        "--lwc",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="learnable weight clipping (default on)",
    )
    p.add_argument(
        "--let",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="learnable equivalent transformation (default off)",
    )
    p.add_argument(
        "--epochs",
        type=int,
        default=d.epochs,
        help=f"passes over the calibration set per block, at least 1 (default {d.epochs}; "
        "for no training at all use --method rtn)",
    )
    p.add_argument(
        "--nsamples",
        type=int,
        default=d.nsamples,
        help=f"calibration windows (default {d.nsamples})",
    )
    p.add_argument(
        "--val-samples",
        type=int,
        default=d.val_samples,
        help="held-out windows for the guard, drawn after the calibration windows with the same "
        "seed: each block keeps its best epoch on them and falls back to its starting "
        "quantizers when training never beats them (default: nsamples / 8, at least one "
        "batch; 0 = no guard)",
    )
    p.add_argument(
        "--patience",
        type=int,
        default=d.patience,
        help="stop a block's training after this many epochs without a better held-out loss; "
        f"0 = never stop early (default {d.patience})",
    )
    p.add_argument(
        "--seqlen",
        type=int,
        default=d.seqlen,
        help=f"tokens per calibration window (default {d.seqlen})",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=d.batch_size,
        help=f"windows per optimizer step (default {d.batch_size})",
    )
    p.add_argument(
        "--shuffle",
        action="store_true",
        help="reshuffle the windows every epoch (seeded); default: the same order every epoch, "
        "as the reference code",
    )
    p.add_argument(
        "--calib-dataset",
        default=d.calib_dataset,
        help="calibration text: austen:<novel>, a .txt file or folder of .txt, "
        f"wikitext2, c4, ptb (default {d.calib_dataset})",
    )
    p.add_argument(
        "--lwc-lr", type=float, default=d.lwc_lr, help=f"LWC learning rate (default {d.lwc_lr})"
    )
    p.add_argument(
        "--let-alpha",
        type=float,
        default=None,
        help="SmoothQuant migration strength that starts LET's scales (with --let; default: 0.5, "
        "0.75 with 4-bit activations; weight-only runs start at the identity)",
    )
    p.add_argument(
        "--let-lr",
        type=float,
        default=d.let_lr,
        help=f"LET learning rate (with --let; default {d.let_lr})",
    )
    p.add_argument(
        "--let-scale",
        choices=["log", "direct"],
        default=d.let_scale,
        help="LET learns log s (a step is a relative change) or s itself with |s| floored at "
        f"1e-2, as the reference code (default {d.let_scale})",
    )
    p.add_argument(
        "--let-init",
        choices=["ours", "reference"],
        default=d.let_init,
        help="LET's start: ours = SmoothQuant scales of the norm sites from the quantized "
        "chain's statistics, v->o at the identity; reference = float-chain statistics, the "
        "site's first linear, v->o SmoothQuant-style, alpha 0.5 unless --let-alpha "
        f"(default {d.let_init})",
    )
    p.add_argument(
        "--weight-lr",
        type=float,
        default=d.weight_lr,
        help="also train each block's float weights (0 = off, plain OmniQuant; >0 = block-wise "
        "weight fine-tuning, as in EfficientQAT). Unit: quantization steps of each weight's "
        "group (W = W0 + step * offset), so one value suits models of any weight scale; "
        "AdamW moves a weight by about this many steps per optimizer step",
    )
    p.add_argument(
        "--weight-lr-unit",
        choices=["step", "absolute"],
        default=d.weight_lr_unit,
        help="unit of --weight-lr: step = quantization steps of each weight's group (default); "
        "absolute = weight units, as before (to reproduce older rows)",
    )
    p.add_argument(
        "--weight-bound",
        type=float,
        default=d.weight_bound,
        help="keep each trained weight within this many steps (--weight-lr's unit) of its "
        "start: 0.5 lets training choose each weight's rounding and no more (default: "
        "unbounded). Guards text of other domains against weights that drift where the "
        "calibration text does not look (docs/how-it-works.md, the safe recipe)",
    )
    p.add_argument(
        "--lr-schedule",
        choices=list(SCHEDULES),
        default=d.lr_schedule,
        help="every learning rate over a block's epochs x batches steps: constant (the "
        "reference code), cosine or linear decay towards zero, so the last steps of a block "
        f"move parameters less (default {d.lr_schedule})",
    )
    p.add_argument(
        "--e2e-epochs",
        type=int,
        default=d.e2e_epochs,
        help="after the block loop, train every quantized linear's scales together, end to end, "
        "on the next-token loss of the calibration windows for this many epochs (EfficientQAT's "
        "E2E-QP; codes and zero points stay, so every format stores the result exactly). "
        "Guarded by the held-out windows: the best epoch is kept, never a worse model than the "
        "block loop's. Weight-only settings, not with --stream; the whole model goes to "
        f"--device for it (default {d.e2e_epochs} = off)",
    )
    p.add_argument(
        "--e2e-lr",
        type=float,
        default=d.e2e_lr,
        help="learning rate of --e2e-epochs, relative: each scale h0 (1 + t) moves by about this "
        f"fraction per step, decayed by a cosine (default {d.e2e_lr:g})",
    )
    p.add_argument(
        "--e2e-loss",
        choices=["distill", "next-token"],
        default=d.e2e_loss,
        help="loss of --e2e-epochs: distill = cross-entropy to the float model's next-token "
        "distribution (its --e2e-topk most likely tokens, taken before the block loop): it "
        "recovers the float model; next-token = the calibration text's own tokens: it also "
        "adapts the model to that text, which helps text like it and less other text "
        f"(default {d.e2e_loss})",
    )
    p.add_argument(
        "--e2e-topk",
        type=int,
        default=d.e2e_topk,
        help=f"tokens of the float model's distribution that --e2e-loss distill keeps per "
        f"position (default {d.e2e_topk})",
    )
    p.add_argument("--wd", type=float, default=d.wd, help=f"AdamW weight decay (default {d.wd})")
    p.add_argument(
        "--zero-point-grad",
        choices=["ste", "none"],
        default="ste" if d.zero_point_ste else "none",
        help="gradient through the rounding of each group's zero point to the clipping "
        "strengths: ste = straight-through; none = hard rounding, as the reference code "
        f"(default {'ste' if d.zero_point_ste else 'none'}; "
        "see docs/differences-from-reference.md)",
    )
    p.add_argument(
        "--aug-loss",
        action="store_true",
        help="also match the float block's output on the quantized chain's input",
    )
    p.add_argument(
        "--loss",
        choices=["mse", "token-normalized"],
        default=d.loss,
        help="block loss: plain MSE, or each token's error relative to its own size, so "
        "the massive first-token activation does not dominate (default mse)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=d.seed,
        help=f"seed for sampling and shuffling (default {d.seed})",
    )
    p.add_argument(
        "--quantize-lm-head", action="store_true", help="also round the lm_head (default off)"
    )
    p.add_argument(
        "--keep-float",
        action="append",
        default=[],
        metavar="PATTERN",
        help="accept leaving the modules whose path matches PATTERN (fnmatch, e.g. "
        "'backbone.layers.*.mixer*') in float. A run that would leave more than 1%% of the "
        "weights outside embeddings, routers and the head in float (weights it cannot quantize "
        "yet, such as a state-space mixer's parameters) is refused, naming them, unless they "
        "are named here; repeat for several patterns",
    )
    p.add_argument(
        "--activation-dtype",
        choices=["float32", "bfloat16"],
        default=d.activation_dtype,
        help="dtype the calibration activations are stored in between blocks (bfloat16 halves "
        f"their memory; default {d.activation_dtype})",
    )
    p.add_argument(
        "--recompute",
        action=argparse.BooleanOptionalAction,
        default=d.recompute,
        help="recompute each linear's quantized weight in the backward pass instead of keeping "
        "it: the block trains in about half the memory (one block of weights plus one "
        "linear's temporaries, where autograd keeps about four blocks) for one more "
        f"quantizer pass per linear and step (default {'on' if d.recompute else 'off'})",
    )
    p.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        default="auto",
        help="compute precision during calibration: auto = float32 on CPU, bf16 autocast "
        "on CUDA (learned parameters stay float32)",
    )


FORMAT_HELP = f"output format (default fake): {formats_help()}"


EXPORT_FORMAT_HELP = f"packed format to write (default auto): {formats_help(packed_only=True)}"


def _add_gguf_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--gguf-embeddings",
        choices=FLOAT_TYPES,
        default="f16",
        help="with --format gguf: how the token embeddings are stored: f16 (default), f32, or "
        "q8_0 (re-quantized to 8 bits in blocks of 32; its error is reported)",
    )
    p.add_argument(
        "--gguf-output",
        choices=FLOAT_TYPES,
        default="f16",
        help="with --format gguf: how the output head (lm_head) is stored: f16 (default), f32, "
        "or q8_0 (faster decoding in llama.cpp; its error is reported). With tied embeddings and "
        "the same type as --gguf-embeddings, the head shares the embedding tensor",
    )
    p.add_argument(
        "--gguf-approximate",
        choices=APPROXIMATE_TYPES,
        default=None,
        help="with --format gguf: for a setting no GGUF type holds exactly (asymmetric 8 bits, "
        "groups not a multiple of 32), re-quantize the fake-quantized weights into this type per "
        "block of 32 and report the error (default: refuse such a setting). 2- and 3-bit grids "
        "need no approximation: they are written exactly, as 4-bit blocks (a file no smaller "
        "than at 4 bits)",
    )


GGUF_DEFAULTS = {"gguf_embeddings": "f16", "gguf_output": "f16", "gguf_approximate": None}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="omniquant",
        description="OmniQuant post-training quantization of Hugging Face decoder LMs.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser(
        "quantize",
        help="calibrate and write a quantized model folder",
        description="Quantize a causal LM block by block and write the result.",
    )
    _add_quant_flags(q)
    q.add_argument(
        "--output",
        required=True,
        help="folder to write (must not exist); the work lives in <output>.partial",
    )
    q.add_argument(
        "--resume", action="store_true", help="continue an interrupted run from <output>.partial"
    )
    q.add_argument("--format", choices=[*FORMATS, "auto"], default="fake", help=FORMAT_HELP)
    q.add_argument(
        "--stream",
        action="store_true",
        help="never load the whole model: read each block from the safetensors files when it "
        "is calibrated and write it to --output when done (fake format)",
    )
    q.add_argument(
        "--max-memory",
        default=None,
        help="memory the run may use, e.g. 24GB (default: the free memory minus a margin); "
        "activations beyond it spill to files in <output>.partial, and a budget too small "
        "for one block is refused before loading",
    )
    _add_gguf_flags(q)
    q.add_argument("--eval", action="store_true", help="print the perplexity of the result")
    _add_eval_data(q)
    _add_runtime(q)

    e = sub.add_parser(
        "eval",
        help="perplexity (or zero-shot accuracy) of a model",
        description="Perplexity per the austen-v1 protocol (or another text); with --tasks, "
        "zero-shot accuracy through lm-eval instead.",
    )
    e.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=MODEL_HELP)
    _add_eval_data(e)
    _add_zeroshot(e)
    e.add_argument(
        "--save",
        action="store_true",
        help="also write the result into <model folder>/eval.json (read by `omniquant report`)",
    )
    e.add_argument(
        "--kernels",
        action="store_true",
        help="measure the quantized model as it runs with the integer kernels (bf16 activations) "
        "instead of its fake-quantized float form (quantized folders only)",
    )
    e.add_argument(
        "--native",
        action="store_true",
        help="measure the model as omniquant's native decoder runs it on the CPU (one C++ call "
        "per 16 tokens through its KV cache; int16 activations; see generate --native); "
        "perplexity only, not with --kernels",
    )
    _add_head(e)
    _add_runtime(e)

    r = sub.add_parser(
        "report",
        help="combine run folders into one table and plot",
        description="Combine quantize run folders (their omniquant.json and eval.json) into a "
        "markdown table and a perplexity-versus-bits plot.",
    )
    r.add_argument("runs", nargs="+", type=Path, help="run folders written by `quantize`")
    r.add_argument(
        "--output",
        required=True,
        type=Path,
        help="folder to write report.md and the plot into (must not exist)",
    )
    _add_threads_quiet(r)

    x = sub.add_parser(
        "export",
        help="write a quantized model folder in a packed format",
        description="Write a folder from `omniquant quantize` as compressed-tensors (vLLM, "
        "transformers with the compressed-tensors package), omniquant-packed (every setting; "
        "omniquant.load) or gguf (llama.cpp). What a format cannot hold is refused with the "
        "reason.",
    )
    x.add_argument("input", type=Path, help="a folder written by `omniquant quantize`")
    x.add_argument("output", type=Path, help="folder to write (must not exist)")
    x.add_argument(
        "--format", choices=[*PACKED_FORMATS, "auto"], default="auto", help=EXPORT_FORMAT_HELP
    )
    _add_gguf_flags(x)
    _add_threads_quiet(x)

    g = sub.add_parser(
        "generate",
        help="generate text from a prompt, streaming tokens",
        description="Load a float, fake-quantized or packed model and generate from a prompt.",
    )
    g.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=MODEL_HELP)
    g.add_argument("--prompt", required=True, help="the prompt text")
    g.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    g.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="sampling temperature; 0 = greedy (default 0)",
    )
    g.add_argument(
        "--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template"
    )
    g.add_argument(
        "--kernels",
        action="store_true",
        help="run quantized linears through the int4/int8 kernels (quantized folders only)",
    )
    _add_head(g)
    g.add_argument(
        "--compile",
        action="store_true",
        help="decode through torch.compile with a static KV cache: tens of seconds to compile, "
        "then faster tokens (worth it for long generations)",
    )
    g.add_argument(
        "--native",
        action="store_true",
        help="decode on the CPU through omniquant's native decoder: every block and the head in "
        "one C++ call per token, 2-4-bit grids as they were learned, int16 activations (built with "
        "the machine's C++ compiler on first use, seconds). Llama, Mistral, Qwen2/3, Phi-3; not "
        "with --kernels or --compile",
    )
    g.add_argument("--seed", type=int, default=0, help="seed for sampling (default 0)")
    _add_runtime(g)

    demo = sub.add_parser(
        "demo",
        help="float / RTN / OmniQuant perplexity table on the default",
        description="Quantize the embedded SmolLM2 at W3A16g128 with RTN and OmniQuant (LWC + "
        "scale-aware weight training under the guard) and print float / RTN / OmniQuant "
        "perplexity on Emma and on an out-of-domain text (about 10 minutes on 2 threads). "
        "Demo defaults: "
        + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in DEMO_DEFAULTS.items()),
    )
    _add_quant_flags(demo, method=False)
    demo.set_defaults(method="omniquant")
    _add_eval_data(demo)
    demo.add_argument(
        "--ood-dataset",
        default="debian:policy",
        help="second perplexity text, of another domain (default debian:policy, the Debian "
        "Policy Manual; needs apt-get install debian-policy)",
    )
    demo.set_defaults(**DEMO_DEFAULTS)
    _add_runtime(demo)
    return parser
