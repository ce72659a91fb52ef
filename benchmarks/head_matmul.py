"""The output head's product on the CPU in each storage dtype (benchmarks/README.md, "Float16
output head").

SmolLM2-135M's head is 49152 x 576. For one decode row and for a 512-token prompt, times
  float32        F.linear in float32
  float16        F.linear with float16 weight and activations (float16 logits)
  bfloat16       the same in bf16
  int8           PyTorch's weight-only int8 product (`_weight_int8pack_mm`, per-row scales)
  HalfHead       omniquant.kernels.head.HalfHead (float16 for few rows, float32 slices for many)
Medians of 5 runs of N calls each, milliseconds per call; a fixed thread count.

  python benchmarks/head_matmul.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
from torch.nn import functional as F

from omniquant.kernels.head import HalfHead
from scale import cpu_name  # benchmarks/scale.py


def per_call_ms(f: Callable[[], object], calls: int) -> float:
    for _ in range(max(2, calls // 10)):
        f()
    runs = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(calls):
            f()
        runs.append((time.perf_counter() - t0) / calls * 1e3)
    return statistics.median(runs)


def products(
    x: torch.Tensor, w: torch.Tensor, w8: torch.Tensor, scales: torch.Tensor, half: HalfHead
) -> dict[str, Callable[[], object]]:
    """The head's product of `x`, one callable per storage."""
    xh, xb, wh, wb = x.half(), x.bfloat16(), w.half(), w.bfloat16()
    return {
        "float32": lambda: F.linear(x, w),
        "float16": lambda: F.linear(xh, wh),
        "bfloat16": lambda: F.linear(xb, wb),
        "int8": lambda: torch._weight_int8pack_mm(x, w8, scales),
        "HalfHead": lambda: half(x),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--hidden", type=int, default=576)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(a.vocab, a.hidden, generator=gen) * 0.05
    scales = w.abs().amax(1) / 127
    w8 = torch.round(w / scales[:, None]).to(torch.int8)
    half = HalfHead(w)
    row = {"cpu": cpu_name(), "threads": a.threads, "shape": [a.vocab, a.hidden]}
    for rows, calls in ((1, 200), (512, 5)):
        x = torch.randn(rows, a.hidden, generator=gen)
        for name, f in products(x, w, w8, scales, half).items():
            row[f"{name}_ms_{rows}_rows"] = round(per_call_ms(f, calls), 2)
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
