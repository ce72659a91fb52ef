#!/usr/bin/env bash
# GPU check, one short script: the tests marked `gpu` (calibration on CUDA with bf16 autocast,
# LET + W8A8 on CUDA, the CUDA int4 kernel against fake quantization, a packed model running its
# kernels on CUDA), then the inference benchmark on CUDA with SmolLM2's shape and random weights
# (no model files needed), eager and compiled. Without CUDA the tests are skipped, the benchmark is left out and the
# script still succeeds. Usage: [LARGE=1] bash benchmarks/gpu_check.sh [OUT_DIR]
# (LARGE=1 adds bf16 vs W4A16g128 rows in Llama-3.1-8B's shape)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${1:-${OUT:-/tmp/omniquant-gpu-check}}"
CACHE="${CACHE:-/tmp/omniquant-gpu-cache}"
mkdir -p "$OUT"
CUDA=$(python3 - <<'PY'
import torch, transformers
print("torch", torch.__version__, "transformers", transformers.__version__,
      "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "", file=__import__("sys").stderr)
print(int(torch.cuda.is_available()))
PY
)
# a failing test must not hide the benchmark: run both, then fail with the tests' status
status=0
python3 -m pytest -q -rs -m gpu tests/test_gpu.py -p no:cacheprovider || status=$?
if [ "$CUDA" = 1 ]; then
  python3 benchmarks/inference.py --device cuda --random-weights --repeats 3 \
    --variants float32,bfloat16,W8A16,W4A16g128,W3A16g128 \
    --cache "$CACHE" --results "$OUT/inference-cuda.jsonl"
  # decode without the per-token launch overhead: torch.compile + static cache + CUDA graphs
  python3 benchmarks/inference.py --device cuda --random-weights --repeats 3 --compile \
    --variants W4A16g128,float32,bfloat16 \
    --cache "$CACHE" --results "$OUT/inference-cuda-compile.jsonl"
  if [ "${LARGE:-0}" = 1 ]; then
    # an 8B model's shape (Llama-3.1-8B, random weights): large enough for weight bytes to
    # dominate a decode step; several minutes (building and packing 8B parameters on the CPU)
    python3 benchmarks/inference.py --device cuda --shape benchmarks/llama-3.1-8b-config.json \
      --repeats 3 --variants bfloat16,W4A16g128 \
      --cache "$CACHE" --results "$OUT/inference-cuda-8b.jsonl"
  fi
else
  echo "no CUDA: inference benchmark on CUDA left out"
fi
exit "$status"
