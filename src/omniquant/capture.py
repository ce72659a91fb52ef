"""Generic capture of what each decoder block receives, with no per-model code.

Every block of the model is swapped for a `_Recorder` that stores its positional and keyword
arguments (attention mask, rotary tables, position ids, cache position, ...) and passes the hidden
state through unchanged; the model's own forward then builds every argument for every block
(Gemma 3's
sliding-window layers get their own mask and rotary table this way), and the last recorder stops the
forward before the final norm and lm_head run. Only block 0's hidden-state input is kept per batch;
the other arguments depend on the sequence shape only, so they are kept from the first batch.
Everything captured lives on the CPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class BlockArgs:
    """The extra arguments one block receives besides its hidden-state input (CPU tensors)."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]


@dataclass
class CapturedInputs:
    """Block 0's hidden-state inputs per batch, and every block's other arguments."""

    hidden: list[torch.Tensor]  # per batch: (B, T, C) on the CPU
    block_args: list[BlockArgs]  # per block


class _StopForward(Exception):
    """Raised by the last recorder: nothing after the blocks needs to run."""


def map_tensors(obj: Any, fn: Any) -> Any:
    """Apply fn to every tensor inside nested tuples, lists and dicts; other values are kept."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple):
        return tuple(map_tensors(o, fn) for o in obj)
    if isinstance(obj, list):
        return [map_tensors(o, fn) for o in obj]
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    return obj


class _Recorder(nn.Module):
    """Stands in for one block during capture; attribute reads fall through to the real block."""

    def __init__(self, index: int, block: nn.Module, sink: _Sink) -> None:
        super().__init__()
        self.index = index
        self.block = block
        self.sink = sink

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["block"], name)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.sink.record(self.index, hidden_states, args, kwargs)


class _Sink:
    """Collects what the recorders see."""

    def __init__(self, n_blocks: int) -> None:
        self.n_blocks = n_blocks
        self.hidden: list[torch.Tensor] = []
        self.block_args: list[BlockArgs] = []
        self._cpu_copies: dict[int, torch.Tensor] = {}

    def _cpu(self, t: torch.Tensor) -> torch.Tensor:
        # the same mask / rotary tensor is passed to many blocks: copy it once
        key = id(t)
        if key not in self._cpu_copies:
            self._cpu_copies[key] = t.detach().to("cpu")
        return self._cpu_copies[key]

    def record(
        self, index: int, hidden: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> torch.Tensor:
        if index == 0:
            self.hidden.append(hidden.detach().to("cpu"))
        if len(self.block_args) == index:  # first batch: keep every block's other arguments
            self.block_args.append(
                BlockArgs(map_tensors(args, self._cpu), map_tensors(kwargs, self._cpu))
            )
        done = len(self.block_args) == self.n_blocks
        if index == self.n_blocks - 1 or (done and index == 0):
            raise _StopForward
        return hidden


def _outside_blocks(model: nn.Module, blocks: nn.ModuleList) -> Iterator[nn.Module]:
    """The model's leaf-most children that are not (inside) the block list."""
    for child in model.children():
        if child is blocks:
            continue
        if any(m is blocks for m in child.modules()):
            yield from _outside_blocks(child, blocks)
        else:
            yield child


def move_outside_blocks(
    model: nn.Module, blocks: nn.ModuleList, device: torch.device | str
) -> None:
    """Move embeddings, rotary tables, final norm, lm_head... (everything but the blocks)."""
    for module in _outside_blocks(model, blocks):
        if not any(p.is_meta for p in module.parameters()):  # meta: not read from disk (stream)
            module.to(device)
    for name, buf in list(model.named_buffers(recurse=False)):
        setattr(model, name, buf.to(device))


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module,
    blocks: nn.ModuleList,
    batches: Sequence[torch.Tensor],
    device: torch.device | str = "cpu",
) -> CapturedInputs:
    """Run the model's own forward on each batch of token ids (B, T) up to block 0."""
    sink = _Sink(len(blocks))
    originals = list(blocks)
    for i, block in enumerate(originals):
        blocks[i] = _Recorder(i, block, sink)
    move_outside_blocks(model, blocks, device)
    try:
        for ids in batches:
            with contextlib.suppress(_StopForward):
                model(input_ids=ids.to(device), use_cache=False)
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block
        move_outside_blocks(model, blocks, "cpu")
    return CapturedInputs(hidden=sink.hidden, block_args=sink.block_args)
