"""The integer form of a quantized linear: unsigned codes, scales and zero points.

Calibration leaves every quantized linear with a fake-quantized float weight that lies on a grid.
`LinearQParams` is that grid: per row and group, a float scale `h` and an unsigned zero point `z`,
so that  w = (u - z) * h  with unsigned codes u in [0, 2^bits - 1]. A symmetric grid (signed codes
q in [-2^(bits-1), 2^(bits-1) - 1], zero 0) is stored the same way with u = q + 2^(bits-1) and
z = 2^(bits-1). Groups follow `primitives.to_groups`: g consecutive input channels, the last group
of a row holding the remainder when g does not divide the width.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from omniquant.config import WeightQuant
from omniquant.errors import ExportError
from omniquant.quant.primitives import (
    AffineParams,
    effective_group_size,
    from_groups,
    qrange,
    to_groups,
)

QPARAMS_ATTR = "omniquant_qparams"  # where a quantized nn.Linear keeps its LinearQParams


@dataclass(frozen=True)
class LinearQParams:
    """Scale (out, n_groups) float32 and unsigned zero point (out, n_groups) uint8 of a linear."""

    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    group: int  # the width of a group: in_features for per-channel (never None)
    in_features: int

    @property
    def n_groups(self) -> int:
        return self.scale.shape[1]

    @property
    def ragged(self) -> bool:
        """Whether the last group of a row is shorter than the others."""
        return self.in_features % self.group != 0


def from_affine(p: AffineParams, spec: WeightQuant, in_features: int) -> LinearQParams:
    """LinearQParams from a quantizer's (out, n_groups, 1) scale and zero point."""
    qmin, qmax = qrange(spec.bits, spec.symmetric)
    zero = (p.zero.squeeze(-1) - qmin).round()
    if ((zero < 0) | (zero > qmax - qmin)).any():
        raise ExportError(
            "a zero point lies outside the integer grid (a group whose values all have one sign); "
            "this weight cannot be stored as unsigned codes with an in-range zero point"
        )
    return LinearQParams(
        scale=p.scale.squeeze(-1).detach().float().cpu().contiguous(),
        zero=zero.detach().to(torch.uint8).cpu().contiguous(),
        bits=spec.bits,
        group=effective_group_size(in_features, spec.group_size),
        in_features=in_features,
    )


def weight_codes(weight: torch.Tensor, qp: LinearQParams) -> torch.Tensor:
    """The unsigned codes (out, in) uint8 of a weight that lies on the grid of `qp`.

    Raises ExportError when the weight is not on the grid (it was changed after quantization).
    """
    wg = to_groups(weight.detach().float().cpu(), qp.group)  # (out, n_groups, g)
    scale, zero = qp.scale.unsqueeze(-1), qp.zero.float().unsqueeze(-1)
    codes = (wg / scale + zero).round()
    if ((codes < 0) | (codes > 2**qp.bits - 1)).any():
        raise ExportError("weight values fall outside the quantization grid of their layer")
    back = (codes - zero) * scale
    if not torch.allclose(back, wg, rtol=1e-3, atol=1e-3 * float(scale.max())):
        raise ExportError(
            "weight values are not on the grid their scales define: was the model changed "
            "after quantization?"
        )
    return from_groups(codes, qp.in_features).to(torch.uint8)


def dequantize(codes: torch.Tensor, qp: LinearQParams, dtype: torch.dtype) -> torch.Tensor:
    """(u - z) * h as a float weight (out, in)."""
    cg = to_groups(codes.float(), qp.group)
    w = (cg - qp.zero.float().unsqueeze(-1)) * qp.scale.unsqueeze(-1)
    return from_groups(w, qp.in_features).to(dtype)


def expand_groups(t: torch.Tensor, qp: LinearQParams, to_group: int) -> torch.Tensor:
    """Per-group values (out, n_groups) repeated for a finer uniform group size `to_group`.

    A ragged grid (576 = 4 x 128 + 64) is a uniform grid of g = 64 whose scales repeat: that is
    what lets a uniform-group kernel run it. `to_group` must divide both g and in_features.
    """
    assert qp.group % to_group == 0 and qp.in_features % to_group == 0
    reps = qp.group // to_group
    full = t.repeat_interleave(reps, dim=1)
    return full[:, : qp.in_features // to_group]


GRIDS_FILE = "quant_grids.safetensors"  # beside a fake-quantized model: its scales, zero points


def grid_tensors(module: torch.nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every linear's grid under `module` as GRIDS_FILE's tensors (`<name>.scales`, `.zeros`;
    names prefixed with `prefix`, e.g. a block's `model.layers.3.`)."""
    state: dict[str, torch.Tensor] = {}
    for name, sub in module.named_modules():
        qp = getattr(sub, QPARAMS_ATTR, None)
        if qp is not None:
            state[f"{prefix}{name}.scales"] = qp.scale
            state[f"{prefix}{name}.zeros"] = qp.zero
    return state


def drop_grids(module: torch.nn.Module) -> None:
    """Forget the grids recorded on the linears under `module` (once they are on disk)."""
    for sub in module.modules():
        if hasattr(sub, QPARAMS_ATTR):
            delattr(sub, QPARAMS_ATTR)


def save_grids(model: torch.nn.Module, folder: Path) -> bool:
    """Write every linear's grid to `folder/GRIDS_FILE`; False when the model has none."""
    from safetensors.torch import save_file

    state = grid_tensors(model)
    if not state:
        return False
    save_file(state, str(folder / GRIDS_FILE))
    return True


def attach_grids(model: torch.nn.Module, folder: Path, spec: WeightQuant) -> int:
    """Read `folder/GRIDS_FILE` back onto the model's linears; returns how many."""
    from safetensors.torch import load_file

    path = folder / GRIDS_FILE
    if not path.is_file():
        return 0
    state = load_file(str(path))
    names = {k.rpartition(".")[0] for k in state}
    for name in names:
        linear = model.get_submodule(name)
        setattr(
            linear,
            QPARAMS_ATTR,
            LinearQParams(
                scale=state[f"{name}.scales"],
                zero=state[f"{name}.zeros"],
                bits=spec.bits,
                group=effective_group_size(linear.in_features, spec.group_size),
                in_features=linear.in_features,
            ),
        )
    return len(names)
