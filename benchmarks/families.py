"""Sweep every causal-LM family of the installed transformers: a tiny random model built from the
family's own config class, then `omniquant.quantize` (W4A16g16, 2 windows of 32 tokens, 1 epoch)
as a new user would run it. Each family ends one of four ways:

    whole      quantized, at most 1% of the weights outside embeddings/routers/head left float
               (reported)
    refused    one clear line (an OmniQuantError: our refusal, e.g. fused experts left float)
    traceback  any other exception: a bug to fix or a refusal to add
    unbuilt    the tiny model could not be built from its config, or its float forward fails
               (the config's, not ours; counted apart)

and a run that finishes with weights left float would be a silent partial run (the coverage check
refuses those, so the column should stay empty). Not a test: a benchmark (docs/families.md).

    python benchmarks/families.py --threads 2 [--only qwen3_moe,mixtral] [--out results.jsonl]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

TINY = dict(
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    num_experts=4,
    num_local_experts=4,
    n_routed_experts=4,
    num_experts_per_tok=2,
    max_position_embeddings=256,
    first_k_dense_replace=1,
    kv_lora_rank=16,
    q_lora_rank=32,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=16,
    rotary_dim=8,
)


MAX_PARAMETERS = 30_000_000  # a "tiny" config that stays larger is skipped (BLT: 23 GB)


def tiny_model(model_type: str, vocab: int) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, **TINY, vocab_size=vocab)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key, value in {**TINY, "vocab_size": vocab}.items():
        if hasattr(text, key):
            setattr(text, key, value)
    with torch.device("meta"):  # its size first: some configs keep huge tables
        size = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    if size > MAX_PARAMETERS:
        raise ValueError(f"the tiny config still has {size:,} parameters")
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def byte_tokenizer() -> Any:
    """The tests' byte-level BPE of 300 tokens: small embeddings, so the sweep spends its time in
    the blocks; any text tokenizes."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout: its tests
    from tests.formats.test_gguf import byte_bpe_tokenizer

    return byte_bpe_tokenizer()


def run_family(model_type: str, tokenizer: Any) -> dict[str, Any]:
    import omniquant
    from omniquant.config import CalibConfig, OmniQuantConfig, WeightQuant
    from omniquant.coverage import FLOAT_LIMIT
    from omniquant.errors import OmniQuantError

    row: dict[str, Any] = {"model_type": model_type}
    try:
        model = tiny_model(model_type, len(tokenizer))
    except Exception as e:
        return {**row, "outcome": "unbuilt", "reason": f"{type(e).__name__}: {e}"[:300]}
    row["class"] = type(model).__name__
    try:  # the tiny config must run in float first, else the failure is the config's
        with torch.no_grad():
            model(torch.randint(3, len(tokenizer), (1, 32)))
    except Exception as e:
        return {
            **row,
            "outcome": "unbuilt",
            "reason": f"float forward: {type(e).__name__}: {e}"[:300],
        }
    config = OmniQuantConfig(
        WeightQuant(4, 16), calib=CalibConfig(epochs=1, nsamples=2, seqlen=32, batch_size=1)
    )
    t0 = time.perf_counter()
    try:
        result = omniquant.quantize(model, config, tokenizer=tokenizer, progress=False)
    except OmniQuantError as e:
        return {**row, "outcome": "refused", "reason": str(e)[:300]}
    except Exception as e:
        tb = traceback.format_exc().strip().splitlines()
        return {
            **row,
            "outcome": "traceback",
            "reason": f"{type(e).__name__}: {e}"[:300],
            "where": tb[-3][:200] if len(tb) >= 3 else "",
        }
    coverage = result.report["coverage"]
    share = 1 - coverage["float_share"]
    outcome = "whole" if coverage["float_share"] <= FLOAT_LIMIT else "partial"
    return {
        **row,
        "outcome": outcome,
        "quantized_share": share,
        "seconds": time.perf_counter() - t0,
    }


def main(argv: list[str] | None = None) -> int:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", default="", help="comma-separated model_types (default: all)")
    p.add_argument("--out", type=Path, default=None, help="write one JSON row per family")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    logging.disable(logging.WARNING)
    tokenizer = byte_tokenizer()
    types = sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    if a.only:
        types = [t for t in types if t in a.only.split(",")]
    rows = []
    for model_type in types:
        row = run_family(model_type, tokenizer)
        rows.append(row)
        share = f" {100 * row['quantized_share']:.0f}%" if "quantized_share" in row else ""
        print(
            f"{model_type:24s} {row['outcome']:9s}{share} {row.get('reason', '')[:110]}", flush=True
        )
    counts = {
        o: sum(r["outcome"] == o for r in rows)
        for o in ("whole", "partial", "refused", "traceback", "unbuilt")
    }
    print("; ".join(f"{k} {v}" for k, v in counts.items()))
    if a.out:
        a.out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
