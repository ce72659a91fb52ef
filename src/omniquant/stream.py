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

import functools
import json
import logging
import math
import os
import shutil
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from omniquant.errors import ModelError
from omniquant.memory import release_free_memory
from omniquant.model_io import hub_options, one_line, resolve_model_path
from omniquant.quant.qparams import drop_grids, grid_tensors

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
CHUNK_BYTES = 64 << 20  # big tensors are read and written in row blocks of about this size


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

    def read(self, keys: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """(key, tensor) for each of `keys`, one at a time (a caller that converts and keeps
        each before taking the next never holds two copies of a block); each file is opened
        once and closed after, its mapping dropped."""
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for key in keys:
            by_file.setdefault(self.files[key], []).append(key)
        for file, names in by_file.items():
            try:
                with safe_open(str(file), "pt") as f:
                    for key in names:
                        yield key, f.get_tensor(key)
            except ModelError:
                raise
            except Exception as e:  # safetensors' own errors on a truncated file
                raise ModelError(f"could not read {file}: {one_line(e)}") from e

    def shape(self, key: str) -> tuple[int, ...]:
        from safetensors import safe_open

        with safe_open(str(self.files[key]), "pt") as f:
            return tuple(f.get_slice(key).get_shape())

    def chunks(self, key: str, dtype: torch.dtype | None) -> Iterator[torch.Tensor]:
        """The tensor `key` in row blocks of about CHUNK_BYTES, converted to `dtype` (None:
        as stored): a big tensor (an embedding, an lm_head) never sits in memory whole."""
        from safetensors import safe_open

        with safe_open(str(self.files[key]), "pt") as f:
            part = f.get_slice(key)
            shape = part.get_shape()
            if not shape:
                yield f.get_tensor(key).to(dtype or f.get_tensor(key).dtype)
                return
            row = max(1, math.prod(shape[1:])) * 4
            step = max(1, CHUNK_BYTES // row)
            for start in range(0, shape[0], step):
                chunk = part[start : start + step]
                yield chunk if dtype is None or not chunk.is_floating_point() else chunk.to(dtype)

    def rows(self, key: str, index: torch.Tensor) -> torch.Tensor:
        """Rows `index` (sorted, unique) of the matrix `key` in float32, read in row blocks."""
        picked = []
        start = 0
        for chunk in self.chunks(key, None):
            stop = start + chunk.shape[0]
            lo, hi = torch.searchsorted(index, torch.tensor([start, stop]))
            picked.append(chunk[index[lo:hi] - start].to(torch.float32))
            start = stop
        return torch.cat(picked)


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
    wanted = {}
    for name, key in keys.items():
        if key in source:
            wanted.setdefault(key, []).append(name)
    for key, value in source.read(wanted):
        if value.is_floating_point():
            value = value.to(torch.float32)
        for name in wanted[key]:
            if tuple(value.shape) != tuple(state[name].shape):
                raise ModelError(
                    f"{source.folder}: {key} has shape {tuple(value.shape)} where the model "
                    f"expects {tuple(state[name].shape)}"
                )
            _set_tensor(model, name, value)
        del value


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


SAFETENSORS_DTYPES = {
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


@dataclass
class Entry:
    """One tensor to write: its name, dtype, shape and its bytes as row blocks."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    chunks: Callable[[], Iterable[torch.Tensor]]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()

    @classmethod
    def of(cls, name: str, t: torch.Tensor) -> Entry:
        t = t.detach().to("cpu").contiguous()
        return cls(name, t.dtype, tuple(t.shape), lambda: [t])


def write_safetensors(path: Path, entries: list[Entry], metadata: dict[str, str]) -> None:
    """A safetensors file written block by block: an 8-byte little-endian header length, the
    JSON header (name -> dtype, shape, [start, end) offsets into the data, padded with spaces
    to 8 bytes), then each tensor's bytes in order. Nothing is held but one row block."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for e in entries:
        header[e.name] = {
            "dtype": SAFETENSORS_DTYPES[e.dtype],
            "shape": list(e.shape),
            "data_offsets": [offset, offset + e.nbytes],
        }
        offset += e.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for e in entries:
            written = 0
            for chunk in e.chunks():
                chunk = chunk.to(e.dtype).contiguous()
                f.write(chunk.view(torch.uint8).numpy().data if chunk.numel() else b"")
                written += chunk.numel() * chunk.element_size()
            if written != e.nbytes:
                raise ValueError(f"{e.name}: wrote {written} bytes, expected {e.nbytes}")


class ShardWriter:
    """Writes the output model as safetensors shards, one at a time, and their index."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.weight_map: dict[str, str] = {}
        self.sizes: dict[str, int] = {}

    def write(self, shard: str, entries: list[Entry]) -> None:
        file = f"{shard}.safetensors"
        tmp = self.folder / f"{shard}.tmp"
        write_safetensors(tmp, entries, {"format": "pt"})
        tmp.replace(self.folder / file)
        for e in entries:
            self.weight_map[e.name] = file
            self.sizes[e.name] = e.nbytes

    def finish(self) -> None:
        index = {
            "metadata": {"total_size": sum(self.sizes.values())},
            "weight_map": dict(sorted(self.weight_map.items())),
        }
        (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2))


GRID_PARTS = "grids.parts"  # in the stage folder: each block's grid until the run ends
TORCH_DTYPES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


def safetensors_header(path: Path) -> dict[str, Any]:
    """A safetensors file's header: name -> dtype, shape, data offsets (and __metadata__)."""
    with path.open("rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(size))


def _stored(path: Path, name: str) -> Callable[[], Iterable[torch.Tensor]]:
    def chunks() -> list[torch.Tensor]:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            return [f.get_tensor(name)]

    return chunks


def merge_grid_parts(folder: Path, out: Path) -> bool:
    """Write the blocks' grid files (`folder/GRID_PARTS`) as one safetensors file `out`, one
    tensor in memory at a time, and delete them; False when there are none."""
    parts = sorted((folder / GRID_PARTS).glob("block-*.safetensors"))
    entries = []
    for part in parts:
        for name, info in safetensors_header(part).items():
            if name != "__metadata__":
                dtype = TORCH_DTYPES[info["dtype"]]
                entries.append(Entry(name, dtype, tuple(info["shape"]), _stored(part, name)))
    if entries:
        write_safetensors(out, entries, {"format": "pt"})
    shutil.rmtree(folder / GRID_PARTS, ignore_errors=True)
    return bool(entries)


class StreamedBlocks:
    """The block loop's weights (`calibrate.BlockWeights`): block i read from the files before
    its calibration; after it, the quantized block written as shard `block-<i>` and its grid to
    `GRID_PARTS`, then both dropped (a 70B model's grids alone are ~4 GB)."""

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
        entries = [Entry.of(prefix + k, v) for k, v in block.state_dict().items()]
        self.writer.write(f"block-{index:05d}", entries)
        del entries
        grids = grid_tensors(block, prefix)
        if grids:
            parts = self.writer.folder / GRID_PARTS
            parts.mkdir(exist_ok=True)
            tmp = parts / f"block-{index:05d}.tmp"
            write_safetensors(tmp, [Entry.of(k, v) for k, v in grids.items()], {})
            tmp.replace(parts / f"block-{index:05d}.safetensors")
            drop_grids(block)
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
    state = model.state_dict(keep_vars=True)
    for k, name in enumerate(names):
        key = name if name in source else tied.get(name, name)
        if name == head and quantize_head is not None:
            fill(model, source, [name])
            entry = Entry.of(name, quantize_head(model.get_parameter(name).detach()))
            drop(model, [name])
        elif key in source:  # copied in row blocks, converted to float32
            value = state[name]
            dtype = torch.float32 if value.is_floating_point() else value.dtype
            shape = source.shape(key)
            entry = Entry(name, dtype, shape, functools.partial(source.chunks, key, dtype))
        else:  # a buffer the model builds itself
            entry = Entry.of(name, state[name])
        writer.write(f"rest-{k:05d}", [entry])


def capture_embedding(
    model: nn.Module, source: SafetensorsWeights, module_name: str, batches: list[torch.Tensor]
) -> tuple[list[torch.Tensor], Callable[[], None]]:
    """Fill the token embedding with only the rows the calibration windows use (read in row
    blocks) and renumber the windows' ids to match: the model's own forward then embeds them
    exactly as with the whole table, which never sits in memory. Returns the renumbered batches
    and a function that puts the embedding back on the meta device."""
    module = model.get_submodule(module_name)
    name = f"{module_name}.weight"
    tied = tied_sources(model)
    key = name if name in source else tied.get(name, name)
    if key not in source:
        raise ModelError(f"{source.folder}: the safetensors files lack {name}")
    original = module.weight
    used = torch.cat([b.flatten() for b in batches]).unique()  # sorted
    _set_tensor(model, name, source.rows(key, used))
    padding_idx = getattr(module, "padding_idx", None)
    module.padding_idx = None  # only the gradient depends on it; it may lie beyond the rows

    def restore() -> None:
        _set_tensor(model, name, original)
        module.padding_idx = padding_idx
        release_free_memory()

    return [torch.searchsorted(used, b) for b in batches], restore
