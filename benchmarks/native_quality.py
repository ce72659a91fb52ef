"""What the native decoder's int8 activations cost: austen-v1 perplexity of a quantized folder run
by PyTorch (the fake-quantized model, float32) and by `omniquant.kernels.native` (each window fed
through the KV cache 16 tokens per call, every position's logits kept: the bits that feeding it
token by token gives). Not a test. `omniquant eval FOLDER --native` gives the same perplexity.

The windows are austen-v1's (Emma, the first --windows of 512, [BOS] + 511 tokens); the same
windows for both. Also prints how often the two agree on the most likely next token.

  python benchmarks/native_quality.py FOLDER --windows 80 --head float16 --activations 16
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from scale import cpu_name  # benchmarks/scale.py

RESULTS = Path(__file__).parent / "results" / "native_quality.jsonl"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("folder", type=Path, help="a folder written by omniquant (fake or packed)")
    p.add_argument("--windows", type=int, default=80, help="austen-v1 windows (default all 80)")
    p.add_argument(
        "--dataset", default="austen:emma", help="the text (default austen:emma; debian:policy ...)"
    )
    p.add_argument("--head", default="float16", choices=["float16", "float32"])
    p.add_argument("--activations", type=int, default=16, choices=[8, 16], help="integer bits")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--label", default=None, help="the row's name (default: the folder's)")
    p.add_argument("--results", type=Path, default=RESULTS)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    import omniquant
    from omniquant.data import bos_token_id, eval_windows, load_text, tokenize_text
    from omniquant.kernels.native import NativeDecoder

    model, tokenizer = omniquant.load(a.folder)
    tokens = tokenize_text(tokenizer, load_text(a.dataset))
    windows = eval_windows(tokens, 512, bos_token_id(tokenizer), a.windows)
    decoder = NativeDecoder(model, head=a.head, threads=a.threads, activations=a.activations)
    nll_torch = nll_native = 0.0
    agree = count = 0
    t_torch = t_native = 0.0
    for w in windows:
        ids = w.tolist()
        t0 = time.perf_counter()
        with torch.no_grad():
            want = model(w[None], use_cache=False).logits[0, :-1].float()
        t1 = time.perf_counter()
        got = decoder.sequence_logits(ids[:-1])  # 16 tokens per call, as step by step
        t2 = time.perf_counter()
        t_torch, t_native = t_torch + t1 - t0, t_native + t2 - t1
        target = w[1:]
        nll_torch += float(F.cross_entropy(want, target, reduction="sum"))
        nll_native += float(F.cross_entropy(got, target, reduction="sum"))
        agree += int((got.argmax(-1) == want.argmax(-1)).sum())
        count += target.numel()
    ppl_torch, ppl_native = math.exp(nll_torch / count), math.exp(nll_native / count)
    row = {
        "label": a.label or a.folder.name,
        "dataset": a.dataset,
        "windows": len(windows),
        "tokens": count,
        "head": a.head,
        "activations": a.activations,
        "ppl_fake_quant": round(ppl_torch, 4),
        "ppl_native": round(ppl_native, 4),
        "native_over_fake": round(ppl_native / ppl_torch, 5),
        "argmax_agreement": round(agree / count, 4),
        "native_s": round(t_native, 1),
        "torch_s": round(t_torch, 1),
        "cpu": cpu_name(),
        "threads": a.threads,
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    print(json.dumps(row))
    a.results.parent.mkdir(parents=True, exist_ok=True)
    with a.results.open("a") as f:
        f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
