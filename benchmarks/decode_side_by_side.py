"""Decode speed of our own int4 path (compiled) beside llama.cpp's, on this machine, alternating.

Issue 14's second speed target: our int4 path's compiled decode at least llama.cpp's Q4_1 decode
(same model, same threads). One round runs, one after the other (never at once):
  * `benchmarks/inference.py --compile` on each --ours variant (a fresh process each: SmolLM2
    W4A16g128 packed, int4 kernels, `torch.compile` decode step with a static KV cache; 32-token
    prompt, then 128 tokens, median of --repeats);
    A variant ending in "+native" (or "+native8") runs the native decoder instead
    (`omniquant.kernels.native`: one C++ call per token; int16 or int8 activations);
  * `llama-bench -n 128 -p 0` on each --gguf file (median of --repeats inside llama-bench).
--rounds rounds, the order rotated each round so a drift of the machine's speed falls on every
variant alike. Prints and appends one row per variant (median over rounds, every value) to
results/decode_side_by_side.jsonl.

  python benchmarks/decode_side_by_side.py \
      --gguf "llama.cpp Q4_1=/tmp/ggb/llama-Q4_1.gguf" \
      --ours W4A16g128 --ours W4A16g128+f16head --rounds 3 --threads 2
  python benchmarks/decode_side_by_side.py \
      --gguf "llama.cpp Q4_1=/tmp/omniquant-gguf-bench/llama-Q4_1.gguf" \
      --ours W4A16g128+f16head+native --ours W4A16g128+f16head+native8 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from scale import cpu_name  # benchmarks/scale.py

HERE = Path(__file__).resolve().parent
BINS = Path.home() / ".cache" / "omniquant" / "gguf-bench" / "build" / "bin"


def ours(variant: str, threads: int, repeats: int, results: Path) -> float:
    """Decode tok/s of one of inference.py's variants, compiled, in its own process."""
    cmd = [sys.executable, str(HERE / "inference.py"), "--compile", "--variants", variant]
    cmd += ["--threads", str(threads), "--repeats", str(repeats), "--results", str(results)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    row = next(json.loads(x) for x in out.splitlines() if x.startswith("{"))
    return float(row["decode_tok_s"])


def ours_label(variant: str) -> str:
    return f"ours {variant} ({'native' if '+native' in variant else 'compiled'})"


def llama_cpp(path: Path, threads: int, repeats: int) -> float:
    """llama-bench's decode tok/s (tg128) for one GGUF file."""
    cmd = [str(BINS / "llama-bench"), "-m", str(path), "-p", "0", "-n", "128"]
    cmd += ["-t", str(threads), "-r", str(repeats), "-o", "json"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    rows = json.loads(out[out.index("[") : out.rindex("]") + 1])
    return float(next(r["avg_ts"] for r in rows if r["n_gen"] == 128))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--ours", action="append", default=[], help="an inference.py variant")
    p.add_argument("--gguf", action="append", default=[], metavar="LABEL=FILE")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--results", type=Path, default=HERE / "results" / "decode_side_by_side.jsonl")
    a = p.parse_args()
    runs: dict[str, list[float]] = {}
    jobs = [(ours_label(v), "ours", v) for v in a.ours]
    jobs += [(label, "gguf", path) for label, _, path in (g.partition("=") for g in a.gguf)]
    scratch = a.results.parent / "decode_side_by_side.rows.tmp"
    for r in range(a.rounds):
        for label, kind, what in jobs[r % len(jobs) :] + jobs[: r % len(jobs)]:
            if kind == "ours":
                tok_s = ours(what, a.threads, a.repeats, scratch)
            else:
                tok_s = llama_cpp(Path(what), a.threads, a.repeats)
            runs.setdefault(label, []).append(tok_s)
            print(f"round {r + 1} {label}: {tok_s:.1f} tok/s", flush=True)
    scratch.unlink(missing_ok=True)
    stamp = {"cpu": cpu_name(), "threads": a.threads, "date": time.strftime("%Y-%m-%d %H:%M")}
    with a.results.open("a") as f:
        for label, values in runs.items():
            row = {
                "variant": label,
                "decode_tok_s": round(statistics.median(values), 1),
                "all": [round(v, 1) for v in values],
                **stamp,
            }
            print(json.dumps(row))
            f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
