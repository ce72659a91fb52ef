"""Architecture knowledge as data: one record per family and a registry keyed by HF class name."""

from omniquant.models.architecture import Architecture, block_linears, get_module
from omniquant.models.registry import (
    REGISTRY,
    decoder_layers,
    get_architecture,
    infer_architecture,
    register,
)

__all__ = [
    "REGISTRY",
    "Architecture",
    "block_linears",
    "decoder_layers",
    "get_architecture",
    "get_module",
    "infer_architecture",
    "register",
]
