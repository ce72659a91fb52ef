#!/usr/bin/env bash
# Reproduces every austen-v1 row of the README, one heavy process at a time, appending to
# benchmarks/results/austen.jsonl (delete it first for a clean table). Total: about 2 hours on 2 cores.
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
