"""Learnable Weight Clipping (LWC).

Each group of a weight (each output row, or each g input channels of a row) learns two logits a, b;
the clipping strengths γ = sigmoid(a) and β = sigmoid(b) scale the group's max and min
before min-max
quantization (see `primitives.minmax_params`). a = b = 4.0 at initialisation, so γ = β ≈ 0.982.
With `learnable=False` the strengths stay at 1 and the module is plain round-to-nearest.
"""

from __future__ import annotations

import weakref
from typing import NamedTuple

import torch
from torch import nn

from omniquant.config import WeightQuant
from omniquant.quant.primitives import (
    AffineParams,
    fake_quantize_grouped,
    from_groups,
    num_groups,
    range_params,
    to_groups,
)


class _Grouped(NamedTuple):
    wg: torch.Tensor  # (out, n_groups, g)
    wmax: torch.Tensor  # (out, n_groups, 1)
    wmin: torch.Tensor  # (out, n_groups, 1)


class LWC(nn.Module):
    """Fake-quantizes a weight (out, in) with learned clipping; usable as a parametrization."""

    def __init__(
        self,
        out_features: int,
        in_features: int,
        spec: WeightQuant,
        learnable: bool = True,
        init: float = 4.0,
        zero_point_ste: bool = True,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.zero_point_ste = zero_point_ste
        self.in_features = in_features
        shape = (out_features, num_groups(in_features, spec.group_size), 1)
        self.learnable = learnable
        if learnable:
            self.upper_logit = nn.Parameter(torch.full(shape, float(init)))  # a
            self.lower_logit = nn.Parameter(torch.full(shape, float(init)))  # b
        # the grouped form of the last frozen weight seen, with a weak reference to that tensor:
        # a hit needs the same live tensor at the same version, so a freed temporary (LET's
        # transformed weight) can never match a new tensor that reuses its memory
        self._cache: tuple[weakref.ref[torch.Tensor], int, _Grouped] | None = None
        self.last_params: AffineParams | None = None  # scale/zero of the latest forward

    def clear_cache(self) -> None:
        """Drop the grouped weight kept for frozen weights: it is a view of the weight, so after
        folding (which gives the linear a new tensor) it alone would keep the old one alive."""
        self._cache = None

    def strengths(self) -> tuple[torch.Tensor | float, torch.Tensor | float]:
        """(γ, β): the fraction of the max and of the min that the grid spans."""
        if not self.learnable:
            return 1.0, 1.0
        return torch.sigmoid(self.upper_logit), torch.sigmoid(self.lower_logit)

    def _grouped(self, weight: torch.Tensor) -> _Grouped:
        """The weight as float32 groups and their ranges; cached while the weight is frozen."""
        if weight.requires_grad:  # the weight itself trains: groups must carry its gradient
            wg = to_groups(weight.float(), self.spec.group_size)
            return _Grouped(wg, wg.amax(dim=-1, keepdim=True), wg.amin(dim=-1, keepdim=True))
        if self._cache is not None:
            ref, version, grouped = self._cache
            if ref() is weight and weight._version == version:
                return grouped
        with torch.no_grad():
            wg = to_groups(weight.detach().float(), self.spec.group_size)
            grouped = _Grouped(wg, wg.amax(dim=-1, keepdim=True), wg.amin(dim=-1, keepdim=True))
        self._cache = (weakref.ref(weight), weight._version, grouped)
        return grouped

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        upper, lower = self.strengths()
        g = self._grouped(weight)
        p = range_params(
            upper * g.wmax, lower * g.wmin, self.spec.bits, self.spec.symmetric, self.zero_point_ste
        )
        self.last_params = AffineParams(p.scale.detach(), p.zero.detach())
        wq = fake_quantize_grouped(g.wg, p, self.spec.bits, self.spec.symmetric)
        return from_groups(wq, self.in_features).to(weight.dtype)

    def extra_repr(self) -> str:
        return f"{self.spec.label}, learnable={self.learnable}"
