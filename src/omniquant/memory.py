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
