"""`QuantLinear`: a linear layer that keeps its weight as integer codes and runs a real kernel.

Three paths, chosen per layer from its bits, group size, shape and device:
  * int4 — 2-, 3- and 4-bit weights (a 2/3-bit code is a 4-bit code that leaves the top values
    unused, so the same kernel runs them at 4 bits per weight in memory, while the file keeps
    2/3 bits): PyTorch's weight-only int4 matmul: on the CPU `_convert_weight_to_int4pack_for_cpu` /
    `_weight_int4pack_mm_for_cpu`, on CUDA the tinygemm `_convert_weight_to_int4pack` /
    `_weight_int4pack_mm` (bf16). The kernels compute w = (u - 8) * s + m per group, so our
    w = (u - z) * s becomes m = (8 - z) * s. They need a uniform group of 32/64/128/256 channels
    that divides the width: a ragged grid (576 = 4 x 128 + 64) runs as the uniform grid of the
    largest such size dividing both g and the width (64), its scales repeated (`expand_groups`).
  * int8 — `_weight_int8pack_mm` (per output channel scales), for per-channel 8-bit weights:
    x (u - z) s = s (x (u - 128)) - s (z - 128) sum(x), a per-row correction of the int8 product.
  * unpack — any other setting: the packed words are unpacked and dequantized on each call.
The kernel paths take bf16 activations (the outputs then differ from the float32 fake-quantized
layer by bf16 rounding, 1-3% of the largest output); the unpack path computes in float32.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from omniquant.quant.packing import pack_rows, unpack_rows
from omniquant.quant.qparams import LinearQParams, dequantize, expand_groups

INT4_GROUPS = (256, 128, 64, 32)


def cuda_inner_k_tiles(in_features: int) -> int | None:
    """tinygemm's inner k tiles for a width: the largest of 8/4/2 with width % (16 tiles) == 0."""
    for tiles in (8, 4, 2):
        if in_features % (16 * tiles) == 0:
            return tiles
    return None


def int4_group(
    qp: LinearQParams, out_features: int, device: torch.device | None = None
) -> int | None:
    """The uniform group size the int4 kernels can run this grid with, or None."""
    if qp.bits > 4 or out_features % 16:  # 2- and 3-bit codes are 4-bit codes that use less
        return None
    if device is not None and device.type == "cuda" and cuda_inner_k_tiles(qp.in_features) is None:
        return None
    for kg in INT4_GROUPS:
        if qp.group % kg == 0 and qp.in_features % kg == 0:
            return kg
    return None


def choose_path(qp: LinearQParams, out_features: int, device: torch.device | None = None) -> str:
    if int4_group(qp, out_features, device) is not None:
        return "int4"
    if qp.bits == 8 and qp.n_groups == 1:
        return "int8"
    return "unpack"


class QuantLinear(nn.Module):
    """y = x W^T + b with W held as codes; see the module docstring for the kernels."""

    def __init__(
        self,
        codes: torch.Tensor,
        qp: LinearQParams,
        bias: torch.Tensor | None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        device = torch.device(device)
        self.out_features, self.in_features = codes.shape
        self.qp = qp
        self.path = choose_path(qp, self.out_features, device)
        # the int4/int8 kernels are fast with bf16 activations (on the CPU their float32 variants
        # are slower than a float32 matmul); unpacking runs in the model's dtype
        self.dtype = torch.bfloat16 if self.path != "unpack" else dtype
        self.bias = None if bias is None else nn.Parameter(bias.to(device, self.dtype), False)
        if self.path == "int4":
            self._init_int4(codes, device)
        elif self.path == "int8":
            self._init_int8(codes, device)
        else:
            self.register_buffer("packed", pack_rows(codes, qp.bits).to(device))
            self.register_buffer("scale", qp.scale.to(device))
            self.register_buffer("zero", qp.zero.to(device))

    def _init_int4(self, codes: torch.Tensor, device: torch.device) -> None:
        kg = int4_group(self.qp, self.out_features, device)
        assert kg is not None
        self.kernel_group = kg
        scale = expand_groups(self.qp.scale, self.qp, kg)  # (out, in / kg)
        zero = expand_groups(self.qp.zero.float(), self.qp, kg)
        sz = torch.stack([scale, (8 - zero) * scale], dim=-1).transpose(0, 1).contiguous()
        self.register_buffer("scale_zeros", sz.to(device, self.dtype))  # (in / kg, out, 2)
        if device.type == "cuda":
            pairs = codes.to(torch.uint8)
            nibbles = (pairs[:, ::2] << 4 | pairs[:, 1::2]).to(device)
            tiles = cuda_inner_k_tiles(self.in_features)
            packed = torch._convert_weight_to_int4pack(nibbles.contiguous(), tiles)
        else:
            packed = torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 2)
        self.register_buffer("packed", packed)

    def _init_int8(self, codes: torch.Tensor, device: torch.device) -> None:
        scale = self.qp.scale[:, 0]
        self.register_buffer("w8", (codes.to(torch.int16) - 128).to(torch.int8).to(device))
        self.register_buffer("scales", scale.to(device, self.dtype))
        correction = scale * (self.qp.zero[:, 0].float() - 128)
        self.register_buffer("correction", correction.to(device, self.dtype))

    def weight_bytes(self) -> int:
        """Bytes of what stands for the weight (codes, scales, zero points), bias excluded."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def _unpacked_weight(self) -> torch.Tensor:
        codes = unpack_rows(self.packed, self.qp.bits, self.in_features)
        qp = replace(self.qp, scale=self.scale, zero=self.zero)
        return dequantize(codes, qp, self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).to(self.dtype)
        if self.path == "int4":
            if x2.is_cuda:
                y = torch._weight_int4pack_mm(x2, self.packed, self.kernel_group, self.scale_zeros)
            else:
                y = torch._weight_int4pack_mm_for_cpu(
                    x2, self.packed, self.kernel_group, self.scale_zeros
                )
        elif self.path == "int8":
            if x2.is_cuda:  # PyTorch has no CUDA int8 weight-only matmul: widen the codes in bf16
                y = (x2 @ self.w8.to(x2.dtype).t()) * self.scales
            else:
                y = torch._weight_int8pack_mm(x2, self.w8, self.scales)
            y = y - x2.sum(-1, keepdim=True) * self.correction
        else:
            y = x2 @ self._unpacked_weight().t()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, bits={self.qp.bits}, "
            f"group={self.qp.group}, path={self.path}"
        )
