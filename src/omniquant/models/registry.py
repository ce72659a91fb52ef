"""The architecture registry, keyed by the Hugging Face model class name; a record is also found
from a config alone by its `model_type` (`by_model_type`, `architecture_for_config`)."""

from __future__ import annotations

import logging
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from omniquant.errors import ModelError, OmniQuantError
from omniquant.models.architecture import Architecture, block_linears, get_module
from omniquant.models.gemma3 import GEMMA3
from omniquant.models.llama import LLAMA, MISTRAL, QWEN2
from omniquant.models.opt import OPT
from omniquant.models.phi3 import PHI3
from omniquant.models.qwen3 import QWEN3

log = logging.getLogger(__name__)

REGISTRY: dict[str, Architecture] = {
    "LlamaForCausalLM": LLAMA,
    "MistralForCausalLM": MISTRAL,
    "Qwen2ForCausalLM": QWEN2,
    "Qwen3ForCausalLM": QWEN3,
    "Gemma3ForCausalLM": GEMMA3,
    "OPTForCausalLM": OPT,
    "Phi3ForCausalLM": PHI3,
}


def register(class_name: str, arch: Architecture) -> None:
    """Add or replace the architecture used for a Hugging Face model class."""
    REGISTRY[class_name] = arch


def by_model_type(model_type: str) -> Architecture | None:
    """The registered record covering a Hugging Face config `model_type`, or None; a ModelError
    when two different records claim it."""
    found = [a for a in dict.fromkeys(REGISTRY.values()) if model_type in a.model_types]
    if len(found) > 1:
        names = ", ".join(a.name for a in found)
        raise ModelError(f"model_type {model_type!r} is claimed by several records ({names})")
    return found[0] if found else None


def architecture_for_config(config: Any) -> Architecture | None:
    """The registered record of a transformers config (by its `model_type`), or None."""
    return by_model_type(getattr(config, "model_type", None) or "")


def _find_block_list(model: nn.Module) -> str | None:
    """Dotted path of the longest ModuleList whose every child holds an nn.Linear."""
    best: tuple[int, str] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        longer = best is None or len(module) > best[0]
        if longer and all(block_linears(child) for child in module):
            best = (len(module), name)
    return best[1] if best else None


def infer_architecture(model: nn.Module) -> Architecture:
    """A best-effort record for an unregistered model of the standard shape."""
    cls = type(model).__name__
    layers = _find_block_list(model)
    if layers is None:
        raise ModelError(
            f"unsupported architecture {cls}: no ModuleList of decoder blocks holding nn.Linear "
            f"layers was found. Supported classes: {', '.join(sorted(REGISTRY))}"
        )
    embeddings = tuple(name for name, m in model.named_modules() if isinstance(m, nn.Embedding))
    log.warning(
        "%s is not a registered architecture; quantizing the nn.Linear layers of the %d blocks "
        "at %r, weight-only (LET needs a registered architecture); what else the model holds "
        "stays float, and a run leaving more than 1%% of its weights float is refused",
        cls,
        len(get_module(model, layers)),
        layers,
    )
    return Architecture(
        name=cls,
        layers=layers,
        embeddings=embeddings,
        final_norm=None,
        attn_norm=None,
        qkv=(),
        o_proj=None,
        mlp_norm=None,
        mlp_in=(),
        mlp_out=None,
        rotary=False,
        native=f"{cls} is not a registered architecture",
    )


def get_architecture(model: nn.Module) -> Architecture:
    """The registered record of this model's class, else an inferred one (with a warning)."""
    arch = REGISTRY.get(type(model).__name__)
    return arch if arch is not None else infer_architecture(model)


def decoder_layers(model: nn.Module, arch: Architecture) -> nn.ModuleList:
    """The model's ModuleList of decoder blocks."""
    layers = get_module(model, arch.layers)
    if not isinstance(layers, nn.ModuleList):
        raise ModelError(f"{type(model).__name__}.{arch.layers} is not a ModuleList")
    return layers


MODEL_CODE_ERRORS = (
    RuntimeError,
    ValueError,
    TypeError,
    IndexError,
    AttributeError,
    KeyError,
    AssertionError,
    NotImplementedError,
)


def _where(error: BaseException) -> str:
    """The innermost frame of the error's traceback: 'modeling_cpmant.py:390 in forward'."""
    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return "?"
    last = frames[-1]
    return f"{Path(last.filename).name}:{last.lineno} in {last.name}"


@contextmanager
def unregistered_model_errors(model: nn.Module) -> Iterator[None]:
    """For a family with no record, an error inside its own code while omniquant calibrates it
    (its blocks called with captured arguments, its outputs read) as one line naming the family,
    the error and where it happened, instead of a traceback. Registered families pass errors
    through unchanged (there, one is a bug to report)."""
    if type(model).__name__ in REGISTRY:
        yield
        return
    try:
        yield
    except (OmniQuantError, torch.OutOfMemoryError):
        raise  # ours already speak in one line; memory is not the family's fault
    except MODEL_CODE_ERRORS as e:
        raise ModelError(
            f"{type(model).__name__} is not a registered architecture and its own code failed "
            f"under calibration ({type(e).__name__}: {e}; {_where(e)}): it is not supported yet"
        ) from e
