"""Where the block loop keeps its calibration activations, and how much memory the run uses.

The loop keeps per-batch hidden states (B, T, C) of two chains: the float chain (block l's inputs,
then, overwritten batch by batch, its targets F(W, X_fp)) and the quantized chain (X_q, then
overwritten by F(Q(W), X_q)); with `aug_loss`, a third store holds F(W, X_q) while the block
trains. An `ActivationStore` holds one such chain in a chosen dtype, in RAM while the shared
`MemoryBudget` allows, beyond it in raw files under a spill folder, read back memory-mapped one
batch at a time. Spilling changes where the bytes are, never their values.
"""

from __future__ import annotations

import logging
import os
import resource
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

GiB = 1 << 30
STORE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class MemoryBudget:
    """Bytes of activations that may stay in RAM (None: no limit), shared by every store of a
    run; what does not fit goes to files in `folder` (a temporary folder when None)."""

    limit: int | None = None
    folder: Path | None = None
    ram_bytes: int = 0  # held in RAM now, every store together
    peak_ram_bytes: int = 0
    disk_bytes: int = 0  # held in spill files now
    spilled_bytes: int = 0  # written to spill files over the run (rewrites included)
    _tmp: Path | None = field(default=None, repr=False)

    def fits(self, nbytes: int) -> bool:
        return self.limit is None or self.ram_bytes + nbytes <= self.limit

    def take(self, nbytes: int) -> None:
        self.ram_bytes += nbytes
        self.peak_ram_bytes = max(self.peak_ram_bytes, self.ram_bytes)

    def spill_folder(self) -> Path:
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            return self.folder
        if self._tmp is None:
            self._tmp = Path(tempfile.mkdtemp(prefix="omniquant-spill-"))
        return self._tmp

    def cleanup(self) -> None:
        """Delete the spill files (the folder too when it was a temporary one)."""
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
        elif self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
        self.disk_bytes = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "activation_budget_bytes": self.limit,
            "activation_peak_ram_bytes": self.peak_ram_bytes,
            "spilled_bytes": self.spilled_bytes,
        }


@dataclass
class _Spilled:
    path: Path
    shape: torch.Size
    nbytes: int


class ActivationStore:
    """One chain's per-batch tensors in `dtype`: indexable, assignable in place, sliceable.

    `store[j]` is batch j in the stored dtype (callers convert to the compute dtype on the
    device); `store[j] = t` replaces it (converted to the stored dtype). A float32 store of
    float32 tensors keeps them as they are, so the arithmetic is the same as with plain lists.
    """

    def __init__(self, name: str, dtype: torch.dtype, budget: MemoryBudget) -> None:
        self.name = name
        self.dtype = dtype
        self.budget = budget
        self._items: list[torch.Tensor | _Spilled] = []

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (self[j] for j in range(len(self)))

    def __getitem__(self, j: Any) -> Any:
        if isinstance(j, slice):
            return StoreView(self, range(len(self))[j])
        item = self._items[j]
        if isinstance(item, torch.Tensor):
            return item
        raw = torch.from_file(str(item.path), shared=False, size=item.nbytes, dtype=torch.uint8)
        return raw.view(self.dtype).view(item.shape)

    def __setitem__(self, j: int, t: torch.Tensor) -> None:
        self._free(j)
        self._items[j] = self._place(j, t)

    def append(self, t: torch.Tensor) -> None:
        self._items.append(self._place(len(self._items), t))

    def _place(self, j: int, t: torch.Tensor) -> torch.Tensor | _Spilled:
        t = t.detach().to("cpu", self.dtype)
        nbytes = t.numel() * t.element_size()
        if self.budget.fits(nbytes):
            self.budget.take(nbytes)
            return t
        # a new file each time (written, then renamed over the old one): a batch read earlier
        # keeps its own mapping of the old contents
        path = self.budget.spill_folder() / f"{self.name}-{j:05d}.bin"
        tmp = path.with_suffix(".tmp")
        t.contiguous().view(torch.uint8).numpy().tofile(tmp)
        os.replace(tmp, path)
        self.budget.disk_bytes += nbytes
        self.budget.spilled_bytes += nbytes
        return _Spilled(path, t.shape, nbytes)

    def _free(self, j: int) -> None:
        item = self._items[j]
        if isinstance(item, torch.Tensor):
            self.budget.ram_bytes -= item.numel() * item.element_size()
        else:
            self.budget.disk_bytes -= item.nbytes
            item.path.unlink(missing_ok=True)

    def clear(self) -> None:
        """Drop every batch (RAM given back to the budget, files deleted)."""
        for j in range(len(self._items)):
            self._free(j)
        self._items = []

    @property
    def spilled(self) -> int:
        """How many batches live in files."""
        return sum(isinstance(item, _Spilled) for item in self._items)

    @classmethod
    def of(
        cls, name: str, dtype: torch.dtype, budget: MemoryBudget, tensors: Any
    ) -> ActivationStore:
        store = cls(name, dtype, budget)
        for t in tensors:
            store.append(t)
        return store


class StoreView:
    """Batches `indices` of a store (what slicing a store returns)."""

    def __init__(self, store: ActivationStore, indices: range) -> None:
        self.store = store
        self.indices = indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: Any) -> Any:
        if isinstance(j, slice):
            return StoreView(self.store, self.indices[j])
        return self.store[self.indices[j]]

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (self.store[j] for j in self.indices)


# ---------------------------------------------------------------- what the process used


def _proc_kib(path: str, key: str) -> int | None:
    """A "key: N kB" field of a /proc file, in bytes (None where the file or field is missing)."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int:
    """The process's peak resident set size (Linux: VmHWM; elsewhere getrusage)."""
    hwm = _proc_kib("/proc/self/status", "VmHWM")
    if hwm is not None:
        return hwm
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if os.uname().sysname == "Darwin" else rss * 1024


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (None where there is none)."""
    return _proc_kib("/proc/meminfo", "MemAvailable")


def peak_device_bytes(device: torch.device) -> int | None:
    """Peak memory the CUDA caching allocator handed out on the device; None on the CPU."""
    if device.type != "cuda":
        return None
    return int(torch.cuda.max_memory_allocated(device))


def parse_bytes(text: str) -> int:
    """'24GB', '24G', '1.5GiB', '800MB', '123456' -> bytes (K/M/G/T as powers of 1024)."""
    s = text.strip().upper().removesuffix("B").removesuffix("I")
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    scale = units.get(s[-1:], 1) if s else 1
    number = s[:-1] if s[-1:] in units else s
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"not a memory size: {text!r} (use e.g. 24GB, 1.5GiB, 800MB)") from None
    if value <= 0:
        raise ValueError(f"a memory size must be positive, got {text!r}")
    return int(value * scale)


def gib(n: float | None) -> str:
    return "n/a" if n is None else f"{n / GiB:.2f} GiB"


# ---------------------------------------------------------------- the run's memory plan

# a training block: its float32 weights, Q(W) of every linear (kept for the backward pass), the
# quantizer's per-weight temporaries and what autograd keeps: about 4 blocks, measured (peak RSS
# 4.26 GiB minus ~0.6 GiB for the process, on a 0.81 GiB block of Llama-3.1-8B's shape)
WORK_FACTOR_TRAIN = 4
# with --recompute: the weights and one linear's temporaries at a time (quant/recompute.py)
WORK_FACTOR_RECOMPUTE = 2
WORK_FACTOR_RTN = 2  # no training: the weights and one quantized copy at a time
# weight training adds, per weight: the offset Δ, its gradient, AdamW's two moments, and the
# guard's two copies (the last good and the best parameters)
WORK_FACTOR_OFFSETS = 6


def work_factor(trains: bool, recompute: bool, trains_weights: bool) -> int:
    """A calibrated block's working set in float32 blocks (see the constants above)."""
    if not trains:
        return WORK_FACTOR_RTN
    factor = WORK_FACTOR_RECOMPUTE if recompute else WORK_FACTOR_TRAIN
    return factor + (WORK_FACTOR_OFFSETS if trains_weights else 0)


BASE_BYTES = 1 * GiB  # the interpreter, torch, transformers, the tokenizer and the text


@dataclass(frozen=True)
class MemoryPlan:
    """What a run keeps in RAM, from the model's shape alone (before any weight is read).

    `block_bytes`: the largest block in float32; `outside_bytes`: everything outside the blocks
    in float32 (embeddings, final norm, lm_head); `resident_bytes`: the weights held throughout
    (the whole model when it is loaded in memory, nothing when streamed); `batch_bytes`: one
    batch's hidden state (B, T, C) in float32, the compute dtype; `n_batches` per chain, stored
    in `store_itemsize` bytes per value; `copies`: chains held at once by the block loop.
    """

    max_memory: int
    stream: bool
    block_bytes: int
    work_bytes: int  # the block while it is calibrated
    outside_bytes: int
    resident_bytes: int
    batch_bytes: int
    n_batches: int
    store_itemsize: int
    copies: int
    given: bool = True  # False: `max_memory` is the default, from the machine's free memory

    @property
    def chain_bytes(self) -> int:
        """One chain of activations (every batch) in the stored dtype."""
        return self.n_batches * self.batch_bytes * self.store_itemsize // 4

    @property
    def fixed_bytes(self) -> int:
        """Everything but the activation stores, during the block loop."""
        return BASE_BYTES + self.resident_bytes + self.work_bytes

    @property
    def activation_budget(self) -> int:
        """RAM the activation stores may hold; beyond it they spill to files."""
        return self.max_memory - self.fixed_bytes

    @property
    def minimum(self) -> int:
        """The least --max-memory that can run: the fixed part plus a float32 batch in flight
        per chain and one more (everything else spilled)."""
        return self.fixed_bytes + (self.copies + 1) * self.batch_bytes

    def predicted_peak(self) -> int:
        """Peak RSS expected: the capture (the model when it is held in memory, and one chain
        in float32) or the block loop (the fixed part, the activations it keeps in RAM and a
        batch in flight)."""
        in_ram = min(self.copies * self.chain_bytes, max(self.activation_budget, 0))
        # streamed, the capture reads only the embedding rows the windows use (next to nothing)
        capture = BASE_BYTES + self.resident_bytes + self.n_batches * self.batch_bytes
        return max(capture, self.fixed_bytes + in_ram + self.batch_bytes)

    def check(self, model: str) -> None:
        """Refuse a budget too small for one block, naming the numbers."""
        if self.max_memory >= self.minimum:
            return
        from omniquant.errors import ConfigError

        resident = "" if self.stream else f", the model held in memory {gib(self.resident_bytes)}"
        budget = (
            f"`max_memory` {gib(self.max_memory)}"
            if self.given
            else f"the free memory {gib(self.max_memory)} (the default budget: `max_memory` "
            f"was not given)"
        )
        raise ConfigError(
            f"{budget} is too small for {model}: one block takes "
            f"{gib(self.block_bytes)} in float32 ({gib(self.work_bytes)} while it is calibrated)"
            f"{resident}, the process itself about {gib(BASE_BYTES)}, and one batch of "
            f"activations {gib(self.batch_bytes)} for each of {self.copies} chains plus one in "
            f"flight: give at least {gib(self.minimum)}"
            + ("" if self.stream else "; or `stream` to read one block at a time from disk")
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "max_memory_bytes": self.max_memory,
            "max_memory_given": self.given,
            "stream": self.stream,
            "block_bytes": self.block_bytes,
            "activation_chain_bytes": self.chain_bytes,
            "activation_copies": self.copies,
            "activation_budget_bytes": self.activation_budget,
            "predicted_peak_bytes": self.predicted_peak(),
        }


def default_max_memory() -> int:
    """What the machine has free now minus a margin (2 GiB or a tenth, the larger)."""
    free = available_memory_bytes()
    if free is None:
        return 1 << 62  # unknown: no limit
    return max(free - max(2 * GiB, free // 10), 0)
