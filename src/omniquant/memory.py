"""Keeping a model's loading small: build without allocating weights, hand freed memory back.

Loading a packed model converts one linear at a time; each conversion makes temporaries a few
times the size of what it keeps. The C allocator keeps freed memory in its heap, where the small
packed tensors that stay pin it, so without help the resident memory of a load grows well past
what the model holds (and varies from run to run). `release_free_memory` returns it after each
layer; `parameters_on_meta` keeps the float weights of the layers the file replaces from ever
being allocated.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


def release_free_memory() -> bool:
    """Give the heap's free pages back to the system (glibc's malloc_trim); False where the C
    library has no such call (macOS, musl), where it is a no-op."""
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD_BYTES = 8 << 20


def map_large_allocations(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Have the C allocator give every allocation of `threshold` bytes or more its own mapping,
    returned to the system when freed. glibc's default raises this threshold as large blocks
    are freed (up to 32 MiB), so a block loop's activation-sized temporaries then come from the
    heap, where whatever small allocation stays behind them keeps the freed space resident.
    Measured on one block of Llama-3.1-8B's shape (`benchmarks/block.py`, AMD EPYC, 2 threads):
    peak RSS 2.78 -> 2.45 GiB, time 52.5 -> 57.3 s (fresh mappings are page-faulted in on every
    use), so the block loop does this for streamed runs only, where memory is the point.
    Process-wide and permanent (glibc has no way back to its adaptive threshold); False where
    the C library has no mallopt (macOS, musl)."""
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold))


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside this context put their parameters on the meta device: a model's
    float weights are never allocated, only what is later assigned. Buffers stay real (rotary
    frequencies and the like are computed when the model is built and are not in a file)."""
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = register_on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]
