"""Scale benchmark: calibrate a model larger than memory, weights streamed from disk.

1. Writes a random-weight model in Llama-3.1-8B's shape (`llama-3.1-8b-config.json`; `--layers N`
   overrides num_hidden_layers) as a bf16 safetensors folder, one shard per block, generated
   shard by shard so the writer's own memory stays at one shard. The tokenizer is SmolLM2's
   (its ids fit the 8B vocabulary); the weights are random, so only memory and time mean
   anything here, not the quality.
2. Quantizes it W4A16g128 with `omniquant quantize --stream` in a child process (its peak RSS is
   its own), 4 x 512 calibration windows, 1 epoch, and reads the memory figures of its report.
3. Checks peak RSS against the bound "one block in float32 + the activations + 2 GiB", and prints
   the same accounting (`plan.memory_plan`) for Llama-3.1-70B at 128 x 2048.

  nice -n 10 python benchmarks/scale.py --work /tmp/scale --layers 4 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from omniquant.activations import GiB, MemoryPlan, gib
from omniquant.config import CalibConfig, OmniQuantConfig, WeightQuant
from omniquant.pipeline.plan import memory_plan

HERE = Path(__file__).parent
SHAPE_8B = HERE / "llama-3.1-8b-config.json"
SHAPE_70B = {  # Llama-3.1-70B's shape (its config.json's sizes)
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "num_hidden_layers": 80,
}


def cpu_name() -> str:
    """The CPU's model name, as /proc/cpuinfo gives it (every time is quoted with it)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def skeleton_of(config: dict) -> torch.nn.Module:
    """The model of a config dict on the meta device (nothing allocated)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(**config)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg)


def write_random_model(folder: Path, config: dict, tokenizer_from: Path) -> None:
    """A bf16 safetensors folder of random weights (std 0.02, norms 1), shard by shard."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoTokenizer

    skeleton = skeleton_of(config)
    layers = "model.layers."
    shards: dict[str, list[str]] = {}
    for name in skeleton.state_dict():
        key = ".".join(name.split(".")[:3]) if name.startswith(layers) else name
        shards.setdefault(key, []).append(name)
    shapes = {n: tuple(t.shape) for n, t in skeleton.state_dict().items()}
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for k, (shard, names) in enumerate(shards.items()):
        tensors = {}
        for name in names:
            if "norm" in name:
                tensors[name] = torch.ones(shapes[name], dtype=torch.bfloat16)
            else:
                t = torch.empty(shapes[name], dtype=torch.bfloat16)
                tensors[name] = t.normal_(0.0, 0.02, generator=gen)
            total += tensors[name].numel() * 2
        file = f"model-{k:05d}.safetensors"
        save_file(tensors, str(tmp / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
        del tensors
        print(f"  wrote {shard} ({file})", flush=True)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    cfg = AutoConfig.for_model(**config)
    cfg.dtype = torch.bfloat16
    cfg.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(tokenizer_from).save_pretrained(tmp)
    tmp.rename(folder)


def predicted(config: dict, nsamples: int, seqlen: int, dtype: str) -> MemoryPlan:
    calib = CalibConfig(nsamples=nsamples, seqlen=seqlen, epochs=1, activation_dtype=dtype)
    cfg = OmniQuantConfig(WeightQuant(4, 128), calib=calib)
    return memory_plan(skeleton_of(config), cfg, True, 1 << 50)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/omniquant-scale"))
    p.add_argument("--layers", type=int, default=None, help="override num_hidden_layers")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--nsamples", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--activation-dtype", default="float32")
    p.add_argument("--max-memory", default=None)
    p.add_argument("--calib-dataset", default=None, help="default: quantize's (austen)")
    p.add_argument("--tokenizer", type=Path, default=None, help="default: SmolLM2's folder")
    p.add_argument("--keep", action="store_true", help="keep the random model for another run")
    p.add_argument("--results", type=Path, default=HERE / "results" / "scale.jsonl")
    a = p.parse_args()

    config = json.loads(SHAPE_8B.read_text())
    if a.layers:
        config["num_hidden_layers"] = a.layers
    n_layers = config["num_hidden_layers"]
    folder = a.work / f"llama-8b-shape-{n_layers}l-bf16"
    out = a.work / f"q-{n_layers}l"
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(out.with_name(out.name + ".partial"), ignore_errors=True)
    if not (folder / "config.json").exists():
        from omniquant.model_io import resolve_model_path

        tok = a.tokenizer or Path(resolve_model_path("smollm2"))
        print(f"writing {folder} ({n_layers} layers, bf16)", flush=True)
        t0 = time.perf_counter()
        write_random_model(folder, config, tok)
        print(f"  {time.perf_counter() - t0:.0f} s", flush=True)
    disk = sum(f.stat().st_size for f in folder.glob("*.safetensors"))

    cmd = [sys.executable, "-m", "omniquant", "quantize", "--model", str(folder)]
    cmd += ["--output", str(out), "--stream", "--wbits", "4", "--group-size", "128"]
    cmd += ["--nsamples", str(a.nsamples), "--seqlen", str(a.seqlen), "--epochs", str(a.epochs)]
    cmd += ["--threads", str(a.threads), "--device", a.device, "--quiet"]
    cmd += ["--activation-dtype", a.activation_dtype]
    if a.max_memory:
        cmd += ["--max-memory", a.max_memory]
    if a.calib_dataset:
        cmd += ["--calib-dataset", a.calib_dataset]
    print(" ".join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": str(a.threads)})
    seconds = time.perf_counter() - t0
    report = json.loads((out / "omniquant.json").read_text())
    mem = report["memory"]
    bound = mem["block_bytes"] + mem["activation_copies"] * mem["activation_chain_bytes"] + 2 * GiB
    row = {
        "shape": "llama-3.1-8b",
        "layers": n_layers,
        "source_bytes": disk,
        "device": a.device,
        "cpu": cpu_name(),
        "threads": a.threads,
        "recompute": report["config"]["calib"].get("recompute"),
        "windows": f"{a.nsamples} x {a.seqlen} (+{report['val_windows']} held out)",
        "epochs": a.epochs,
        "wall_seconds": round(seconds, 1),
        "calibration_seconds": round(report["calibration_seconds"], 1),
        "seconds_per_block": round(report["calibration_seconds"] / n_layers, 1),
        "peak_rss_bytes": mem["peak_rss_bytes"],
        "peak_device_bytes": mem["peak_device_bytes"],
        "spilled_bytes": mem["spilled_bytes"],
        "block_bytes": mem["block_bytes"],
        "activation_chain_bytes": mem["activation_chain_bytes"],
        "bound_bytes": bound,
        "predicted_peak_bytes": mem["predicted_peak_bytes"],
        "within_bound": mem["peak_rss_bytes"] <= bound,
    }
    print(
        f"source {gib(disk)} on disk; peak RSS {gib(mem['peak_rss_bytes'])} "
        f"(bound: one block {gib(mem['block_bytes'])} + activations "
        f"{mem['activation_copies']} x {gib(mem['activation_chain_bytes'])} + 2 GiB = "
        f"{gib(bound)}; predicted {gib(mem['predicted_peak_bytes'])}); peak device "
        f"{gib(mem['peak_device_bytes'])}; spilled {gib(mem['spilled_bytes'])}; "
        f"{row['seconds_per_block']} s per block"
    )
    for dtype in ("float32", "bfloat16"):
        plan = predicted({**config, **SHAPE_70B}, 128, 2048, dtype)
        row[f"predicted_70b_{dtype}_bytes"] = plan.predicted_peak()
        print(
            f"Llama-3.1-70B, 128 x 2048, activations in {dtype}: one block "
            f"{gib(plan.block_bytes)} float32, one chain {gib(plan.chain_bytes)} x "
            f"{plan.copies}, outside the blocks {gib(plan.outside_bytes)}: predicted peak RSS "
            f"{gib(plan.predicted_peak())} with every activation in RAM"
        )
    a.results.parent.mkdir(parents=True, exist_ok=True)
    with a.results.open("a") as f:
        f.write(json.dumps(row) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    if not a.keep:
        shutil.rmtree(folder, ignore_errors=True)
    return 0 if row["within_bound"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
