"""Time and peak memory of calibrating one decoder block in process (random weights).

A model of the given config with one layer (vocabulary cut to 512), `--windows` random windows of
`--seqlen` tokens (+ `--held-out`), W`--wbits`A16 g`--group-size`, `--epochs` epochs; prints the
block's seconds, its report and the process's peak RSS. The in-process figures
(benchmarks/README.md#peak-rss-measured):

  B="python benchmarks/block.py --config benchmarks"
  $B/llama-3.1-8b-config.json --windows 4 --held-out 1
  $B/llama-3.1-8b-config.json --windows 4 --held-out 1 --no-recompute
  $B/llama-3.1-8b-config.json --windows 4 --held-out 1 --map-large-allocations
  $B/smollm2-135m-config.json --windows 16 --held-out 2 --weight-lr 0.007

"Before" figures: the same command on a checkout of commit 189e63c (the 8B-shape block's 90.3 s;
no `recompute` field there, so the script leaves it out) or acdc441 (the SmolLM2-shape block's
15.2 s, before subnormals were flushed).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from omniquant.block_loop import calibrate_blocks
from omniquant.capture import capture_block_inputs
from omniquant.config import CalibConfig, WeightQuant
from omniquant.models import decoder_layers, get_architecture
from omniquant.runtime import Runtime


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", type=Path, required=True, help="a model's config.json")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--held-out", type=int, default=1)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--wbits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--weight-lr", type=float, default=0.0)
    p.add_argument("--recompute", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument(
        "--map-large-allocations",
        action="store_true",
        help="as a streamed run does: allocations of 8 MiB or more mapped (memory.py)",
    )
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    config = json.loads(a.config.read_text())
    config.update(num_hidden_layers=1, vocab_size=512, bos_token_id=None, eos_token_id=None)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config)).float()
    blocks = decoder_layers(model, get_architecture(model))
    n = a.windows + a.held_out
    ids = torch.randint(0, 512, (n, a.seqlen), generator=torch.Generator().manual_seed(0))
    captured = capture_block_inputs(model, blocks, list(ids.split(1)))
    fields = {"epochs": a.epochs, "nsamples": a.windows, "seqlen": a.seqlen}
    fields["weight_lr"] = a.weight_lr
    if "recompute" in {f.name for f in dataclasses.fields(CalibConfig)}:
        fields["recompute"] = a.recompute
    spec = WeightQuant(bits=a.wbits, group_size=a.group_size)
    if a.map_large_allocations:
        from omniquant.memory import map_large_allocations

        map_large_allocations()
    t0 = time.perf_counter()
    reports = calibrate_blocks(
        blocks,
        captured,
        spec,
        CalibConfig(**fields),
        Runtime(progress=False),
        val_batches=a.held_out,
    )
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(
        f"{a.config.name}: one block in {seconds:.1f} s ({a.threads} threads), "
        f"peak RSS {peak:.2f} GiB"
    )
    print(json.dumps(reports[0].to_dict()))


if __name__ == "__main__":
    main()
