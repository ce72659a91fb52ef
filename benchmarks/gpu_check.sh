#!/usr/bin/env bash
# GPU check: the tests marked `gpu` (calibration on CUDA with bf16 autocast). On a machine without
# CUDA they are skipped and the script still succeeds. Usage: bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"
python3 - <<'PY'
import torch, transformers
print("torch", torch.__version__, "transformers", transformers.__version__,
      "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
PY
python3 -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider "$@"
