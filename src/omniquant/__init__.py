"""omniquant: OmniQuant (LWC + LET) post-training quantization of Hugging Face decoder LMs."""

from omniquant.config import (
    ActQuant,
    CalibConfig,
    OmniQuantConfig,
    WeightQuant,
)
from omniquant.pipeline.evaluate import PerplexityResult, evaluate, measure_perplexity
from omniquant.pipeline.export import export
from omniquant.pipeline.load import load, load_native
from omniquant.pipeline.quantize import QuantizeResult, quantize
from omniquant.version import __version__

__all__ = [
    "ActQuant",
    "CalibConfig",
    "OmniQuantConfig",
    "PerplexityResult",
    "QuantizeResult",
    "WeightQuant",
    "__version__",
    "evaluate",
    "export",
    "load",
    "load_native",
    "measure_perplexity",
    "quantize",
]
