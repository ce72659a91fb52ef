"""Where and in which precision a run computes: the device (checked) and the autocast dtype."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from omniquant.errors import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Runtime:
    """Where and in which precision the block loop runs."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    autocast_dtype: torch.dtype | None = None  # None: plain float32
    progress: bool = True

    def autocast(self) -> Any:
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)


def check_device(device: str) -> torch.device:
    """The device, refused unless it is the CPU or an available CUDA device."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"unknown device {device!r}; use `device` cpu or cuda (cuda:N)") from e
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {device!r} is not supported; use `device` cpu or cuda (cuda:N)")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"`device` {device} was asked but no CUDA device is available; use `device` cpu"
        )
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(
            f"`device` {device}: there are only {torch.cuda.device_count()} CUDA devices"
        )
    return dev


def runtime_for(device: str, dtype: str = "auto", progress: bool = True) -> Runtime:
    """Device and autocast choice: 'auto' is float32 on the CPU and bf16 autocast on CUDA."""
    dev = check_device(device)
    if dtype == "auto":
        autocast = torch.bfloat16 if dev.type == "cuda" else None
    elif dtype in DTYPES:
        autocast = None if dtype == "float32" else DTYPES[dtype]
    else:
        raise ConfigError(f"dtype must be auto, {', '.join(DTYPES)}; got {dtype!r}")
    return Runtime(device=dev, autocast_dtype=autocast, progress=progress)
