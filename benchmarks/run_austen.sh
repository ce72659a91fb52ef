#!/usr/bin/env bash
# Reproduces every austen-v1 row of benchmarks/README.md, one heavy process at a time, appending to
# benchmarks/results/austen.jsonl (delete it first for a clean table). Total: about 4.5 hours on 2 cores.
# NOTE: the rows in results/ predate three changes: --weight-lr now counts quantization steps (the
# absolute 1e-3 below is about 0.015 steps at W4g128, 0.007 at W3g128, 0.0034 at W2g64 on SmolLM2:
# 1e-3 / the median step), the windows come in a fixed order (--shuffle for the old reshuffling),
# and the guard holds out nsamples / 8 extra windows (--val-samples 0 for none). Rerunning these
# lines as they stand measures the new defaults, not the old rows.
set -euo pipefail
cd "$(dirname "$0")/.."
B="python3 benchmarks/austen.py"

# float and RTN rows (2 threads)
$B --threads 2 --methods float
$B --threads 2 --methods rtn --settings W4A16,W4A16g128,W3A16g128,W2A16g128,W2A16g64

# OmniQuant (LWC) at the reference code's budget: 32 x 512, 5 epochs, LWC lr 1e-2, batch 1.
# W3A16g128 on 1 thread: the speed comparison with the reference code (1669 s on 1 thread).
$B --threads 1 --methods omniquant --settings W3A16g128 --nsamples 32 --epochs 5
$B --threads 2 --methods omniquant --settings W4A16,W4A16g128,W2A16g128,W2A16g64 --nsamples 32 --epochs 5

# Best recipe (LWC + block-wise weight training, --weight-lr 1e-3), each within 30 minutes on 2 threads
$B --threads 2 --methods omniquant --settings W4A16g128 --nsamples 32 --epochs 4 --weight-lr 1e-3
$B --threads 2 --methods omniquant --settings W4A16,W3A16g128 --nsamples 16 --epochs 2 --weight-lr 1e-3
$B --threads 2 --methods omniquant --settings W2A16g64 --nsamples 32 --epochs 2 --weight-lr 1e-3

# Exploration behind the recipe (W3A16g128, 16 x 512, 2 epochs): loss and weight learning rate
E="$B --results benchmarks/results/exploration.jsonl --threads 2 --methods omniquant --settings W3A16g128 --nsamples 16 --epochs 2"
$E --loss mse
$E --loss token-normalized
for wlr in 1e-4 5e-4 1e-3 2e-3; do $E --weight-lr $wlr; done

# Weight-activation rows (issue 3): RTN and SmoothQuant-style (LET's start, no training) at
# 32 x 512 statistics; OmniQuant LWC + LET with weight training at 16 x 512, 2 epochs
$B --threads 2 --methods rtn,smoothquant --settings W8A8,W6A6,W4A4
$B --threads 2 --methods omniquant --let --settings W4A4,W6A6,W8A8 --nsamples 16 --epochs 2 --weight-lr 1e-3
# LWC + LET against LWC alone (the LWC rows are the best-recipe rows above)
$B --threads 2 --methods omniquant --let --settings W3A16g128,W4A16 --nsamples 16 --epochs 2 --weight-lr 1e-3

# Zero-shot column: next-sentence accuracy on Persuasion (500 items), float / RTN / OmniQuant
$B --threads 2 --zeroshot --methods float,rtn --settings W4A16g128,W3A16g128
$B --threads 2 --zeroshot --methods omniquant --settings W3A16g128,W4A16g128 --nsamples 16 --epochs 2 --weight-lr 1e-3

# Inference: size and speed of float32 / bf16 / packed W8A16, W4A16g128, W3A16g128 (2 threads),
# peak memory, compiled decoding, 1 thread, two more runs of the float32/W4A16g128 pair, file sizes
I="python3 benchmarks/inference.py"
R=benchmarks/results
$I --threads 2 --repeats 3
$I --threads 2 --memory-only
$I --threads 2 --repeats 3 --compile --variants float32,W4A16g128,W3A16g128 --results $R/inference_compile.jsonl
$I --threads 1 --repeats 3 --variants float32,W4A16g128,W3A16g128 --results $R/inference_1thread.jsonl
for run in 1 2; do
  $I --threads 2 --repeats 3 --variants float32,W4A16g128 --results $R/inference_repeat.jsonl
done
$I --sizes
# On a CUDA machine: bash benchmarks/gpu_check.sh (tests marked gpu + CUDA rows, eager and compiled)

# Perplexity of a packed OmniQuant W4A16g128 model as it is stored (fake-quantized float form)
# and as the integer kernels run it (bf16 activations); results in benchmarks/results/kernels_ppl.txt
K=$(mktemp -d)/w4g128-packed
omniquant quantize --wbits 4 --group-size 128 --nsamples 16 --seqlen 512 --epochs 2 --weight-lr 1e-3 \
  --dtype float32 --format omniquant-packed --output "$K" --threads 2 --quiet
omniquant eval "$K" --threads 2 --quiet | tee -a $R/kernels_ppl.txt
omniquant eval "$K" --kernels --threads 2 --quiet | tee -a $R/kernels_ppl.txt

# Speed against the reference code, repeated: W3A16g128 at its budget on 1 thread, 2 more runs
for run in 1 2; do
  $B --results $R/speed_repeat.jsonl --threads 1 --methods omniquant --settings W3A16g128 --nsamples 32 --epochs 5
done

# Differences from the reference code (docs/differences-from-reference.md; benchmarks/results/ablations.jsonl).
# Rows 1 and 4-6 ran at commit 1e7e954 (windows reshuffled, no guard, LET log-scales by default);
# with today's code add --shuffle --val-samples 0 (and --set let_scale=log where the row says log).
X="$B --results benchmarks/results/ablations.jsonl --threads 2 --methods omniquant --nsamples 16 --epochs 2"
$X --settings W3A16g128 --shuffle --val-samples 0                          # 107.196 (STE zero point)
$X --settings W3A16g128 --shuffle --val-samples 0 --set zero_point_ste=false   # 108.762
$X --settings W3A16g128 --val-samples 0                                    # fixed order: 107.293
$X --settings W3A16g128                                                    # + guard: 107.098
X4="$X --settings W4A4 --let --shuffle --val-samples 0 --set let_alpha=0.5"
$X4 --set let_scale=log                                                    # 375.87
$X4 --set let_scale=direct                                                 # 357.19
$X4 --set let_scale=log --set let_init=reference
$X4 --set let_scale=log --set qkv_point=projection
$X --settings W3A16g128 --let --shuffle --val-samples 0 --set let_scale=log  # LET fold fix: 80.23
python3 benchmarks/symmetric_grid.py --threads 2 --settings W4A16,W3A16g128
# The demo (README.md, benchmarks/README.md): omniquant demo --threads 2

# On one CUDA device (H100/H200), float32: the recipe table on both texts and the pure OmniQuant
# W8A8/W6A6/W4A4 rows at the reference budget, 10 rows at a time (benchmarks/results/gpu_h200.jsonl)
bash benchmarks/gpu_quality.sh /tmp/gpu-quality 10 3000

# --weight-bound against domain drift (AMD EPYC, 1 thread each, two at a time): W4A16g128 at 4x the
# recipe's weight lr, unbounded and bounded at 0.5 steps (benchmarks/results/bound.jsonl)
Y="$B --results benchmarks/results/bound.jsonl --threads 1 --settings W4A16g128 --methods omniquant --weight-lr 0.06 --nsamples 16 --epochs 2"
$Y
$Y --set weight_bound=0.5
