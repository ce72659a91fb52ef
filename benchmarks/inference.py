"""Inference benchmark: size and speed of SmolLM2 float32, bf16 and packed W8A16 / W4A16g128 /
W3A16g128 (benchmarks/README.md#inference). Not a test.

Each variant runs in a fresh process (so that its peak resident memory is its own) with a fixed
thread count and reports:
  linear MB     bytes of what stands for the decoder blocks' linear weights (codes, scales and
                zero points for packed layers; lm_head and embeddings stay float and are excluded)
  peak RSS MB   the process's peak resident memory after loading and running (torch included)
  prefill tok/s one forward pass over 512 tokens (median of --repeats)
  decode tok/s  128 new tokens one at a time with the KV cache, batch 1 (median of --repeats)
The packed variants are round-to-nearest quantizations written as omniquant-packed and loaded
with `omniquant.load(path, kernels=True)`: speed and size do not depend on how the grid was
calibrated, so RTN stands in for OmniQuant here (same layout, same kernels). A packed variant
with the suffix "+f16head" (W4A16g128+f16head) keeps its output head in float16
(`omniquant.kernels.head`). The suffix "+native" (W4A16g128+f16head+native) decodes through the
native decoder (`omniquant.kernels.native`: one C++ call per token; the prompt is fed one token
at a time, so prefill is that many decode steps); "+native8" the same with int8 activations.

  python benchmarks/inference.py --threads 2 --repeats 3
  python benchmarks/inference.py --compile --variants W4A16g128,W4A16g128+f16head
  python benchmarks/inference.py --table
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).parent / "results" / "inference.jsonl"
VARIANTS = ["float32", "bfloat16", "W8A16", "W4A16g128", "W3A16g128"]
HALF_HEAD = "+f16head"  # suffix of a packed variant: its head in float16
NATIVE_BITS = {"+native": 16, "+native8": 8}  # its activations' integer bits
PACKED = {"W8A16": (8, None), "W4A16g128": (4, 128), "W3A16g128": (3, 128)}
PREFILL, DECODE = 512, 128


SHAPE_CONFIG = Path(__file__).parent / "smollm2-135m-config.json"


def random_model(shape: Path) -> torch.nn.Module:
    """A Llama-shaped model (the config at `shape`, SmolLM2-135M's by default) with random weights
    (speed and size do not depend on the values): for machines without the model files, such as
    a lent GPU machine, and for shapes larger than the embedded model."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(**json.loads(shape.read_text()))
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def packed_folder(cache: Path, variant: str, shape: Path | None) -> Path:
    """The RTN omniquant-packed folder of a variant (made once)."""
    import omniquant
    from omniquant.config import CalibConfig, OmniQuantConfig, WeightQuant

    name = f"smollm2-{variant}-rtn-packed" if shape is None else f"{shape.stem}-{variant}-random"
    folder = cache / name
    if folder.exists():
        return folder
    bits, group = PACKED[variant]
    calib = CalibConfig(method="rtn", nsamples=2, seqlen=64)  # RTN: the data is not used
    config = OmniQuantConfig(WeightQuant(bits, group), calib=calib)
    if shape is None:
        omniquant.quantize(
            "smollm2", config, output=folder, format="omniquant-packed", progress=False
        )
        return folder
    from omniquant.block_loop import calibrate_blocks
    from omniquant.capture import capture_block_inputs
    from omniquant.formats.packed import write_packed
    from omniquant.models import decoder_layers, get_architecture
    from omniquant.runtime import runtime_for

    model = random_model(shape)
    blocks = decoder_layers(model, get_architecture(model))
    ids = torch.randint(3, 1000, (2, 64))
    captured = capture_block_inputs(model, blocks, list(ids.split(1)), "cpu")
    calibrate_blocks(blocks, captured, config.weight, config.calib, runtime_for("cpu"))
    write_packed(model, None, {"config": config.to_dict()}, folder)
    return folder


def linear_bytes(model: torch.nn.Module) -> int:
    """Bytes standing for the decoder blocks' linear weights."""
    from omniquant.kernels.linear import QuantLinear

    total = 0
    for name, m in model.named_modules():
        if ".layers." not in f".{name}.":
            continue
        if isinstance(m, QuantLinear):
            total += m.weight_bytes()
        elif isinstance(m, torch.nn.Linear):
            total += m.weight.numel() * m.weight.element_size()
    return total


def file_sizes(cache: Path, variants: list[str], shape: Path | None) -> dict[str, float]:
    """MiB of the weights file behind each variant: the float32 source, the packed folders."""
    from omniquant.model_io import resolve_model_path

    sizes = {}
    for variant in variants:
        if variant in PACKED:
            folder = packed_folder(cache, variant, shape)
        elif variant == "float32" and shape is None:
            folder = Path(resolve_model_path("smollm2"))
        else:
            continue
        sizes[variant] = sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**20
    return sizes


def base_variant(variant: str) -> tuple[str, str]:
    """("W4A16g128", "float16") for "W4A16g128+f16head" (a packed variant whose output head is
    kept in float16, `omniquant.kernels.head`); (variant, "float32") otherwise."""
    if variant.endswith(HALF_HEAD):
        return variant[: -len(HALF_HEAD)], "float16"
    return variant, "float32"


def load_variant(variant: str, cache: Path, device: str, shape: Path | None) -> torch.nn.Module:
    import omniquant
    from omniquant.model_io import load_model

    variant, head = base_variant(variant)
    if variant in PACKED:
        folder = packed_folder(cache, variant, shape)
        return omniquant.load(folder, kernels=True, device=device, head=head)[0]
    model = random_model(shape) if shape is not None else load_model("smollm2")[0]
    return model.to(device, getattr(torch, variant))


def prompt_path(cache: Path, shape: Path | None) -> Path:
    return cache / ("prompt.pt" if shape is None else "prompt-random.pt")


def write_prompt(cache: Path, shape: Path | None) -> Path:
    """The first 512 tokens of Emma, made in the parent: reading the corpus would dominate the
    measured process's peak memory."""
    from omniquant.data import load_text, tokenize_text
    from omniquant.model_io import load_model

    path = prompt_path(cache, shape)
    if shape is not None:
        torch.save(torch.randint(3, 1000, (1, PREFILL)), path)
    elif not path.exists():
        _, tokenizer = load_model("smollm2")
        tokens = tokenize_text(tokenizer, load_text("austen:emma"))
        torch.save(tokens[:PREFILL].unsqueeze(0).clone(), path)
    return path


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM). Not getrusage's ru_maxrss: Linux carries that
    across execve, so a child started by a big parent would report the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def time_prefill(model: torch.nn.Module, ids: torch.Tensor) -> float:
    _sync(ids.device)
    t0 = time.perf_counter()
    model(ids, use_cache=False)
    _sync(ids.device)
    return time.perf_counter() - t0


@torch.no_grad()
def time_decode(
    model: torch.nn.Module,
    ids: torch.Tensor,
    new: int,
    cache: Any = None,
    step: Callable[..., Any] | None = None,
) -> float:
    """Seconds for `new` greedy steps of one token each, after an eager prefill of `ids` into
    `cache` (a fresh DynamicCache by default; a given one is reset); `step` runs each step (the
    model itself by default, or its compiled forward)."""
    from transformers import DynamicCache

    if cache is None:
        cache = DynamicCache()
    else:
        cache.reset()
    step = model if step is None else step
    out = model(ids, past_key_values=cache, use_cache=True)
    nxt = out.logits[:, -1:].argmax(-1)
    _sync(ids.device)
    t0 = time.perf_counter()
    for i in range(new):
        pos = torch.tensor([ids.shape[1] + i], device=ids.device)
        out = step(nxt, past_key_values=cache, use_cache=True, cache_position=pos)
        nxt = out.logits[:, -1:].argmax(-1)
    _sync(ids.device)
    return time.perf_counter() - t0


def compiled_decoding(model: torch.nn.Module, length: int) -> tuple[Any, Callable[..., Any]]:
    """(static KV cache, compiled forward) for `time_decode`: torch.compile (CUDA graphs on
    CUDA) takes away the eager model's per-token Python and launch overhead; the kernels stay."""
    from transformers import StaticCache

    device = next(model.parameters()).device
    mode = "reduce-overhead" if device.type == "cuda" else "default"
    cache = StaticCache(config=model.config, max_cache_len=length)
    return cache, torch.compile(model.forward, dynamic=False, mode=mode)


def native_of(variant: str) -> str | None:
    """The variant without its "+native"/"+native8" suffix, or None when it has none."""
    stem, _, suffix = variant.rpartition("+")
    return stem if stem and "+" + suffix in NATIVE_BITS else None


def measure_native(a: argparse.Namespace, variant: str) -> dict[str, object]:
    """A "+native" variant: the packed folder's codes straight into the native decoder
    (`omniquant.load_native`: no float copy of the blocks)."""
    import omniquant

    stem, _, suffix = variant.rpartition("+")
    base, head = base_variant(stem)
    bits = NATIVE_BITS["+" + suffix]
    folder = packed_folder(a.cache, base, a.shape)
    decoder, _ = omniquant.load_native(folder, head=head, threads=a.threads, activations=bits)
    ids = torch.load(prompt_path(a.cache, a.shape))[0].tolist()
    decoder.tokens(ids[:32], 4)  # warm-up (builds the caches)

    def prefill() -> float:
        decoder.reset()
        t0 = time.perf_counter()
        decoder.prefill(ids[:PREFILL])
        return time.perf_counter() - t0

    def decode() -> float:
        decoder.reset()
        logits = decoder.prefill(ids[:32])
        t0 = time.perf_counter()
        for _ in range(DECODE):
            logits = decoder.step(int(logits.argmax()))
        return time.perf_counter() - t0

    prefills = [prefill() for _ in range(a.repeats)]
    decodes = [decode() for _ in range(a.repeats)]
    return {
        "variant": variant,
        "compile_s": None,
        "threads": a.threads,
        "repeats": a.repeats,
        "linear_mb": decoder.linear_bytes / 2**20,
        "peak_rss_mb": peak_rss_mb(),
        "rss_source": "VmHWM",
        "prefill_tok_s": PREFILL / statistics.median(prefills),
        "decode_tok_s": DECODE / statistics.median(decodes),
        "peak_device_mb": None,
        "device": "cpu",
        "random_weights": a.shape is not None,
        "shape": None if a.shape is None else a.shape.stem,
        "torch": torch.__version__,
    }


def measure(a: argparse.Namespace, variant: str) -> dict[str, object]:
    """One variant, in this process."""
    if native_of(variant) is not None:
        return measure_native(a, variant)
    torch.set_num_threads(a.threads)
    repeats = a.repeats
    model = load_variant(variant, a.cache, a.device, a.shape)
    model.eval()
    ids = torch.load(prompt_path(a.cache, a.shape)).to(a.device)
    time_prefill(model, ids[:, :64])  # warm-up
    if a.memory_only:  # the same work, shorter: peak memory does not depend on the timings
        time_prefill(model, ids)
        time_decode(model, ids[:, :32], 8)
        return {
            "variant": variant,
            "memory_only": True,
            "peak_rss_mb": peak_rss_mb(),
            "rss_source": "VmHWM",
            "linear_mb": linear_bytes(model) / 2**20,
        }
    prefill = [time_prefill(model, ids) for _ in range(repeats)]
    compile_s = None
    if a.compile:
        cache, step = compiled_decoding(model, 32 + DECODE)
        t0 = time.perf_counter()
        time_decode(model, ids[:, :32], 4, cache, step)  # compiles
        compile_s = time.perf_counter() - t0
        decode = [time_decode(model, ids[:, :32], DECODE, cache, step) for _ in range(repeats)]
    else:
        decode = [time_decode(model, ids[:, :32], DECODE) for _ in range(repeats)]
    return {
        "variant": variant + ("+compile" if a.compile else ""),
        "compile_s": compile_s,
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "linear_mb": linear_bytes(model) / 2**20,
        "peak_rss_mb": peak_rss_mb(),
        "rss_source": "VmHWM",
        "prefill_tok_s": PREFILL / statistics.median(prefill),
        "decode_tok_s": DECODE / statistics.median(decode),
        "peak_device_mb": (
            torch.cuda.max_memory_allocated() / 2**20 if a.device == "cuda" else None
        ),
        "device": torch.cuda.get_device_name(0) if a.device == "cuda" else "cpu",
        "random_weights": a.shape is not None,
        "shape": None if a.shape is None else a.shape.stem,
        "torch": torch.__version__,
    }


def _memory_of(r: dict | None) -> dict:
    return {"peak_rss_mb": r["peak_rss_mb"], "rss_source": r["rss_source"]} if r else {}


def _rss(r: dict) -> str:
    """Rows measured before the VmHWM fix carry the parent's peak: not shown."""
    return f"{r['peak_rss_mb']:.0f}" if r.get("rss_source") == "VmHWM" else "—"


def table(path: Path) -> str:
    every = [json.loads(line) for line in path.read_text().splitlines()]
    memory = {r["variant"]: r for r in every if r.get("memory_only")}
    speed = [r for r in every if not r.get("memory_only")]
    rows = [{**r, **_memory_of(memory.get(r["variant"]))} for r in speed]
    by_name = {r["variant"]: r for r in rows}
    lines = [
        "| model | linear MB | × float32 | peak RSS MB | prefill tok/s (512) "
        "| decode tok/s (128) | decode × float32 | threads |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        base = by_name.get("float32+compile" if r["variant"].endswith("+compile") else "float32")
        size = r["linear_mb"] / base["linear_mb"] if base else float("nan")
        speed = r["decode_tok_s"] / base["decode_tok_s"] if base else float("nan")
        lines.append(
            f"| {r['variant']} | {r['linear_mb']:.1f} | {size:.3f} | {_rss(r)} "
            f"| {r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.1f} | {speed:.2f} "
            f"| {r['threads']} |"
        )
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "omniquant" / "bench")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--table", action="store_true", help="print the table of --results and exit")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument(
        "--random-weights",
        action="store_true",
        help="SmolLM2's shape with random weights (no model files needed, e.g. on a GPU machine)",
    )
    p.add_argument(
        "--shape",
        type=Path,
        help="random weights in the shape of this Llama config.json instead (implies "
        "--random-weights), e.g. benchmarks/llama-3.1-8b-config.json",
    )
    p.add_argument(
        "--memory-only",
        action="store_true",
        help="only peak resident memory (prefill + 8 decode steps per variant), as separate rows",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="decode through torch.compile with a static cache (CUDA graphs on CUDA); "
        "rows are named VARIANT+compile and compared with float32+compile",
    )
    p.add_argument(
        "--sizes",
        action="store_true",
        help="print the model.safetensors size of float32 and each packed variant and exit",
    )
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args()
    a.shape = a.shape or (SHAPE_CONFIG if a.random_weights else None)
    if a.table:
        print(table(a.results))
        return 0
    if a.child:
        print(json.dumps(measure(a, a.child)))
        return 0
    a.cache.mkdir(parents=True, exist_ok=True)
    if a.sizes:
        for variant, mib in file_sizes(a.cache, a.variants.split(","), a.shape).items():
            print(f"{variant}: model.safetensors {mib:.1f} MiB")
        return 0
    write_prompt(a.cache, a.shape)
    for variant in a.variants.split(","):
        base = base_variant(native_of(variant) or variant)[0]
        if base in PACKED:  # quantized outside the measured process
            packed_folder(a.cache, base, a.shape)
    a.results.parent.mkdir(parents=True, exist_ok=True)
    for variant in a.variants.split(","):
        cmd = [sys.executable, __file__, "--child", variant, "--threads", str(a.threads)]
        cmd += ["--repeats", str(a.repeats), "--cache", str(a.cache), "--device", a.device]
        cmd += ["--shape", str(a.shape)] if a.shape is not None else []
        cmd += ["--memory-only"] if a.memory_only else []
        cmd += ["--compile"] if a.compile else []
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        row = json.loads(out.strip().splitlines()[-1])
        print(json.dumps(row))
        with a.results.open("a") as f:
            f.write(json.dumps(row) + "\n")
    print(table(a.results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
