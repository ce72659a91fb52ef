"""Uniform affine quantization primitives: pure, typed tensor functions.

A weight of shape (out, in) is viewed as groups of `g` consecutive input channels per output row,
shape (out, n_groups, g). When g does not divide `in`, the last group of each row holds
the remainder;
it is padded up to g by repeating its own last column, which leaves its min and max unchanged, and
the padding is dropped afterwards. Per-channel quantization is the case g = in (one group per row).

Asymmetric:  h = (xmax - xmin) / (2^N - 1),  z = -round(xmin / h),  with xmin <= 0 <= xmax
             (a group of one sign has its range extended to 0, so z always lies on the grid),
             q = clamp(round(w / h) + z, 0, 2^N - 1),  w_dq = (q - z) * h
Symmetric:   h = max(|xmax|, |xmin|) / (2^(N-1) - 1),  z = 0,
             q = clamp(round(w / h), -2^(N-1), 2^(N-1) - 1)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SCALE_MIN = 1e-5  # the scale is clamped to this positive minimum


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity gradient backward (straight-through estimator)."""
    return (x.round() - x).detach() + x


def num_groups(in_features: int, group_size: int | None) -> int:
    """Groups per row: ceil(in / g), or 1 for per-channel."""
    if not group_size or group_size >= in_features:
        return 1
    return math.ceil(in_features / group_size)


def effective_group_size(in_features: int, group_size: int | None) -> int:
    """The g actually used: `in_features` for per-channel."""
    return in_features if not group_size or group_size >= in_features else group_size


def to_groups(w: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """(out, in) -> (out, n_groups, g), padding a ragged last group with its own last column."""
    out_f, in_f = w.shape
    g = effective_group_size(in_f, group_size)
    pad = num_groups(in_f, group_size) * g - in_f
    if pad:
        w = torch.cat([w, w[:, -1:].expand(out_f, pad)], dim=1)  # (out, n_groups * g)
    return w.reshape(out_f, -1, g)  # (out, n_groups, g)


def from_groups(wg: torch.Tensor, in_features: int) -> torch.Tensor:
    """(out, n_groups, g) -> (out, in), dropping the padding of a ragged last group."""
    return wg.reshape(wg.shape[0], -1)[:, :in_features]


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """Smallest and largest integer code."""
    if symmetric:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


@dataclass(frozen=True)
class AffineParams:
    """Scale and zero point per group, each (out, n_groups, 1); zero is integer-valued."""

    scale: torch.Tensor
    zero: torch.Tensor


def minmax_params(
    wg: torch.Tensor,
    bits: int,
    symmetric: bool = False,
    upper: torch.Tensor | float = 1.0,
    lower: torch.Tensor | float = 1.0,
) -> AffineParams:
    """Min-max scale and zero point of grouped weights (out, n_groups, g).

    `upper` (γ) and `lower` (β) shrink the max and the min: they are LWC's clipping strengths,
    1.0 gives plain min-max round-to-nearest.
    """
    xmax = upper * wg.amax(dim=-1, keepdim=True)  # (out, n_groups, 1)
    xmin = lower * wg.amin(dim=-1, keepdim=True)
    return range_params(xmax, xmin, bits, symmetric)


def range_params(
    xmax: torch.Tensor,
    xmin: torch.Tensor,
    bits: int,
    symmetric: bool = False,
    zero_point_ste: bool = True,
) -> AffineParams:
    """Scale and zero point that map [xmin, xmax] onto the integer grid.

    `zero_point_ste`: the zero point's rounding passes gradients straight through (to xmin, so
    to LWC's lower clipping strength); False rounds it hard, with no gradient, as the reference
    OmniQuant code does (the clipping strengths then learn through the scale alone).
    """
    _qmin, qmax = qrange(bits, symmetric)
    if symmetric:
        absmax = torch.maximum(xmax.abs(), xmin.abs())
        scale = (absmax / qmax).clamp(min=SCALE_MIN)
        return AffineParams(scale, torch.zeros_like(scale))
    xmax, xmin = xmax.clamp(min=0), xmin.clamp(max=0)  # the grid holds 0: z in [0, qmax]
    scale = ((xmax - xmin) / qmax).clamp(min=SCALE_MIN)
    zero = -round_ste(xmin / scale) if zero_point_ste else -(xmin / scale).round().detach()
    return AffineParams(scale, zero)


def quantize_codes(wg: torch.Tensor, p: AffineParams, bits: int, symmetric: bool) -> torch.Tensor:
    """Integer codes (as float, differentiable through STE) of grouped weights."""
    qmin, qmax = qrange(bits, symmetric)
    return torch.clamp(round_ste(wg / p.scale) + p.zero, qmin, qmax)


def dequantize_codes(q: torch.Tensor, p: AffineParams) -> torch.Tensor:
    """(q - z) * h."""
    return (q - p.zero) * p.scale


def fake_quantize(
    w: torch.Tensor,
    bits: int,
    group_size: int | None = None,
    symmetric: bool = False,
    upper: torch.Tensor | float = 1.0,
    lower: torch.Tensor | float = 1.0,
) -> torch.Tensor:
    """Quantize then dequantize a 2-D weight (out, in); differentiable via STE. The reference
    formula in one call (a checking tool: runs go through `quant.lwc` and `quant.qparams`;
    tests and `benchmarks/symmetric_grid.py` compare against it)."""
    wg = to_groups(w, group_size)  # (out, n_groups, g)
    p = minmax_params(wg, bits, symmetric, upper, lower)
    wq = dequantize_codes(quantize_codes(wg, p, bits, symmetric), p)
    return from_groups(wq, w.shape[1])


def fake_quantize_per_token(x: torch.Tensor, bits: int, symmetric: bool = False) -> torch.Tensor:
    """Dynamic per-token (last dimension) min-max fake quantization of activations (..., C)."""
    shape = x.shape
    xg = x.reshape(-1, 1, shape[-1])  # (tokens, 1, C)
    p = minmax_params(xg, bits, symmetric)
    return dequantize_codes(quantize_codes(xg, p, bits, symmetric), p).reshape(shape)


_CHUNK = 1 << 22  # elements per slice of `_group_dot`'s temporary (16 MiB of float32)


def _group_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(a * b).sum(-1, keepdim=True) over grouped tensors (out, n_groups, g), a slice of rows at a
    time: the product's temporary stays small instead of the size of the weight."""
    rows = max(1, _CHUNK // max(1, a[0].numel()))
    parts = [
        (a[i : i + rows] * b[i : i + rows]).sum(-1, keepdim=True) for i in range(0, len(a), rows)
    ]
    return torch.cat(parts)


class _FakeQuantSTE(torch.autograd.Function):
    """Fused `dequantize_codes(quantize_codes(...))` with the same STE gradients, for speed.

    Gradients (round is the identity for the gradient; clamp passes it inside [qmin, qmax]):
      in range m:   d out / d scale = round(w/h) - w/h,   d out / d zero = 0
      clipped:      d out / d scale = q - z,              d out / d zero = -h
      d out / d w = 1 in range, 0 where clipped (only computed when the weight trains).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        wg: torch.Tensor,
        scale: torch.Tensor,
        zero: torch.Tensor,
        qmin: int,
        qmax: int,
    ) -> torch.Tensor:
        t = wg / scale
        if not any(ctx.needs_input_grad[:3]):  # no gradient wanted: one buffer, in place
            return t.round_().add_(zero).clamp_(qmin, qmax).sub_(zero).mul_(scale)
        rounded = t.round()
        dscale = t.neg_().add_(rounded)  # round(w/h) - w/h, in t's memory
        codes = rounded.add_(zero)
        clipped = (codes < qmin) | (codes > qmax)
        qz = codes.clamp_(qmin, qmax).sub_(zero)  # q - z
        torch.where(clipped, qz, dscale, out=dscale)
        ctx.save_for_backward(dscale, clipped, scale)
        return qz.mul_(scale)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
    ) -> tuple[None, torch.Tensor | None, torch.Tensor | None, None, None]:
        dscale, clipped, scale = ctx.saved_tensors
        g_scale = _group_dot(grad, dscale) if ctx.needs_input_grad[1] else None
        g_zero = -scale * _group_dot(grad, clipped) if ctx.needs_input_grad[2] else None
        g_w = grad.masked_fill(clipped, 0.0) if ctx.needs_input_grad[0] else None
        return g_w, g_scale, g_zero, None, None


def fake_quantize_grouped(
    wg: torch.Tensor, p: AffineParams, bits: int, symmetric: bool = False
) -> torch.Tensor:
    """Fast fake quantization of grouped weights (out, n_groups, g) with given parameters;
    STE gradients reach the scale, the zero point and (when it requires grad) the weight."""
    qmin, qmax = qrange(bits, symmetric)
    return _FakeQuantSTE.apply(wg, p.scale, p.zero, qmin, qmax)
