"""Ablation: our signed symmetric grid against the reference code's symmetric grid (austen-v1, RTN).

Both take the scale h = max|w| / (2^(b-1) - 1) per row or group. Ours stores signed codes
q in [-2^(b-1), 2^(b-1) - 1] with zero point 0 (what signed-int formats hold: compressed-tensors'
symmetric int4/int8, GGUF's Q8_0); the reference code stores unsigned codes in [0, 2^b - 1] with a
fixed zero point 2^(b-1) - 1, so that q - z spans [-(2^(b-1) - 1), 2^(b-1)]. Within min-max range
both grids hold the same values; they differ only in which side has the one extra level, which a
clipped range (LWC) can reach. This script rounds every block linear of SmolLM2 to each grid
(round-to-nearest, no calibration) and prints both perplexities on Emma.

  python benchmarks/symmetric_grid.py --threads 2 --settings W4A16,W4A16g128,W3A16g128
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import omniquant
from omniquant.model_io import load_model
from omniquant.models import block_linears, decoder_layers, get_architecture
from omniquant.quant.primitives import fake_quantize, from_groups, to_groups

RESULTS = Path(__file__).parent / "results" / "symmetric_grid.jsonl"


def reference_symmetric(w: torch.Tensor, bits: int, group_size: int | None) -> torch.Tensor:
    """The reference code's symmetric fake quantization (unsigned codes, mid zero point)."""
    wg = to_groups(w, group_size)
    half = 2 ** (bits - 1) - 1
    scale = (wg.abs().amax(dim=-1, keepdim=True) / half).clamp(min=1e-5)
    q = (wg / scale).round().add(half).clamp(0, 2**bits - 1)
    return from_groups((q - half) * scale, w.shape[1])


def ours_symmetric(w: torch.Tensor, bits: int, group_size: int | None) -> torch.Tensor:
    return fake_quantize(w, bits, group_size, symmetric=True)


GRIDS = {"ours (signed)": ours_symmetric, "reference (unsigned, mid zero)": reference_symmetric}


@torch.no_grad()
def row(setting: str, grid: str) -> dict[str, object]:
    bits = int(setting[1])
    group = int(setting.split("g")[1]) if "g" in setting else None
    model, tokenizer = load_model("smollm2")
    for block in decoder_layers(model, get_architecture(model)):
        for linear in block_linears(block).values():
            linear.weight.copy_(GRIDS[grid](linear.weight.float(), bits, group))
    ppl = omniquant.evaluate(model, tokenizer=tokenizer, progress=False)
    return {"setting": setting, "grid": grid, "method": "rtn symmetric", "perplexity": ppl}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--settings", default="W4A16,W4A16g128,W3A16g128")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--results", type=Path, default=RESULTS)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    for setting in a.settings.split(","):
        for grid in GRIDS:
            r = row(setting, grid)
            print(json.dumps(r))
            with a.results.open("a") as f:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
