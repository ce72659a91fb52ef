import pytest
import torch
import torch.nn.functional as F

from omniquant.config import WeightQuant
from omniquant.kernels.linear import QuantLinear, choose_path
from omniquant.quant.primitives import fake_quantize, minmax_params, to_groups
from omniquant.quant.qparams import dequantize, from_affine, weight_codes


def _layer(out_f: int, in_f: int, bits: int, group: int | None, bias: bool = True):
    torch.manual_seed(out_f + in_f + bits)
    w = torch.randn(out_f, in_f) * 0.05
    qp = from_affine(minmax_params(to_groups(w, group), bits), WeightQuant(bits, group), in_f)
    codes = weight_codes(fake_quantize(w, bits, group), qp)
    b = torch.randn(out_f) if bias else None
    return QuantLinear(codes, qp, b), dequantize(codes, qp, torch.float32), b


@pytest.mark.parametrize(
    "shape,bits,group,path",
    [
        ((64, 128), 4, 32, "int4"),
        ((96, 576), 4, 128, "int4"),  # ragged 576 = 4 x 128 + 64 runs as g = 64
        ((48, 128), 4, None, "int4"),  # per-channel: one group of 128
        ((64, 96), 8, None, "int8"),
        ((64, 96), 8, 32, "unpack"),
        ((40, 70), 3, 32, "unpack"),
        ((64, 128), 3, 32, "int4"),  # 3-bit codes run through the 4-bit kernel
        ((32, 576), 2, 64, "int4"),
        ((50, 64), 4, 32, "unpack"),  # out not a multiple of 16: no int4 kernel
        ((32, 64), 2, 16, "unpack"),
    ],
)
def test_each_kernel_path_agrees_with_the_fake_quantized_linear(shape, bits, group, path):
    layer, w, b = _layer(*shape, bits, group)
    assert layer.path == path
    x = torch.randn(3, 5, shape[1])
    want = F.linear(x, w, b)
    got = layer(x)
    assert got.shape == want.shape
    tolerance = 1e-4 if path == "unpack" else 3e-2  # the kernels take bf16 activations
    assert (got - want).abs().max() <= tolerance * want.abs().max()


def test_a_4bit_layer_holds_under_a_sixth_of_the_float_bytes():
    layer, w, _ = _layer(192, 576, 4, 128, bias=False)
    assert layer.weight_bytes() <= 0.16 * w.numel() * 4


def test_path_choice_follows_bits_groups_and_shape():
    assert _layer(16, 64, 4, 64)[0].path == "int4"
    layer, _, _ = _layer(16, 100, 4, 50)  # no kernel group divides 50 and 100 evenly by 32..256
    assert layer.path == "unpack"
    assert choose_path(layer.qp, 16) == "unpack"
