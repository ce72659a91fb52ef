"""Dense bit packing of unsigned b-bit codes into int32 words (b = 1..8).

Each row of codes (u_0, u_1, ..., u_{n-1}) becomes one little-endian bit stream: code k occupies
stream bits [k*b, (k+1)*b), least significant bit first, and stream bits [32j, 32j + 32) form word
j of the row. A code may straddle two words (b = 3, 5, 6, 7); no bit is wasted; the row is padded
with zero bits to whole words, so a row of n codes takes ceil(n * b / 32) int32 words.

    b = 4, one word holds u_0 .. u_7:
        bit  31..28 27..24 23..20 19..16 15..12 11..8  7..4   3..0
             u_7    u_6    u_5    u_4    u_3    u_2    u_1    u_0

    b = 3, word 0 holds u_0 .. u_9 and the two low bits of u_10:
        bit  31..30      29..27 ... 5..3  2..0
             u_10[1:0]   u_9    ... u_1   u_0          (word 1 starts with u_10[2])

For b = 4 and b = 8 this is the layout of compressed-tensors' `pack-quantized` format (its int8
values are these unsigned codes minus 2^(b-1)), so the same words serve both formats.
"""

from __future__ import annotations

import math

import torch

WORD_BITS = 32


def packed_words(n: int, bits: int) -> int:
    """int32 words for a row of n codes of `bits` bits."""
    return math.ceil(n * bits / WORD_BITS)


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= 8:
        raise ValueError(f"packing takes 1..8 bits, got {bits}")


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(rows, n) unsigned codes (any integer dtype, values < 2^bits) -> (rows, words) int32.

    32 codes fill exactly `bits` words, so every block of 32 codes packs alike: code k goes to
    word k*b // 32, shifted left by k*b % 32, and the bits that spill over that word's top go to
    the next word. The codes of one word are consecutive, so each word is a sum (their bits never
    overlap) over a slice of the shifted codes: `bits` vectorized sums pack the whole matrix."""
    _check_bits(bits)
    rows, n = codes.shape
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 2**bits):
        raise ValueError(f"codes must lie in [0, {2**bits - 1}]")
    blocks = math.ceil(n / WORD_BITS)
    c = torch.nn.functional.pad(codes.to(torch.int64), (0, blocks * WORD_BITS - n))
    c = c.reshape(rows, blocks, WORD_BITS)
    offsets = torch.arange(WORD_BITS, device=c.device) * bits  # stream bit of code k
    shift = offsets % WORD_BITS
    low = (c << shift) & 0xFFFFFFFF  # the part of each code in its own word
    high = c >> (WORD_BITS - shift)  # the part that spills into the next word (mostly 0)
    starts = [math.ceil(j * WORD_BITS / bits) for j in range(bits + 1)]  # first code of word j
    packed = torch.stack(
        [
            low[..., starts[j] : starts[j + 1]].sum(-1)
            + (high[..., starts[j] - 1] if starts[j] * bits > j * WORD_BITS else 0)
            for j in range(bits)
        ],
        dim=-1,
    )  # (rows, blocks, bits) in [0, 2^32)
    packed = packed.reshape(rows, blocks * bits)[:, : packed_words(n, bits)]
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def unpack_rows(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """(rows, words) int32 -> (rows, n) uint8 codes; the inverse of `pack_rows`."""
    _check_bits(bits)
    rows, words = packed.shape
    if words != packed_words(n, bits):
        raise ValueError(f"{words} words cannot hold {n} codes of {bits} bits")
    if WORD_BITS % bits == 0:  # no code straddles two words: shift and mask, in int32
        per_word = WORD_BITS // bits
        shifts = torch.arange(0, WORD_BITS, bits, dtype=torch.int32, device=packed.device)
        codes = (packed.unsqueeze(-1) >> shifts) & (2**bits - 1)  # (rows, words, per_word)
        return codes.reshape(rows, words * per_word)[:, :n].to(torch.uint8)
    return _unpack_blocks(packed, bits, n)


def _unpack_blocks(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Codes that may straddle words: 32 codes fill exactly `bits` words, so each block of
    `bits` words is read with the same per-position word index and shift."""
    rows, words = packed.shape
    blocks = math.ceil(n / WORD_BITS)
    p = torch.nn.functional.pad(packed.to(torch.int64) & 0xFFFFFFFF, (0, blocks * bits - words + 1))
    offsets = torch.arange(WORD_BITS, device=packed.device) * bits  # bit offset of code k
    word, shift = offsets // WORD_BITS, offsets % WORD_BITS
    base = (torch.arange(blocks, device=packed.device) * bits).unsqueeze(-1) + word  # (blocks, 32)
    low = p[:, base]  # (rows, blocks, 32)
    high = p[:, base + 1]
    codes = ((low >> shift) | (high << (WORD_BITS - shift))) & (2**bits - 1)
    return codes.reshape(rows, blocks * WORD_BITS)[:, :n].to(torch.uint8)


def pack_columns(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack along dim 0 instead: (n, cols) -> (words, cols) (compressed-tensors' zero points)."""
    return pack_rows(codes.t(), bits).t().contiguous()


def unpack_columns(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The inverse of `pack_columns` (a checking tool: compressed-tensors' readers unpack the
    columns themselves; tests read our layout back with it)."""
    return unpack_rows(packed.t(), bits, n).t().contiguous()
