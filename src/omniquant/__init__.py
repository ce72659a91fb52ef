"""omniquant: OmniQuant (LWC + LET) post-training quantization of Hugging Face decoder LMs."""

__version__ = "0.1.0"

from omniquant.api import QuantizeResult, evaluate, export, load, load_native, quantize
from omniquant.config import (
    ActQuant,
    CalibConfig,
    OmniQuantConfig,
    WeightQuant,
)

__all__ = [
    "ActQuant",
    "CalibConfig",
    "OmniQuantConfig",
    "QuantizeResult",
    "WeightQuant",
    "__version__",
    "evaluate",
    "export",
    "load",
    "load_native",
    "quantize",
]
