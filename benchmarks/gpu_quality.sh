#!/usr/bin/env bash
# austen-v1 quality rows on one CUDA device: benchmarks/README.md's recipe table (issue 12) and the pure
# OmniQuant weight-activation rows at the reference budget (issue 10), float32 arithmetic (no
# autocast, no TF32), several rows at once (each row is its own process: SmolLM2-135M's kernels
# leave an H100/H200 mostly idle, so the rows share it). Perplexities agree with CPU rows to a few
# tenths of a percent; the seconds are GPU seconds beside other rows, not speed figures.
# Usage: bash benchmarks/gpu_quality.sh OUT_DIR [PARALLEL=8] [DEADLINE_S=3000] [JOBS_FILE]
# (JOBS_FILE: lines "name|austen.py arguments" instead of the list below, e.g.
# benchmarks/gpu_recipes.txt)
# Rows go to OUT_DIR/rows.jsonl (benchmarks/austen.py's format), logs to $LOGS (default OUT_DIR/logs).
# A row still running at the deadline is killed and left out.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT="${1:?usage: gpu_quality.sh OUT_DIR [PARALLEL] [DEADLINE_S]}"
PARALLEL="${2:-8}"
DEADLINE="${3:-3000}"
JOBS_FILE="${4:-}"
LOGS="${LOGS:-$OUT/logs}"
mkdir -p "$OUT" "$LOGS"
START=$(date +%s)
# convert the embedded GGUF to float32 safetensors once, before the rows race for the cache
python3 -c "from omniquant.model_io import load_model; load_model(None)" || exit 1

# name | benchmarks/austen.py arguments, most important and longest first
JOBS=$(cat <<'EOF'
rtn|--settings W4A16g128,W3A16g128,W2A16g64,W8A8,W6A6,W4A4 --methods float,rtn
w4a4_ref|--settings W4A4 --methods omniquant --let --aug-loss --set let_alpha=0.5 --nsamples 32 --epochs 5
w6a6_ref|--settings W6A6 --methods omniquant --let --set let_alpha=0.5 --nsamples 32 --epochs 5
w8a8_ref|--settings W8A8 --methods omniquant --let --set let_alpha=0.5 --nsamples 32 --epochs 5
w3_best_32x4|--settings W3A16g128 --methods omniquant --weight-lr 0.007 --nsamples 32 --epochs 4
w3_lwc_32x5|--settings W3A16g128 --methods omniquant --nsamples 32 --epochs 5
w4_best_32x4|--settings W4A16g128 --methods omniquant --weight-lr 0.015 --nsamples 32 --epochs 4
w2_best_32x4|--settings W2A16g64 --methods omniquant --weight-lr 0.0034 --nsamples 32 --epochs 4
w4_lwc_32x4|--settings W4A16g128 --methods omniquant --nsamples 32 --epochs 4
w2_lwc_32x4|--settings W2A16g64 --methods omniquant --nsamples 32 --epochs 4
w3_lwc_32x4|--settings W3A16g128 --methods omniquant --nsamples 32 --epochs 4
w4a4_attn_16x2|--settings W4A4 --methods omniquant --let --set let_alpha=0.5 --nsamples 16 --epochs 2
w4a4_proj_16x2|--settings W4A4 --methods omniquant --let --set let_alpha=0.5 --set qkv_point=projection --nsamples 16 --epochs 2
w3_best_16x2|--settings W3A16g128 --methods omniquant --weight-lr 0.007 --nsamples 16 --epochs 2
w3_lwc_16x2|--settings W3A16g128 --methods omniquant --nsamples 16 --epochs 2
w4_best_16x2|--settings W4A16g128 --methods omniquant --weight-lr 0.015 --nsamples 16 --epochs 2
w4_lwc_16x2|--settings W4A16g128 --methods omniquant --nsamples 16 --epochs 2
w2_best_16x2|--settings W2A16g64 --methods omniquant --weight-lr 0.0034 --nsamples 16 --epochs 2
w2_lwc_16x2|--settings W2A16g64 --methods omniquant --nsamples 16 --epochs 2
w3_best_32x4_lr015|--settings W3A16g128 --methods omniquant --weight-lr 0.015 --nsamples 32 --epochs 4
w2_best_32x4_lr007|--settings W2A16g64 --methods omniquant --weight-lr 0.007 --nsamples 32 --epochs 4
EOF
)
[ -n "$JOBS_FILE" ] && JOBS=$(grep -v '^#' "$JOBS_FILE")

run_job() {
  local name="${1%%|*}" args="${1#*|}"
  local left=$((DEADLINE - ($(date +%s) - START)))
  if [ "$left" -le 30 ]; then echo "skip $name (deadline)"; return 0; fi
  # shellcheck disable=SC2086
  timeout "$left" python3 benchmarks/austen.py --device cuda --threads 2 \
    --results "$OUT/rows.jsonl" $args >"$LOGS/$name.log" 2>&1
  echo "$name rc=$? after $(($(date +%s) - START)) s"
}
export -f run_job
export OUT LOGS DEADLINE START
printf '%s\n' "$JOBS" | xargs -d '\n' -P "$PARALLEL" -I{} bash -c 'run_job "$1"' _ {}
echo "rows: $(wc -l <"$OUT/rows.jsonl" 2>/dev/null || echo 0), $(($(date +%s) - START)) s"
