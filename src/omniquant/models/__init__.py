"""Architecture knowledge as data: one record per family and a registry keyed by HF class name."""

from omniquant.models.architecture import (
    Architecture,
    GgufSpec,
    Refusal,
    block_linears,
    get_module,
)
from omniquant.models.registry import (
    REGISTRY,
    architecture_for_config,
    by_model_type,
    decoder_layers,
    get_architecture,
    infer_architecture,
    register,
)

__all__ = [
    "REGISTRY",
    "Architecture",
    "GgufSpec",
    "Refusal",
    "architecture_for_config",
    "block_linears",
    "by_model_type",
    "decoder_layers",
    "get_architecture",
    "get_module",
    "infer_architecture",
    "register",
]
