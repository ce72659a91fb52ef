"""The top layer: what a user calls, each in the module named after it.

quantize.py  `quantize`, as named steps (validate, load, capture, block loop, end to end,
             report, write)
source.py    the model to quantize: checked from its skeleton, then loaded or streamed
plan.py      the memory plan, from the model's shape
output.py    the output folder's lifecycle (`.partial`, resume, atomic rename, cleanup)
export.py    `export`: a quantized folder written again in a packed format
load.py      `load`, `load_native`: what quantize and export wrote
evaluate.py  `evaluate`, `measure_perplexity`

The functions are exported by `omniquant` itself (`omniquant.quantize`, ...); this package
re-exports nothing, so that `omniquant.pipeline.quantize` stays the module.
"""
