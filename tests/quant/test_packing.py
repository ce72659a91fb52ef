import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from omniquant.config import WeightQuant
from omniquant.quant.packing import (
    pack_columns,
    pack_rows,
    packed_words,
    unpack_columns,
    unpack_rows,
)
from omniquant.quant.primitives import minmax_params, to_groups
from omniquant.quant.qparams import dequantize, from_affine, weight_codes


@settings(max_examples=60, deadline=None)
@given(
    bits=st.integers(1, 8),
    rows=st.integers(1, 9),
    n=st.integers(1, 131),
    seed=st.integers(0, 2**16),
)
def test_pack_then_unpack_is_the_identity(bits, rows, n, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (rows, n), generator=g)
    packed = pack_rows(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (rows, packed_words(n, bits))
    assert torch.equal(unpack_rows(packed, bits, n), codes.to(torch.uint8))
    assert torch.equal(unpack_columns(pack_columns(codes.t(), bits), bits, n), codes.t().byte())


def test_bit_layout_is_the_documented_one():
    # 4 bits: u_k sits at bits 4k..4k+3 of word 0, least significant first
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 15]])
    assert pack_rows(codes, 4).item() == int("F7654321", 16) - 2**32
    # 3 bits: u_10 straddles words 0 and 1 (its two low bits end word 0)
    codes = torch.zeros(1, 11, dtype=torch.long)
    codes[0, 10] = 0b101
    words = pack_rows(codes, 3)[0]
    assert words[0].item() & 0xFFFFFFFF == 0b01 << 30 and words[1].item() == 0b1


def test_out_of_range_codes_are_refused():
    with pytest.raises(ValueError, match="codes must lie"):
        pack_rows(torch.tensor([[16]]), 4)


@pytest.mark.parametrize("bits,group", [(2, 16), (3, 32), (4, 20), (8, None), (4, 128)])
@pytest.mark.parametrize("symmetric", [False, True])
def test_codes_of_a_fake_quantized_weight_give_it_back(bits, group, symmetric):
    torch.manual_seed(bits)
    w = torch.randn(24, 70)  # 70 = 3 x 20 + 10: ragged for g=20, g=32 and g=16
    spec = WeightQuant(bits, group, symmetric)
    p = minmax_params(to_groups(w, group), bits, symmetric)
    from omniquant.quant.primitives import fake_quantize

    wq = fake_quantize(w, bits, group, symmetric)
    qp = from_affine(p, spec, 70)
    codes = weight_codes(wq, qp)
    assert codes.max() <= 2**bits - 1
    assert torch.allclose(dequantize(codes, qp, torch.float32), wq, atol=1e-6)


def test_a_weight_off_its_grid_is_refused():
    from omniquant.errors import ExportError

    w = torch.randn(8, 32)
    spec = WeightQuant(4, 16)
    qp = from_affine(minmax_params(to_groups(w, 16), 4), spec, 32)
    with pytest.raises(ExportError, match="not on the grid"):
        weight_codes(w, qp)
