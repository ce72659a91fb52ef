"""GGUF export: one file that llama.cpp (and everything built on it) runs.

What is written, for a model of a family llama.cpp and transformers' GGUF loader both read (a
record in `omniquant.models` with a `GgufSpec`, found by the config's model_type: today Llama,
Mistral, Qwen2, Qwen3, Phi-3, Gemma 3; `GGUF_ARCH`):

    <folder>/model.gguf      weights, architecture metadata, tokenizer, chat template
    <folder>/omniquant.json  the run's report, `"format": {"name": "gguf", ...}` (`runfile`)

Every quantized linear is written from its learned grid, never re-quantized. Our grid stores, per
row and group of g input channels, a scale h and an unsigned zero point z:  w = (u - z) * h,
u in [0, 2^b - 1] (`quant.qparams`). GGUF's 32-weight blocks hold it exactly (up to the fp16
rounding of the block's scale and offset) whenever every group is a whole number of blocks
(g and the row width multiples of 32, ragged last groups and per-channel included):

    setting               GGUF type  block of 32 weights (bytes)        weight
    2-4-bit asymmetric    Q4_1       d fp16 | m fp16 | 16 x (lo, hi)    d * u + m,  d = h, m = -z h
    5-bit asymmetric      Q5_1       d | m | qh u32 (5th bits) | 16 x   d * u + m
    2-4-bit symmetric     Q4_0       d | 16 x (lo, hi)                  d * (c - 8),  c = u - z + 8
    5-bit symmetric       Q5_0       d | qh | 16 x ...                  d * (c - 16), c = u - z + 16
    6-7-bit, 8 symmetric  Q8_0       d | 32 x int8 q                    d * q,  q = u - z

4-bit nibbles: byte j of a block holds weight j in its low nibble and weight j + 16 in its high
nibble; Q5's qh holds bit 4 of weight j at bit j. A group of 128 is four blocks with the same d
and m. 2- and 3-bit grids fit 4-bit blocks exactly (with unused levels: no smaller than 4-bit),
and every grid of up to 7 bits fits Q8_0 (|u - z| <= 127). What no type holds exactly
(asymmetric 8 bits, groups that are not whole blocks, quantized activations) is refused before
calibration with the nearest setting that fits, unless an approximate mapping is asked for
(`GgufOptions.approximate`: the weights re-quantized per block, the error reported). Embeddings
and the output head are written as f16 (default), f32 or Q8_0 (re-quantized on request: its
error is reported); norms and biases as f32.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from omniquant.config import OmniQuantConfig, WeightQuant
from omniquant.errors import ConfigError, ExportError
from omniquant.formats.base import WriteJob
from omniquant.formats.gguf.rope import (
    add_rope_scaling,
    check_rope_scaling,
    full_attention_rope,
    original_context,
    rope_parameters,
    rope_tensors,
)
from omniquant.formats.gguf.vocab import (
    Vocab,
    add_vocab,
    check_gguf_tokenizer,
    tokenizer_vocab,
)
from omniquant.models.architecture import Architecture, GgufSpec
from omniquant.models.registry import REGISTRY, architecture_for_config
from omniquant.quant.primitives import effective_group_size
from omniquant.quant.qparams import QPARAMS_ATTR, LinearQParams, expand_groups, weight_codes

log = logging.getLogger(__name__)

GGUF_FILE = "model.gguf"
BLOCK = 32  # weights per block in every type written here
FP16_MAX = 65504.0
FLOAT_TYPES = ("f16", "f32", "q8_0")
APPROXIMATE_TYPES = ("q4_1", "q5_1", "q8_0")  # re-quantization targets, on request only
APPROXIMATE_HINT = (
    "; or ask for an approximate mapping with `gguf_approximate` q4_1|q5_1|q8_0 (the fake-"
    "quantized weights re-quantized per block of 32; its error is reported)"
)

# the smallest GGUF type that holds each grid exactly: (bits, symmetric) -> type. Narrower
# grids fit wider blocks: 2- and 3-bit codes are 4-bit codes that leave levels unused, and every
# grid of up to 7 bits (signed codes u - z in -127..127) is a Q8_0 block with d = h
EXACT_TYPES = {(b, False): "Q4_1" for b in (2, 3, 4)} | {(b, True): "Q4_0" for b in (2, 3, 4)}
EXACT_TYPES |= {(5, False): "Q5_1", (5, True): "Q5_0"}
EXACT_TYPES |= {(6, False): "Q8_0", (7, False): "Q8_0", (6, True): "Q8_0", (7, True): "Q8_0"}
EXACT_TYPES[(8, True)] = "Q8_0"
# where the signed code q = u - z sits in a symmetric type's stored code
SIGNED_OFFSET = {"Q4_0": 8, "Q5_0": 16, "Q8_0": 128}


@dataclass(frozen=True)
class GgufOptions:
    """How the tensors that carry no grid are stored: token embeddings and the output head
    (lm_head), each "f16" (default), "f32" or "q8_0"; and `approximate`: None (default: a grid
    no GGUF type holds exactly is refused), or the type ("q4_1", "q5_1", "q8_0") to re-quantize
    such a grid's weights into, block by block, reporting the error."""

    embeddings: str = "f16"
    output: str = "f16"
    approximate: str | None = None

    def __post_init__(self) -> None:
        for name in ("embeddings", "output"):
            if getattr(self, name) not in FLOAT_TYPES:
                raise ConfigError(
                    f"GGUF {name} type must be one of {', '.join(FLOAT_TYPES)}, "
                    f"got {getattr(self, name)!r}"
                )
        if self.approximate is not None and self.approximate not in APPROXIMATE_TYPES:
            raise ConfigError(
                f"`gguf_approximate` must be one of {', '.join(APPROXIMATE_TYPES)}, "
                f"got {self.approximate!r}"
            )


# ---------------------------------------------------------------- what GGUF can hold


class _GgufArchitectures(Mapping[str, str]):
    """Hugging Face model_type -> llama.cpp architecture, read from the registered family records
    (`Architecture.model_types` and `.gguf`) whenever it is looked at."""

    def _table(self) -> dict[str, str]:
        return {
            model_type: arch.gguf.arch
            for arch in REGISTRY.values()
            if isinstance(arch.gguf, GgufSpec)
            for model_type in arch.model_types
        }

    def __getitem__(self, model_type: str) -> str:
        return self._table()[model_type]

    def __iter__(self) -> Iterator[str]:
        return iter(self._table())

    def __len__(self) -> int:
        return len(self._table())


GGUF_ARCH: Mapping[str, str] = _GgufArchitectures()


def gguf_weight_type(spec: WeightQuant) -> str:
    """The GGUF type that holds this weight grid exactly, or an ExportError naming the nearest
    setting that fits."""
    key = (spec.bits, spec.symmetric)
    if key in EXACT_TYPES:
        return EXACT_TYPES[key]
    raise ExportError(
        "GGUF holds 8-bit weights only on a symmetric grid (Q8_0: d * q, q in -128..127; an "
        "asymmetric 8-bit grid's u - z spans -255..255): add `symmetric`, or use `weight.bits` 7 "
        "(exact in Q8_0)"
    )


def _nearest_groups(g: int) -> str:
    """The multiples of 32 either side of a group size."""
    low = g // BLOCK * BLOCK
    return " or ".join(str(x) for x in (low, low + BLOCK) if x >= BLOCK)


def exact_type(config: OmniQuantConfig) -> str | None:
    """The GGUF type that holds the weight grid exactly, or None."""
    g = config.weight.group_size
    if g and g % BLOCK:
        return None
    try:
        return gguf_weight_type(config.weight)
    except ExportError:
        return None


def check_gguf_setting(config: OmniQuantConfig, options: GgufOptions | None = None) -> None:
    """Refuse, before calibration, a setting that no GGUF type holds exactly (unless an
    approximate mapping was asked for in `options`)."""
    approximate = options is not None and options.approximate is not None
    if config.act.enabled:
        raise ExportError(
            f"GGUF stores weights only; llama.cpp quantizes activations its own way, so "
            f"{config.label} (activations at {config.act.bits} bits) cannot be written exactly: "
            f"use `act.bits` 16, or `format` omniquant-packed"
        )
    if approximate:
        return
    try:
        gguf_weight_type(config.weight)
    except ExportError as e:
        raise ExportError(f"{e}{APPROXIMATE_HINT}") from e
    if config.weight.bits < 4:
        log.info(
            "a %d-bit grid is stored exactly in 4-bit GGUF blocks: the file is no smaller than "
            "at 4 bits",
            config.weight.bits,
        )
    g = config.weight.group_size
    if g and g % BLOCK:
        raise ExportError(
            f"GGUF blocks hold {BLOCK} weights with one scale; group size {g} is not a multiple "
            f"of {BLOCK}: use `group_size` {_nearest_groups(g)} (or 0 for per-channel)"
            f"{APPROXIMATE_HINT}"
        )


def check_gguf_widths(
    widths: Mapping[str, int], group_size: int | None, approximate: bool = False
) -> None:
    """Refuse linears whose rows (or, for an exact mapping, groups) are not whole 32-weight
    blocks."""
    for name, width in widths.items():
        if width % BLOCK:
            raise ExportError(
                f"{name} has rows of {width} weights, not a multiple of {BLOCK}: no GGUF block "
                f"type holds it; use `format` omniquant-packed"
            )
        g = effective_group_size(width, group_size)
        if g % BLOCK and not approximate:
            raise ExportError(
                f"{name}: groups of {g} weights are not whole {BLOCK}-weight GGUF blocks; use "
                f"`group_size` {_nearest_groups(g)}"
            )


def gguf_family(hf: Any) -> Architecture:
    """The family record (with its `GgufSpec`) of a transformers config, or an ExportError
    saying why the model cannot be written as GGUF (before any weight is loaded)."""
    model_type = getattr(hf, "model_type", None)
    family = architecture_for_config(hf)
    if family is None or not isinstance(family.gguf, GgufSpec):
        families = ", ".join(sorted(GGUF_ARCH))
        why = f" ({family.gguf})" if family is not None else ""
        raise ExportError(
            f"GGUF export covers the families both llama.cpp and transformers' GGUF loader read "
            f"({families}); {model_type!r} is not one of them{why}: use `format` omniquant-packed"
        )
    check_rope_scaling(hf, family.gguf)
    for refusal in family.gguf.refusals:
        reason = refusal.check(hf)
        if reason is not None:
            raise ExportError(reason)
    return family


def gguf_architecture(hf: Any) -> str:
    """llama.cpp's architecture name for a transformers config, or an ExportError saying why
    the model cannot be written as GGUF (before any weight is loaded)."""
    return _spec(gguf_family(hf)).arch


def _spec(family: Architecture) -> GgufSpec:
    """The GGUF spec of a record `gguf_family` returned."""
    if not isinstance(family.gguf, GgufSpec):
        raise ExportError(f"{family.name} cannot be written as GGUF: {family.gguf}")
    return family.gguf


# ---------------------------------------------------------------- blocks


def _fp16_bytes(x: np.ndarray, what: str) -> np.ndarray:
    """float32 (...) -> uint8 (..., 2): fp16 little-endian, refusing values fp16 cannot hold."""
    if not np.all(np.isfinite(x)) or np.abs(x).max(initial=0.0) > FP16_MAX:
        raise ExportError(f"a block {what} exceeds fp16's range ({FP16_MAX}); GGUF cannot hold it")
    return x.astype("<f2").view(np.uint8).reshape(*x.shape, 2)


def _nibbles(c: np.ndarray) -> np.ndarray:
    """(..., 32) codes -> (..., 16) bytes: low nibble weight j, high nibble weight j + 16."""
    return ((c[..., :16] & 0xF) | ((c[..., 16:] & 0xF) << 4)).astype(np.uint8)


def _fifth_bits(c: np.ndarray) -> np.ndarray:
    """(..., 32) 5-bit codes -> (..., 4) bytes: bit 4 of weight j at bit j of a u32."""
    bits = ((c.astype(np.uint32) >> 4) & 1) << np.arange(BLOCK, dtype=np.uint32)
    qh = bits.sum(axis=-1, dtype=np.uint32)
    return qh.astype("<u4").view(np.uint8).reshape(*c.shape[:-1], 4)


def encode_blocks(codes: np.ndarray, d: np.ndarray, m: np.ndarray | None, kind: str) -> np.ndarray:
    """Unsigned codes (rows, n) and per-block d (and m) (rows, n / 32) -> the GGUF bytes of one
    tensor, (rows, n / 32 * block bytes) uint8. `kind` is one of `EXACT_TYPES`' values."""
    rows, n = codes.shape
    c = codes.astype(np.uint8).reshape(rows, n // BLOCK, BLOCK)  # (rows, blocks, 32)
    parts = [_fp16_bytes(d, "scale")]
    if kind in ("Q4_1", "Q5_1"):
        assert m is not None
        parts.append(_fp16_bytes(m, "offset"))
    if kind in ("Q5_0", "Q5_1"):
        parts.append(_fifth_bits(c))
    if kind == "Q8_0":
        parts.append((c.astype(np.int16) - 128).astype(np.int8).view(np.uint8))
    else:
        parts.append(_nibbles(c))
    return np.concatenate(parts, axis=-1).reshape(rows, -1)


def grid_blocks(codes: torch.Tensor, qp: LinearQParams, kind: str) -> np.ndarray:
    """The GGUF bytes of a linear from its codes u (out, in) and grid: every block takes d = h
    of its group; Q4_1/Q5_1 store u with m = -z h, the others the signed code u - z."""
    scale = expand_groups(qp.scale.float(), qp, BLOCK)  # (out, in / 32)
    zero = expand_groups(qp.zero.float(), qp, BLOCK)
    d = scale.numpy().astype(np.float32)
    if kind in ("Q4_1", "Q5_1"):
        m = (-zero * scale).numpy().astype(np.float32)
        return encode_blocks(codes.numpy(), d, m, kind)
    z = zero.to(torch.int16).repeat_interleave(BLOCK, dim=1)  # (out, in)
    q = codes.to(torch.int16) - z + SIGNED_OFFSET[kind]  # the type's unsigned code
    top = 255 if kind == "Q8_0" else 2 * SIGNED_OFFSET[kind] - 1
    if bool((q < 0).any() or (q > top).any()):
        raise ExportError(f"a signed code u - z falls outside {kind}'s range")
    return encode_blocks(q.numpy(), d, None, kind)


def q8_0_blocks(w: torch.Tensor) -> tuple[np.ndarray, float]:
    """A float matrix (rows, n) round-to-nearest into Q8_0 blocks (d = absmax / 127), with the
    relative RMS error that costs (an approximation: for embeddings and the head only)."""
    rows, n = w.shape
    x = w.detach().float().cpu().reshape(rows, n // BLOCK, BLOCK)  # (rows, blocks, 32)
    d = x.abs().amax(dim=-1) / 127.0
    d16 = d.half().float()
    q = torch.where(d16[..., None] > 0, x / d16.clamp(min=1e-30)[..., None], 0.0)
    q = q.round().clamp(-127, 127)
    err = float((q * d16[..., None] - x).norm() / x.norm().clamp(min=1e-30))
    codes = (q + 128).to(torch.uint8).reshape(rows, n).numpy()
    return encode_blocks(codes, d.numpy(), None, "Q8_0"), err


def approximate_blocks(w: torch.Tensor, kind: str) -> tuple[np.ndarray, float]:
    """A float matrix (rows, n) re-quantized round-to-nearest into `kind` blocks ("Q4_1" and
    "Q5_1": min-max per block, "Q8_0": absmax), with the relative RMS error that costs."""
    if kind == "Q8_0":
        return q8_0_blocks(w)
    rows, n = w.shape
    levels = 15 if kind == "Q4_1" else 31
    x = w.detach().float().cpu().reshape(rows, n // BLOCK, BLOCK)  # (rows, blocks, 32)
    lo, hi = x.amin(dim=-1), x.amax(dim=-1)
    d16 = ((hi - lo) / levels).half().float()
    m16 = lo.half().float()
    q = ((x - m16[..., None]) / d16.clamp(min=1e-30)[..., None]).round().clamp(0, levels)
    err = float((q * d16[..., None] + m16[..., None] - x).norm() / x.norm().clamp(min=1e-30))
    codes = q.to(torch.uint8).reshape(rows, n).numpy()
    return encode_blocks(codes, d16.numpy(), m16.numpy(), kind), err


# ---------------------------------------------------------------- metadata


def _head_dim(hf: Any) -> int:
    return getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads


def rope_dims(hf: Any, spec: GgufSpec) -> int:
    """How many dimensions of each head RoPE rotates (`partial_rotary`: Phi-3 may rotate a part)."""
    if not spec.partial_rotary:
        return _head_dim(hf)
    partial = float(full_attention_rope(hf).get("partial_rotary_factor", 1.0))
    return int(partial * hf.hidden_size) // hf.num_attention_heads


def add_metadata(writer: Any, hf: Any, spec: GgufSpec, name: str, file_type: int) -> None:
    """Architecture, attention, RoPE and norm parameters, as llama.cpp's loader reads them (the
    optional keys those its architecture reads: `spec.metadata`)."""
    import gguf

    head_dim = _head_dim(hf)
    keys = spec.metadata
    rope = rope_parameters(hf)
    writer.add_name(name)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(hf.max_position_embeddings)
    writer.add_embedding_length(hf.hidden_size)
    writer.add_block_count(hf.num_hidden_layers)
    writer.add_feed_forward_length(hf.intermediate_size)
    writer.add_head_count(hf.num_attention_heads)
    writer.add_head_count_kv(getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(hf.rms_norm_eps)
    writer.add_vocab_size(hf.vocab_size)
    full = full_attention_rope(hf)
    writer.add_rope_freq_base(float(full.get("rope_theta", 10000.0)))
    if "rope_dimension_count" in keys:
        writer.add_rope_dimension_count(rope_dims(hf, spec))
    add_rope_scaling(writer, hf, spec)
    if "original_context" in keys:
        writer.add_rope_scaling_orig_ctx_len(original_context(hf, full))
    if "sliding_window" in keys:
        writer.add_sliding_window(getattr(hf, "sliding_window", None) or 0)
    if "sliding_window_pattern" in keys:
        layer_types = list(getattr(hf, "layer_types", None) or [])
        if "sliding_attention" in layer_types and hf.sliding_window:
            writer.add_sliding_window(hf.sliding_window)
            writer.add_sliding_window_pattern([t == "sliding_attention" for t in layer_types])
            local = rope.get("sliding_attention", full)
            writer.add_rope_freq_base_swa(float(local.get("rope_theta", 10000.0)))
    if "final_logit_softcapping" in keys and getattr(hf, "final_logit_softcapping", None):
        writer.add_final_logit_softcapping(hf.final_logit_softcapping)


# ---------------------------------------------------------------- tensors


def permute_qk(t: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of a q or k projection (out, ...) reordered from HF's rotate-half RoPE layout to
    llama.cpp's adjacent-pair layout: per head, rows (0..d/2, d/2..d) interleave."""
    rows = t.shape[0]
    heads = t.reshape(n_head, 2, rows // n_head // 2, *t.shape[1:])  # (H, 2, d/2, ...)
    return heads.transpose(1, 2).reshape(t.shape)


def _qk_heads(hf_name: str, hf: Any, family: Architecture) -> int | None:
    """Heads to permute by, for the q/k projections (weights and biases; the record's first two
    `qkv` paths) of a family whose llama.cpp architecture rotates adjacent pairs."""
    if not _spec(family).permute_qk:
        return None
    if len(family.qkv) != 3:
        raise ExportError(f"{family.name}: q/k rows are permuted only in separate q, k, v linears")
    q, k, _ = family.qkv
    if f".{q}." in hf_name:
        return hf.num_attention_heads
    if f".{k}." in hf_name:
        return getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads
    return None


@dataclass
class TensorOut:
    """One tensor to write: float data (f32/f16) or raw block bytes with their type."""

    name: str
    data: np.ndarray
    raw_type: str | None = None  # GGMLQuantizationType name for block bytes


def float_tensor(name: str, w: torch.Tensor, kind: str) -> tuple[TensorOut, float]:
    """A float tensor as f32, f16 or Q8_0, with its relative RMS error (0 for f32)."""
    w = w.detach().float().cpu()
    if kind == "f32" or w.dim() == 1:
        return TensorOut(name, w.numpy()), 0.0
    if kind == "q8_0":
        if w.shape[-1] % BLOCK:
            raise ExportError(f"{name}: rows of {w.shape[-1]} cannot be Q8_0 blocks; use f16")
        data, err = q8_0_blocks(w)
        return TensorOut(name, data, "Q8_0"), err
    if float(w.abs().max()) > FP16_MAX:
        raise ExportError(f"{name} exceeds fp16's range; write it as f32")
    half = w.half()
    err = float((half.float() - w).norm() / w.norm().clamp(min=1e-30))
    return TensorOut(name, half.numpy()), err


def _gguf_names(model: nn.Module, arch: str) -> Any:
    import gguf

    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    return gguf.get_tensor_name_map(arch_id, model.config.num_hidden_layers)


def _is_norm(hf_name: str) -> bool:
    return hf_name.endswith("norm.weight")


def model_tensors(
    model: nn.Module,
    family: Architecture,
    options: GgufOptions,
    kind: str,
    matrices: str = "f32",
    exact: bool = True,
) -> tuple[list[TensorOut], dict[str, float]]:
    """Every tensor of the GGUF file (GGUF names), and the relative error of each float tensor
    written lossily (f16 or Q8_0 embeddings and head). Linears with a grid become `kind`
    blocks (from the grid when `exact`, else re-quantized from the weights, their error
    reported); other matrices are written as `matrices` (f32: exact)."""
    hf = model.config
    spec = _spec(family)
    arch = spec.arch
    names = _gguf_names(model, arch)
    tied = bool(getattr(hf, "tie_word_embeddings", False))
    state = model.state_dict()
    out: list[TensorOut] = []
    errors: dict[str, float] = {}
    for hf_name, tensor in state.items():
        base, _, suffix = hf_name.rpartition(".")
        if hf_name == "lm_head.weight" and tied and options.output == options.embeddings:
            continue  # llama.cpp uses token_embd when there is no output tensor
        gguf_base = names.get_name(base)
        if gguf_base is None:
            raise ExportError(f"no GGUF tensor name for {hf_name} in llama.cpp's {arch}")
        name = f"{gguf_base}.{suffix}"
        linear = model.get_submodule(base) if suffix == "weight" else None
        qp = getattr(linear, QPARAMS_ATTR, None) if linear is not None else None
        heads = _qk_heads(hf_name, hf, family)
        if qp is not None:
            if not exact:
                data, err = approximate_blocks(tensor, kind)
                errors[name] = err
            else:
                codes = weight_codes(tensor, qp)  # (out, in) uint8; checks it is on the grid
                data = grid_blocks(codes, qp, kind)
            if heads:
                data = permute_qk(torch.from_numpy(data), heads).numpy()
            out.append(TensorOut(name, data, kind))
            continue
        t = tensor.detach().float()
        if family.norm_kind == "rms_offset" and _is_norm(hf_name):
            t = t + 1.0  # Gemma's RMSNorm multiplies by (1 + weight); llama.cpp by weight
        if heads:
            t = permute_qk(t, heads)
        float_kind = "f32"
        if gguf_base == "token_embd":
            float_kind = options.embeddings
        elif gguf_base == "output":
            float_kind = options.output
        elif t.dim() > 1:
            float_kind = matrices
        written, err = float_tensor(name, t, float_kind)
        if err:
            errors[name] = err
        out.append(written)
    for name, data in rope_tensors(hf, spec, rope_dims(hf, spec)).items():
        out.append(TensorOut(name, data))
    return out, errors


def _file_type(kind: str) -> int:
    import gguf

    return int(getattr(gguf.LlamaFileType, f"MOSTLY_{kind}"))


def _write_file(
    path: Path,
    family: Architecture,
    model: nn.Module,
    vocab: Vocab,
    tensors: list[TensorOut],
    ftype: int,
) -> None:
    """The GGUF bytes, written to `<path>.partial` and renamed to `path` when complete."""
    import gguf

    name = Path(str(getattr(model.config, "_name_or_path", "") or "model")).name or "model"
    partial = path.with_name(path.name + ".partial")
    spec = _spec(family)
    writer = gguf.GGUFWriter(str(partial), spec.arch)
    try:
        add_metadata(writer, model.config, spec, name, ftype)
        add_vocab(writer, vocab)
        for t in tensors:
            raw = gguf.GGMLQuantizationType[t.raw_type] if t.raw_type else None
            writer.add_tensor(t.name, np.ascontiguousarray(t.data), raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(partial, path)
    except BaseException:
        writer.close()
        partial.unlink(missing_ok=True)
        raise


def _vocab_of(model: nn.Module, tokenizer: Any) -> Vocab:
    if tokenizer is None:
        raise ExportError("GGUF export needs the tokenizer (it is part of the file)")
    n_vocab = model.get_input_embeddings().weight.shape[0]
    return tokenizer_vocab(tokenizer, n_vocab, model.config)


def write_gguf(
    model: nn.Module,
    tokenizer: Any,
    config: OmniQuantConfig,
    path: Path,
    options: GgufOptions | None = None,
) -> dict[str, Any]:
    """Write `model` (its linears carrying their grids) as one GGUF file at `path`, atomically:
    the bytes go to `<path>.partial`, renamed when complete. Returns what was written (types,
    the relative error of lossy float tensors) for the run report."""
    options = options or GgufOptions()
    check_gguf_setting(config, options)
    family = gguf_family(model.config)
    widths = {
        name: m.in_features
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and getattr(m, QPARAMS_ATTR, None) is not None
    }
    check_gguf_widths(widths, config.weight.group_size, options.approximate is not None)
    kind = exact_type(config)
    approximate = kind is None
    if kind is None:
        assert options.approximate is not None
        kind = options.approximate.upper()
    vocab = _vocab_of(model, tokenizer)
    tensors, errors = model_tensors(model, family, options, kind, exact=not approximate)
    _write_file(path, family, model, vocab, tensors, _file_type(kind))
    return {
        "name": "gguf",
        "file": path.name,
        "architecture": _spec(family).arch,
        "weight_type": kind,
        "exact": not approximate,
        "embeddings": options.embeddings,
        "output": options.output,
        "tokenizer": vocab.model,
        "tokenizer_pre": vocab.pre,
        "relative_rms_error": errors,
        "bits_per_weight": bits_per_weight(tensors),
        **_scaled_rope(model.config, _spec(family)),
    }


def _scaled_rope(hf: Any, spec: GgufSpec) -> dict[str, Any]:
    """The transformers RoPE settings of a scaled model, for the report: transformers' GGUF
    loader does not read RoPE scaling back, `omniquant.load` takes it from here."""
    kind = check_rope_scaling(hf, spec)
    if kind == "default":
        return {}
    return {"rope_scaling": kind, "rope_parameters": rope_parameters(hf)}


def write_float_gguf(model: nn.Module, tokenizer: Any, path: Path, dtype: str = "f32") -> None:
    """A float model (no grids) as a GGUF file of f32 or f16 matrices: what llama.cpp's own
    quantizer (llama-quantize) starts from."""
    import gguf

    if dtype not in ("f32", "f16"):
        raise ConfigError(f"a float GGUF is f32 or f16, not {dtype!r}")
    family = gguf_family(model.config)
    vocab = _vocab_of(model, tokenizer)
    tensors, _ = model_tensors(model, family, GgufOptions(dtype, dtype), "", matrices=dtype)
    ftype = gguf.LlamaFileType.ALL_F32 if dtype == "f32" else gguf.LlamaFileType.MOSTLY_F16
    _write_file(path, family, model, vocab, tensors, int(ftype))


def bits_per_weight(tensors: list[TensorOut]) -> float:
    """Stored bits per weight over every tensor written."""
    import gguf

    bits = 0.0
    weights = 0
    for t in tensors:
        if t.raw_type is None:
            n = t.data.size
            bits += n * t.data.itemsize * 8
        else:
            block, nbytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[t.raw_type]]
            n = t.data.size // nbytes * block
            bits += t.data.size * 8
        weights += n
    return bits / max(weights, 1)


def write_gguf_folder(job: WriteJob) -> dict[str, Any]:
    """A folder with `model.gguf` (the caller renames it into place and writes the run record
    with the returned "format" entry)."""
    job.folder.mkdir(parents=True, exist_ok=True)
    return write_gguf(job.model, job.tokenizer, job.config, job.folder / GGUF_FILE, job.gguf)


def check_gguf(
    config: OmniQuantConfig, widths: Mapping[str, int], options: GgufOptions | None
) -> None:
    check_gguf_setting(config, options)
    approximate = options is not None and options.approximate is not None
    check_gguf_widths(widths, config.weight.group_size, approximate)


__all__ = [
    "GGUF_ARCH",
    "GGUF_FILE",
    "GgufOptions",
    "check_gguf_setting",
    "check_gguf_tokenizer",
    "check_gguf_widths",
    "gguf_architecture",
    "gguf_family",
    "gguf_weight_type",
    "write_float_gguf",
    "write_gguf",
    "write_gguf_folder",
]
