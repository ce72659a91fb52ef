"""Calibrating a model larger than memory: weights streamed from its safetensors files.

The model is built as a skeleton on the meta device (`api.model_skeleton`): its modules, widths
and buffers, no weights. `SafetensorsWeights` reads tensors by name from the model's files
(memory-mapped by safetensors, one file handle per read, so pages do not stay mapped). Before
capture, the modules outside the blocks (embeddings, and whatever else runs before block 0)
are filled in and dropped again after; `StreamedBlocks` fills block i in float32 when the loop
reaches it, and after calibration writes the quantized block to its own shard of the output
folder and drops it. `write_rest` writes what lies outside the blocks (embeddings, final norm,
lm_head, RTN-quantized when asked) tensor by tensor, and `finish` the shard index. The result
is the folder `save_pretrained` writes for the same model in memory: the same tensor names and
values (float32), in other shard files.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from omniquant.errors import ModelError
from omniquant.memory import release_free_memory
from omniquant.model_io import hub_options, one_line, resolve_model_path

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def weights_folder(name: str | os.PathLike[str] | None) -> Path:
    """The local folder of a model's safetensors files: the folder itself, the converted cache
    of a GGUF file or of the embedded default, or the Hub download (cached) of a Hub id."""
    path = resolve_model_path(name)
    if Path(path).is_dir():
        return Path(path)
    from huggingface_hub import snapshot_download

    options = hub_options(path)
    try:
        return Path(
            snapshot_download(
                path,
                allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"],
                local_files_only=bool(options.get("local_files_only")),
            )
        )
    except Exception as e:  # the Hub's own errors (offline, not found, gated)
        raise ModelError(f"could not get the safetensors files of {path!r}: {one_line(e)}") from e


class SafetensorsWeights:
    """A model's tensors by name, read from its safetensors file(s) (sharded or not)."""

    def __init__(self, folder: Path) -> None:
        from safetensors import safe_open

        self.folder = folder
        index = folder / INDEX_FILE
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {key: folder / file for key, file in weight_map.items()}
        else:
            files = sorted(folder.glob("*.safetensors"))
            if not files:
                raise ModelError(f"{folder} holds no .safetensors file to stream weights from")
            self.files = {}
            for file in files:
                with safe_open(str(file), "pt") as f:
                    self.files.update({key: file for key in f.keys()})  # noqa: SIM118

    def __contains__(self, key: str) -> bool:
        return key in self.files

    def read(self, keys: Iterable[str]) -> dict[str, torch.Tensor]:
        """The tensors of `keys`, each file opened once and closed after (its mapping dropped)."""
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for key in keys:
            by_file.setdefault(self.files[key], []).append(key)
        out: dict[str, torch.Tensor] = {}
        for file, names in by_file.items():
            try:
                with safe_open(str(file), "pt") as f:
                    for key in names:
                        out[key] = f.get_tensor(key)
            except Exception as e:  # safetensors' own errors on a truncated file
                raise ModelError(f"could not read {file}: {one_line(e)}") from e
        return out


def tied_sources(model: nn.Module) -> dict[str, str]:
    """Parameter names that share their tensor with an earlier one (a tied lm_head): name ->
    the name that `named_parameters` lists (and a checkpoint stores)."""
    first: dict[int, str] = {}
    tied: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            tied[name] = first[id(p)]
        else:
            first[id(p)] = name
    return tied


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Set a parameter (everywhere it is shared: a tied lm_head stays tied) or a buffer."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if attr not in module._parameters:
        module._buffers[attr] = value
        return
    old = module._parameters[attr]
    new = nn.Parameter(value, requires_grad=old.requires_grad if old is not None else False)
    for m in model.modules():
        for key, p in m._parameters.items():
            if p is old:
                m._parameters[key] = new


def fill(model: nn.Module, source: SafetensorsWeights, names: Iterable[str]) -> None:
    """Give the named parameters / buffers of `model` their values from the files, in float32
    (integer buffers keep their dtype). A name the files lack is an error when the model has no
    value for it (a meta tensor); a tied lm_head reads the tensor it is tied to."""
    names = list(names)
    tied = tied_sources(model)
    state = model.state_dict(keep_vars=True)
    keys = {n: (n if n in source else tied.get(n, n)) for n in names}
    missing = [n for n, k in keys.items() if k not in source and state[n].is_meta]
    if missing:
        raise ModelError(
            f"{source.folder}: the safetensors files lack {len(missing)} tensors of the model "
            f"(e.g. {', '.join(missing[:3])}); is it a plain Hugging Face folder of this model?"
        )
    values = source.read({k for k in keys.values() if k in source})
    for name, key in keys.items():
        if key not in values:
            continue  # a buffer built with the model and not stored
        value = values[key]
        if value.is_floating_point():
            value = value.to(torch.float32)
        if tuple(value.shape) != tuple(state[name].shape):
            raise ModelError(
                f"{source.folder}: {key} has shape {tuple(value.shape)} where the model "
                f"expects {tuple(state[name].shape)}"
            )
        _set_tensor(model, name, value)


def drop(model: nn.Module, names: Iterable[str]) -> None:
    """Put the named parameters back on the meta device (their memory freed)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    for name in names:
        if name in params and not params[name].is_meta:
            _set_tensor(model, name, params[name].detach().to("meta"))
    release_free_memory()


def outside_names(model: nn.Module, layers: str) -> list[str]:
    """State-dict names outside the decoder blocks (embeddings, final norm, lm_head, ...)."""
    return [n for n in model.state_dict() if not n.startswith(layers + ".")]


class ShardWriter:
    """Writes the output model as safetensors shards, one at a time, and their index."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.weight_map: dict[str, str] = {}
        self.sizes: dict[str, int] = {}

    def write(self, shard: str, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        file = f"{shard}.safetensors"
        tmp = self.folder / f"{shard}.tmp"
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        tmp.replace(self.folder / file)
        for key, value in tensors.items():
            self.weight_map[key] = file
            self.sizes[key] = value.numel() * value.element_size()

    def finish(self) -> None:
        index = {
            "metadata": {"total_size": sum(self.sizes.values())},
            "weight_map": dict(sorted(self.weight_map.items())),
        }
        (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2))


class StreamedBlocks:
    """The block loop's weights (`calibrate.BlockWeights`): block i read from the files before
    its calibration; after it, the quantized block written as shard `block-<i>` and dropped."""

    def __init__(
        self, model: nn.Module, layers: str, source: SafetensorsWeights, writer: ShardWriter
    ) -> None:
        self.model = model
        self.layers = layers
        self.source = source
        self.writer = writer

    def _names(self, index: int, block: nn.Module) -> list[str]:
        return [f"{self.layers}.{index}.{k}" for k in block.state_dict()]

    def load(self, index: int, block: nn.Module) -> None:
        fill(self.model, self.source, self._names(index, block))

    def release(self, index: int, block: nn.Module) -> None:
        prefix = f"{self.layers}.{index}."
        self.writer.write(
            f"block-{index:05d}", {prefix + k: v for k, v in block.state_dict().items()}
        )
        block.to("meta")
        release_free_memory()


def write_rest(
    model: nn.Module,
    source: SafetensorsWeights,
    writer: ShardWriter,
    layers: str,
    lm_head: str,
    quantize_head: Any = None,
) -> None:
    """Write the tensors outside the blocks, one at a time, as `save_pretrained` would (float32;
    a tied lm_head left out). `quantize_head(weight) -> weight` rounds the lm_head (which is
    then untied and written)."""
    head = f"{lm_head}.weight"
    tied = tied_sources(model)
    names = [n for n in outside_names(model, layers) if n not in tied]
    if quantize_head is not None and head in tied:
        names.append(head)
    for k, name in enumerate(names):
        fill(model, source, [name])
        value = model.state_dict(keep_vars=True)[name].detach()
        if name == head and quantize_head is not None:
            value = quantize_head(value)
        writer.write(f"rest-{k:05d}", {name: value})
        drop(model, [name])
