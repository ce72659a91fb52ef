"""GGUF benchmark: our GGUF exports against llama.cpp's own quantizations, run by llama.cpp.
Not a test (it builds llama.cpp: many minutes on 2 cores).

1. llama.cpp from the source that the `llama-cpp-python` sdist bundles (`pip download
   --no-binary :all: --no-deps llama-cpp-python` into --cache), built with cmake (Release,
   GGML_NATIVE) for the four tools used: llama-perplexity, llama-bench, llama-quantize,
   llama-imatrix.
2. The float model (the embedded SmolLM2, float32) written as an f32 GGUF by our writer, then
   quantized by llama-quantize to each --llama-types type (embeddings and output kept f16, as
   ours), with and without an importance matrix computed by llama-imatrix from the calibration
   text (austen-v1: Pride and Prejudice).
3. Each --ours folder (written by `omniquant quantize`, fake format) exported with
   `--format gguf`.
4. For every file: bits per weight (all tensors), perplexity by the austen-v1 protocol through
   transformers (which dequantizes the file with the `gguf` package; Emma, 80 x 512), perplexity
   by llama-perplexity on the same text (-c 512, its own windows), and llama-bench prefill
   (-p 512) and decode (-n 128) tokens per second. One table; JSON lines in --results.

Caveat printed with the table: austen-v1's float model was itself dequantized from a Q4_1 GGUF, so
any 4-bit grid with groups of 32 (llama.cpp's Q4_0/Q4_1) is lossless on it; compare at g64/g128
and per-channel.

  python benchmarks/gguf.py --ours W4A16g128=out/w4g128 --threads 2
  python benchmarks/gguf.py --table
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# this script is named like the `gguf` package: keep its folder off the import path, or
# `import gguf` (in omniquant and transformers) would import this file
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
RESULTS_DIR = Path(__file__).parent / "results"
RESULTS = RESULTS_DIR / "gguf.jsonl"
TOOLS = ("llama-perplexity", "llama-bench", "llama-quantize", "llama-imatrix", "llama-tokenize")
CAVEAT = (
    "austen-v1's float model was dequantized from a Q4_1 GGUF: 4-bit groups of 32 (llama.cpp's "
    "Q4_0/Q4_1) are lossless on it for any method; compare at g64/g128 and per-channel."
)


def append_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    """JSON lines, each row stamped with the CPU and the date."""
    stamp = {"cpu": cpu_name(), "date": time.strftime("%Y-%m-%d %H:%M")}
    with path.open("a") as f:
        for row in rows:
            f.write(json.dumps({**row, **stamp}) + "\n")


def run(cmd: list[str], log: Path | None = None, nice: bool = True) -> str:
    """Run a command (niced), returning stdout; its output goes to `log` too."""
    full = ["nice", "-n", "10", *cmd] if nice else cmd
    print("$", " ".join(cmd), flush=True)
    proc = subprocess.run(full, capture_output=True, text=True)
    if log is not None:
        log.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        sys.exit(f"{cmd[0]} failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")
    return proc.stdout + proc.stderr


def llama_source(cache: Path) -> Path:
    """The llama.cpp source inside the llama-cpp-python sdist (downloaded once)."""
    sdists = sorted(cache.glob("llama_cpp_python-*.tar.gz"))
    if not sdists:
        run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-binary",
                ":all:",
                "--no-deps",
                "llama-cpp-python",
                "-d",
                str(cache),
            ],
            nice=False,
        )
        sdists = sorted(cache.glob("llama_cpp_python-*.tar.gz"))
    sdist = sdists[-1]
    folder = cache / sdist.name.removesuffix(".tar.gz")
    if not folder.is_dir():
        shutil.unpack_archive(sdist, cache)
    return folder / "vendor" / "llama.cpp"


def build_tools(cache: Path, jobs: int) -> Path:
    """Build the four tools (once); returns the folder holding them."""
    src = llama_source(cache)
    build = cache / "build"
    bin_dir = build / "bin"
    if all((bin_dir / t).exists() for t in TOOLS):
        return bin_dir
    flags = [
        "-DCMAKE_BUILD_TYPE=Release",
        "-DGGML_NATIVE=ON",
        "-DLLAMA_CURL=OFF",
        "-DLLAMA_OPENSSL=OFF",
        "-DLLAMA_BUILD_TESTS=OFF",
        "-DLLAMA_BUILD_EXAMPLES=OFF",
        "-DLLAMA_BUILD_SERVER=OFF",
    ]
    run(["cmake", "-S", str(src), "-B", str(build), *flags], cache / "cmake.log")
    run(
        ["cmake", "--build", str(build), f"-j{jobs}", "--target", *TOOLS],
        cache / "build.log",
    )
    return bin_dir


def text_file(work: Path, dataset: str) -> Path:
    """A dataset of omniquant.data as a plain text file."""
    from omniquant.data import load_text

    path = work / (dataset.replace(":", "-") + ".txt")
    if not path.exists():
        path.write_text(load_text(dataset))
    return path


def float_gguf(work: Path) -> Path:
    """The embedded SmolLM2 (float32) as an f32 GGUF, by our writer."""
    import omniquant
    from omniquant.formats.gguf.writer import write_float_gguf

    path = work / "float-f32.gguf"
    if not path.exists():
        model, tokenizer = omniquant.load(None)
        write_float_gguf(model, tokenizer, path, "f32")
    return path


def llama_quantized(
    bins: Path, work: Path, source: Path, kind: str, imatrix: Path | None, threads: int
) -> Path:
    """llama-quantize's `kind` of the float file, embeddings and output kept f16 (as ours)."""
    tag = "-imatrix" if imatrix else ""
    path = work / f"llama-{kind}{tag}.gguf"
    if path.exists():
        return path
    cmd = [str(bins / "llama-quantize")]
    if imatrix is not None:
        cmd += ["--imatrix", str(imatrix)]
    cmd += ["--token-embedding-type", "f16", "--output-tensor-type", "f16"]
    run([*cmd, str(source), str(path), kind, str(threads)], work / f"{path.stem}.log")
    return path


def importance_matrix(bins: Path, work: Path, source: Path, calib: Path, threads: int) -> Path:
    """llama-imatrix on the calibration text (16 chunks of 512, as our calibration windows)."""
    path = work / "imatrix.gguf"
    if not path.exists():
        cmd = [str(bins / "llama-imatrix"), "-m", str(source), "-f", str(calib), "-o", str(path)]
        cmd += ["-c", "512", "--chunks", "16", "-t", str(threads)]
        run(cmd, work / "imatrix.log")
    return path


def our_gguf(work: Path, label: str, folder: Path, output: str) -> tuple[Path, float]:
    """Export a quantize folder as GGUF; returns the file and the fake-quantized perplexity."""
    import omniquant
    from omniquant.formats.gguf.writer import GGUF_FILE, GgufOptions

    out = work / f"ours-{label}-out{output}"
    if not out.exists():
        omniquant.export(folder, out, "gguf", gguf=GgufOptions(output=output))
    return out / GGUF_FILE, omniquant.evaluate(folder, progress=False)


def bits_per_weight(path: Path) -> float:
    """Stored bits per weight over every tensor of a GGUF file."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    bits = sum(int(t.n_bytes) * 8 for t in reader.tensors)
    return bits / sum(int(t.n_elements) for t in reader.tensors)


def transformers_perplexity(path: Path, tokenizer: Any) -> float:
    """austen-v1 perplexity of the file as transformers dequantizes it."""
    import torch
    from transformers import AutoModelForCausalLM

    import omniquant

    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )
    return omniquant.evaluate(model.eval(), tokenizer=tokenizer, progress=False)


def llama_perplexity(bins: Path, path: Path, text: Path, threads: int) -> float:
    cmd = [str(bins / "llama-perplexity"), "-m", str(path), "-f", str(text), "-c", "512"]
    out = run([*cmd, "--chunks", "80", "-t", str(threads), "-b", "512"])
    match = re.search(r"Final estimate: PPL = ([0-9.]+)", out)
    if match is None:
        sys.exit(f"no perplexity in llama-perplexity's output:\n{out[-2000:]}")
    return float(match.group(1))


def llama_bench(bins: Path, path: Path, threads: int, repeats: int) -> tuple[float, float]:
    """(prefill, decode) tokens per second: llama-bench -p 512 -n 128."""
    cmd = [str(bins / "llama-bench"), "-m", str(path), "-p", "512", "-n", "128"]
    out = run([*cmd, "-t", str(threads), "-r", str(repeats), "-o", "json"])
    rows = json.loads(out[out.index("[") : out.rindex("]") + 1])
    prefill = next(r["avg_ts"] for r in rows if r["n_prompt"] == 512 and r["n_gen"] == 0)
    decode = next(r["avg_ts"] for r in rows if r["n_gen"] == 128 and r["n_prompt"] == 0)
    return float(prefill), float(decode)


def speed_rounds(
    bins: Path, files: dict[str, Path], rounds: int, threads: int, repeats: int
) -> list[dict[str, Any]]:
    """llama-bench over every file, `rounds` times in rotating order (so drift of the machine's
    speed falls on all files alike); one row per file with the median and every value."""
    import statistics

    seen: dict[str, list[tuple[float, float]]] = {label: [] for label in files}
    labels = list(files)
    for r in range(rounds):
        for label in labels[r % len(labels) :] + labels[: r % len(labels)]:
            seen[label].append(llama_bench(bins, files[label], threads, repeats))
            print(f"round {r + 1} {label}: prefill/decode {seen[label][-1]}", flush=True)
    return [
        {
            "variant": label,
            "file": str(files[label]),
            "prefill_tok_s": round(statistics.median(p for p, _ in values), 1),
            "decode_tok_s": round(statistics.median(d for _, d in values), 1),
            "decode_all": [round(d, 1) for _, d in values],
            "prefill_all": [round(p, 1) for p, _ in values],
            "rounds": rounds,
            "llama_bench_repeats": repeats,
            "threads": threads,
        }
        for label, values in seen.items()
    ]


def check_families(bins: Path, work: Path) -> list[dict[str, Any]]:
    """llama.cpp loads and runs a tiny W4A16g64 GGUF of every family we write (random weights,
    a tiny byte-level BPE tokenizer): llama-perplexity over a short text must finish and print
    a perplexity (the metadata, tensor names and shapes are what llama.cpp expects)."""
    from omniquant.config import WeightQuant
    from omniquant.formats.gguf.writer import GGUF_FILE, write_gguf
    from tests.formats.test_gguf import TEXT, byte_bpe_tokenizer, gguf_tiny_model, rtn

    text = work / "tiny.txt"
    text.write_text(TEXT * 8)
    rows = []
    for family in ("llama", "mistral", "qwen2", "qwen3", "gemma3", "phi3"):
        folder = work / f"tiny-{family}"
        folder.mkdir(exist_ok=True)
        tokenizer = byte_bpe_tokenizer()
        model = gguf_tiny_model(family, len(tokenizer))
        config = rtn(model, WeightQuant(4, 64))
        path = folder / GGUF_FILE
        path.unlink(missing_ok=True)
        write_gguf(model, tokenizer, config, path)
        cmd = [str(bins / "llama-perplexity"), "-m", str(path), "-f", str(text), "-c", "64"]
        out = run([*cmd, "-b", "64", "-t", "1"], work / f"tiny-{family}.log")
        match = re.search(r"Final estimate: PPL = ([0-9.]+)", out)
        rows.append(
            {"family": family, "llama_perplexity": float(match.group(1)) if match else None}
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


TOKENIZER_CASES = [
    ("llama", "byte-level"),
    ("llama", "prepend"),
    ("mistral", "metaspace"),
    ("phi3", "prepend"),
    ("gemma3", "no-prefix"),
]


def check_tokenizers(bins: Path, work: Path) -> list[dict[str, Any]]:
    """llama-tokenize on a tiny GGUF of each tokenizer kind we write (byte-level BPE, and
    SentencePiece style with each way of spelling spaces) gives the ids transformers' tokenizer
    gives, on text with repeated spaces, tabs, newlines and characters outside the vocabulary
    (byte fallback)."""
    from omniquant.config import WeightQuant
    from omniquant.formats.gguf.writer import GGUF_FILE, write_gguf
    from tests.formats.test_gguf import (
        SAMPLES,
        TEXT,
        byte_bpe_tokenizer,
        gguf_tiny_model,
        rtn,
        sentencepiece_tokenizer,
    )

    rows = []
    for family, style in TOKENIZER_CASES:
        folder = work / f"tok-{family}-{style}"
        folder.mkdir(exist_ok=True)
        tokenizer = (
            byte_bpe_tokenizer() if style == "byte-level" else sentencepiece_tokenizer(style)
        )
        model = gguf_tiny_model(family, len(tokenizer))
        path = folder / GGUF_FILE
        path.unlink(missing_ok=True)
        write_gguf(model, tokenizer, rtn(model, WeightQuant(4, 32)), path)
        same = 0
        texts = [TEXT[:90], *SAMPLES]
        for text in texts:
            cmd = [str(bins / "llama-tokenize"), "-m", str(path), "-p", text, "--ids"]
            out = run([*cmd, "--log-disable"], nice=False)
            ids = json.loads(out.strip().splitlines()[-1])
            want = tokenizer(text)["input_ids"]
            same += ids == want
            if ids != want:
                print(f"  {family}/{style} {text!r}: llama.cpp {ids} transformers {want}")
        rows.append({"family": family, "tokenizer": style, "texts": len(texts), "same_ids": same})
        print(json.dumps(rows[-1]), flush=True)
    return rows


ROPE_CASES: dict[str, dict[str, Any]] = {
    "none": {},
    "linear": {"rope_type": "linear", "factor": 2.0},
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 256,
    },
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256},
}


def llama_cpp_protocol_perplexity(
    model: Any, ids: list[int], n_ctx: int, chunks: int, bos: int | None
) -> float:
    """llama-perplexity's protocol in transformers: windows of n_ctx tokens (the first replaced
    by BOS when the vocabulary adds one), each scoring its second half."""
    import torch

    first = n_ctx // 2
    nll, count = 0.0, 0
    for i in range(chunks):
        window = list(ids[i * n_ctx : (i + 1) * n_ctx])
        if bos is not None:
            window[0] = bos
        with torch.no_grad():
            logits = model(torch.tensor([window])).logits[0].double()
        logp = torch.log_softmax(logits[first : n_ctx - 1], dim=-1)
        target = torch.tensor(window[first + 1 : n_ctx])
        nll -= float(logp.gather(1, target[:, None]).sum())
        count += n_ctx - 1 - first
    return math.exp(nll / count)


def _rope_row(
    bins: Path,
    path: Path,
    model: Any,
    tokenizer: Any,
    text: Path,
    n_ctx: int,
    chunks: int,
    threads: int,
) -> dict[str, Any]:
    """transformers (llama-perplexity's protocol) and llama-perplexity on one model."""
    from omniquant.formats.gguf.writer import write_float_gguf

    write_float_gguf(model, tokenizer, path, "f32")
    ids = tokenizer(text.read_text())["input_ids"]
    bos = tokenizer.bos_token_id if ids[:1] == [tokenizer.bos_token_id] else None
    ours = llama_cpp_protocol_perplexity(model, ids, n_ctx, chunks, bos)
    cmd = [str(bins / "llama-perplexity"), "-m", str(path), "-f", str(text), "-c", str(n_ctx)]
    out = run([*cmd, "--chunks", str(chunks), "-b", str(n_ctx), "-t", str(threads)])
    match = re.search(r"Final estimate: PPL = ([0-9.]+)", out)
    path.unlink()
    return {
        "chunks": chunks,
        "n_ctx": n_ctx,
        "ppl_transformers": round(ours, 4),
        "ppl_llama_cpp": float(match.group(1)) if match else None,
    }


def check_rope(
    bins: Path, work: Path, text: Path, chunks: int, threads: int
) -> list[dict[str, Any]]:
    """The embedded SmolLM2 (float32) given each RoPE scaling in its config, written as an f32
    GGUF: llama-perplexity on Emma must give what transformers gives for the same model under
    llama-perplexity's protocol (and the scalings must move it: they are in effect). Phi-3's
    longrope on a tiny random Phi-3 (windows longer than its original context: the long
    factors and the attention factor)."""
    import torch
    from transformers import AutoModelForCausalLM

    import omniquant
    from tests.formats.test_gguf import TEXT, byte_bpe_tokenizer, gguf_tiny_model

    base, tokenizer = omniquant.load(None)
    rows = []
    for name, scaling in ROPE_CASES.items():
        config = copy.deepcopy(base.config)
        theta = base.config.rope_parameters.get("rope_theta", 10000.0)
        config.rope_parameters = {"rope_type": "default", "rope_theta": theta, **scaling}
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(base.state_dict())
        row = _rope_row(
            bins, work / f"rope-{name}.gguf", model.eval(), tokenizer, text, 512, chunks, threads
        )
        rows.append({"model": "SmolLM2-135M", "rope": name, **row})
        print(json.dumps(rows[-1]), flush=True)
    tiny_text = work / "tiny-rope.txt"
    tiny_text.write_text(TEXT * 20)
    small = byte_bpe_tokenizer()
    gen = torch.Generator().manual_seed(0)
    for name in ("none", "longrope"):
        tiny = gguf_tiny_model("phi3", len(small))
        tiny.config.max_position_embeddings = 256
        tiny.config.original_max_position_embeddings = 32
        if name == "longrope":
            factors = {
                k: (1 + 3 * torch.rand(8, generator=gen)).tolist()
                for k in ("short_factor", "long_factor")
            }
            tiny.config.rope_parameters = {
                "rope_type": "longrope",
                "rope_theta": 10000.0,
                **factors,
            }
        model = AutoModelForCausalLM.from_config(tiny.config, dtype=torch.float32)
        model.load_state_dict(tiny.state_dict())
        with torch.no_grad():  # sharper logits: the perplexity then shows the positions
            model.lm_head.weight.mul_(2.0)
        row = _rope_row(
            bins, work / f"rope-phi3-{name}.gguf", model.eval(), small, tiny_text, 64, 8, threads
        )
        rows.append({"model": "tiny Phi-3 (random)", "rope": name, **row})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return re.search(r"Model name:\s*(.+)", out).group(1).strip()  # type: ignore[union-attr]
    except (OSError, AttributeError):
        return platform.processor()


def measure(
    label: str, path: Path, bins: Path, emma: Path, tokenizer: Any, a: argparse.Namespace
) -> dict[str, Any]:
    t0 = time.perf_counter()
    prefill, decode = llama_bench(bins, path, a.threads, a.repeats)
    row = {
        "variant": label,
        "file": path.name,
        "bits_per_weight": round(bits_per_weight(path), 3),
        "ppl_transformers": round(transformers_perplexity(path, tokenizer), 4),
        "ppl_llama_cpp": llama_perplexity(bins, path, emma, a.threads),
        "prefill_tok_s": round(prefill, 1),
        "decode_tok_s": round(decode, 1),
        "threads": a.threads,
        "cpu": cpu_name(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    print(json.dumps(row), f"({time.perf_counter() - t0:.0f} s)", flush=True)
    return row


def _cell(value: Any, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def print_table(rows: list[dict[str, Any]]) -> None:
    head = "| variant | bits/weight | ppl (austen-v1, transformers) | ppl (llama-perplexity) "
    print(head + "| fake-quant ppl | prefill tok/s | decode tok/s | threads |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['variant']} | {_cell(r.get('bits_per_weight'), '.3f')} | "
            f"{_cell(r.get('ppl_transformers'), '.4f')} | {_cell(r.get('ppl_llama_cpp'), '.4f')} | "
            f"{_cell(r.get('ppl_fake_quant'), '.4f')} | {_cell(r.get('prefill_tok_s'), '.1f')} | "
            f"{_cell(r.get('decode_tok_s'), '.1f')} | {r.get('threads', '—')} |"
        )
    if rows:
        print(f"\nCPU: {rows[-1].get('cpu')}. {CAVEAT}")


def transformers_only(a: argparse.Namespace) -> list[dict[str, Any]]:
    """Without llama.cpp: each --ours folder's GGUF perplexity through transformers against its
    fake-quantized perplexity (and the float file's), one row each."""
    import omniquant

    _, tokenizer = omniquant.load(None)
    rows = []
    variants = [] if a.no_float else [("float32 (ours, f32)", float_gguf(a.work), None)]
    for spec in a.ours:
        label, _, folder = spec.partition("=")
        for output in a.ours_output.split(","):
            path, fake = our_gguf(a.work, label, Path(folder), output)
            variants.append((f"{label} (output {output})", path, fake))
    for label, path, fake in variants:
        row = {
            "variant": label,
            "file": path.name,
            "bits_per_weight": round(bits_per_weight(path), 3),
            "ppl_transformers": round(transformers_perplexity(path, tokenizer), 4),
            "ppl_fake_quant": None if fake is None else round(fake, 4),
            "threads": a.threads,
            "cpu": cpu_name(),
            "date": time.strftime("%Y-%m-%d %H:%M"),
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
        with a.results.open("a") as f:
            f.write(json.dumps(row) + "\n")
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--cache",
        type=Path,
        default=Path.home() / ".cache" / "omniquant" / "gguf-bench",
        help="where the sdist and the llama.cpp build live",
    )
    p.add_argument("--work", type=Path, default=Path("/tmp/omniquant-gguf-bench"))
    p.add_argument(
        "--ours",
        action="append",
        default=[],
        metavar="LABEL=FOLDER",
        help="a folder written by `omniquant quantize` (fake format), exported to GGUF",
    )
    p.add_argument(
        "--ours-output",
        default="f16",
        help="comma-separated --gguf-output types to export ours with (default f16)",
    )
    p.add_argument("--llama-types", default="Q4_1,Q4_0", help="llama-quantize types, comma-sep.")
    p.add_argument("--no-imatrix", action="store_true", help="skip the importance-matrix runs")
    p.add_argument(
        "--check-tokenizers",
        action="store_true",
        help="only compare llama-tokenize's ids with transformers' on tiny GGUFs of each "
        "tokenizer kind",
    )
    p.add_argument(
        "--check-rope",
        action="store_true",
        help="only compare llama-perplexity with transformers (same protocol) on the float model "
        "under each RoPE scaling we write",
    )
    p.add_argument(
        "--speed",
        action="append",
        default=[],
        metavar="LABEL=FILE",
        help="only llama-bench these GGUF files, --rounds times in rotating order "
        "(results/gguf_speed.jsonl)",
    )
    p.add_argument("--rounds", type=int, default=3, help="--speed rounds")
    p.add_argument("--rope-chunks", type=int, default=8, help="--check-rope windows of 512")
    p.add_argument(
        "--imatrix-only",
        action="store_true",
        help="only the importance-matrix rows of --llama-types (the plain ones measured before)",
    )
    p.add_argument("--no-float", action="store_true", help="skip the float row")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5, help="llama-bench -r (default 5)")
    p.add_argument("--jobs", type=int, default=2, help="build jobs (default 2)")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--table", action="store_true", help="print the table of --results and stop")
    p.add_argument(
        "--transformers-only",
        action="store_true",
        help="no llama.cpp: the GGUF files' perplexity through transformers (vs fake-quantized)",
    )
    p.add_argument(
        "--check-families",
        action="store_true",
        help="only load and run a tiny GGUF of every family in llama-perplexity, then stop",
    )
    a = p.parse_args()
    if a.table:
        rows = [json.loads(x) for x in a.results.read_text().splitlines() if x.strip()]
        print_table(rows)
        return 0
    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))
    import torch

    import omniquant

    torch.set_num_threads(a.threads)
    a.cache.mkdir(parents=True, exist_ok=True)
    a.work.mkdir(parents=True, exist_ok=True)
    a.results.parent.mkdir(parents=True, exist_ok=True)
    if a.transformers_only:
        print_table(transformers_only(a))
        return 0
    bins = build_tools(a.cache, a.jobs)
    if a.check_families:
        check_families(bins, a.work)
        return 0
    if a.speed:
        files = {k: Path(v) for k, _, v in (spec.partition("=") for spec in a.speed)}
        rows = speed_rounds(bins, files, a.rounds, a.threads, a.repeats)
        append_rows(RESULTS_DIR / "gguf_speed.jsonl", rows)
        for row in rows:
            print(json.dumps(row))
        return 0
    if a.check_tokenizers:
        rows = check_tokenizers(bins, a.work)
        append_rows(RESULTS_DIR / "gguf_llama_cpp_tokenizers.jsonl", rows)
        return 0
    if a.check_rope:
        rows = check_rope(bins, a.work, text_file(a.work, "austen:emma"), a.rope_chunks, a.threads)
        append_rows(RESULTS_DIR / "gguf_llama_cpp_rope.jsonl", rows)
        return 0
    emma = text_file(a.work, "austen:emma")
    calib = text_file(a.work, "austen:prideprejudice")
    source = float_gguf(a.work)
    _, tokenizer = omniquant.load(None)
    variants: list[tuple[str, Path, float | None]] = []
    if not a.no_float:
        variants.append(("float32 (ours, f32)", source, None))
    types = [t for t in a.llama_types.split(",") if t]
    for kind in [] if a.imatrix_only else types:
        variants.append(
            (
                f"llama.cpp {kind}",
                llama_quantized(bins, a.work, source, kind, None, a.threads),
                None,
            )
        )
    if not a.no_imatrix and types:
        imatrix = importance_matrix(bins, a.work, source, calib, a.threads)
        for kind in types:
            path = llama_quantized(bins, a.work, source, kind, imatrix, a.threads)
            variants.append((f"llama.cpp {kind} + imatrix", path, None))
    for spec in a.ours:
        label, _, folder = spec.partition("=")
        for output in a.ours_output.split(","):
            path, fake = our_gguf(a.work, label, Path(folder), output)
            variants.append((f"OmniQuant {label} (output {output})", path, fake))
    rows = []
    a.results.parent.mkdir(parents=True, exist_ok=True)
    for label, path, fake in variants:
        row = measure(label, path, bins, emma, tokenizer, a)
        if fake is not None:
            row["ppl_fake_quant"] = round(fake, 4)
        rows.append(row)
        with a.results.open("a") as f:
            f.write(json.dumps(row) + "\n")
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.path[:0] = [str(ROOT / "src"), str(ROOT)]
    raise SystemExit(main())
