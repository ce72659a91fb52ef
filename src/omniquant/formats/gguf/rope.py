"""RoPE scaling in a GGUF file, as llama.cpp reads it.

A model trained for long contexts stretches its rotary frequencies; the transformers config says
how (`rope_parameters["rope_type"]`), and llama.cpp needs the same stretch in the file. Which
kinds a family may use is its record's `GgufSpec.rope_scaling` (`omniquant.models`; today linear
everywhere, yarn on Llama/Mistral/Qwen2/Qwen3, llama3 on Llama/Mistral, longrope on Phi-3):

    rope_type  written
    linear     rope.scaling.type "linear", rope.scaling.factor f (every frequency divided by f)
    yarn       rope.scaling.type "yarn", factor, original_context_length (llama.cpp's YaRN
               defaults: beta_fast 32, beta_slow 1, attention factor 0.1 ln f + 1, the ones
               transformers assumes)
    llama3     a tensor rope_freqs (f32, one per frequency pair): the divisor llama.cpp applies
               to each frequency (1 for short wavelengths, f for long ones, smoothly between)
    longrope   tensors rope_factors_short / rope_factors_long (the config's lists),
               rope.scaling.attn_factor and the original context (llama.cpp uses the long
               factors when its context is longer)

Gemma 3 scales only its full-attention layers (linear); its sliding layers must be unscaled, as
llama.cpp assumes. Anything else (dynamic NTK, YaRN with other betas or attention factors, a
scaling type on a family llama.cpp does not scale that way) is refused before calibration.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from omniquant.errors import ExportError
from omniquant.models.architecture import GgufSpec
from omniquant.models.registry import REGISTRY

YARN_DEFAULTS = {"beta_fast": 32.0, "beta_slow": 1.0}


def rope_parameters(hf: Any) -> dict[str, dict[str, Any]]:
    """RoPE settings by layer type ('default' when the model has one kind of layer)."""
    params = getattr(hf, "rope_parameters", None) or {}
    if params and all(isinstance(v, dict) for v in params.values()):
        return dict(params)
    if not params:
        params = {"rope_theta": getattr(hf, "rope_theta", 10000.0)}
        scaling = getattr(hf, "rope_scaling", None)
        if scaling:
            params = {**params, **scaling}
    return {"default": dict(params)}


def rope_kind(rope: dict[str, Any]) -> str:
    return str(rope.get("rope_type", rope.get("type", "default")))


def full_attention_rope(hf: Any) -> dict[str, Any]:
    """The RoPE settings of the full-attention (or only) layers."""
    rope = rope_parameters(hf)
    return rope.get("full_attention", rope.get("default", {}))


def original_context(hf: Any, rope: dict[str, Any]) -> int:
    original = rope.get("original_max_position_embeddings") or getattr(
        hf, "original_max_position_embeddings", None
    )
    return int(original or hf.max_position_embeddings)


def scaling_families() -> dict[str, list[str]]:
    """rope_type -> the registered families GGUF writes it for (from their records)."""
    out: dict[str, list[str]] = {}
    for arch in dict.fromkeys(REGISTRY.values()):
        if isinstance(arch.gguf, GgufSpec):
            for kind in arch.gguf.rope_scaling:
                out.setdefault(kind, []).append(arch.name)
    return out


def check_rope_scaling(hf: Any, spec: GgufSpec) -> str:
    """The scaling kind of a model its family's llama.cpp architecture (`spec`) runs as the
    config says ('default' for none), or an ExportError saying why not."""
    layers = rope_parameters(hf)
    for layer, rope in layers.items():
        if layer == "sliding_attention" and rope_kind(rope) != "default":
            raise ExportError(
                f"llama.cpp does not scale RoPE in sliding-window layers; this model's use "
                f"{rope_kind(rope)!r}: use `format` omniquant-packed"
            )
    rope = full_attention_rope(hf)
    kind = rope_kind(rope)
    if kind == "default":
        return kind
    if kind not in spec.rope_scaling:
        raise ExportError(
            f"GGUF export writes RoPE scaling {_supported()}; this model's {kind!r} on llama.cpp's "
            f"{spec.arch} is not one of them: use `format` omniquant-packed"
        )
    if kind == "yarn":
        odd = {
            k: rope[k]
            for k in ("beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim")
            if rope.get(k) is not None and rope[k] != YARN_DEFAULTS.get(k)
        }
        if odd or rope.get("truncate") is False:
            raise ExportError(
                f"GGUF export writes YaRN with llama.cpp's defaults (beta_fast 32, beta_slow 1, "
                f"attention factor from the scale); this model sets {odd or {'truncate': False}}:"
                " use `format` omniquant-packed"
            )
    return kind


def _supported() -> str:
    return ", ".join(f"{k} ({'/'.join(v)})" for k, v in scaling_families().items())


def llama3_frequency_divisors(rope: dict[str, Any], dims: int, original: int) -> np.ndarray:
    """llama3 scaling as one divisor per frequency pair: wavelengths shorter than the original
    context / high_freq_factor keep their frequency (1), those longer than original /
    low_freq_factor are divided by `factor`, and those between blend the two."""
    factor = float(rope["factor"])
    low = float(rope.get("low_freq_factor", 1.0))
    high = float(rope.get("high_freq_factor", 4.0))
    theta = float(rope.get("rope_theta", 10000.0))
    freqs = 1.0 / theta ** (np.arange(0, dims, 2, dtype=np.float64) / dims)
    wavelen = 2 * math.pi / freqs
    smooth = (original / wavelen - low) / (high - low)
    blended = 1.0 / ((1 - smooth) / factor + smooth)
    divisors = np.where(wavelen < original / high, 1.0, blended)
    divisors = np.where(wavelen > original / low, factor, divisors)
    return divisors.astype(np.float32)


def longrope_attention_factor(hf: Any, rope: dict[str, Any]) -> float:
    """The attention (magnitude) factor of longrope: the config's, or sqrt(1 + ln s / ln L) for
    the context stretch s = max positions / L, L the original context."""
    if rope.get("attention_factor") is not None:
        return float(rope["attention_factor"])
    original = original_context(hf, rope)
    scale = rope.get("factor") or hf.max_position_embeddings / original
    return 1.0 if scale <= 1.0 else math.sqrt(1 + math.log(scale) / math.log(original))


def add_rope_scaling(writer: Any, hf: Any, spec: GgufSpec) -> None:
    """The scaling metadata (nothing for unscaled RoPE or for llama3, which is a tensor)."""
    import gguf

    rope = full_attention_rope(hf)
    kind = check_rope_scaling(hf, spec)
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        writer.add_rope_scaling_orig_ctx_len(original_context(hf, rope))
    elif kind == "longrope":
        writer.add_rope_scaling_attn_factors(longrope_attention_factor(hf, rope))


def rope_tensors(hf: Any, spec: GgufSpec, dims: int) -> dict[str, np.ndarray]:
    """Extra f32 tensors the scaling needs (GGUF names), over `dims` rotary dimensions."""
    rope = full_attention_rope(hf)
    kind = check_rope_scaling(hf, spec)
    if kind == "llama3":
        original = original_context(hf, rope)
        return {"rope_freqs.weight": llama3_frequency_divisors(rope, dims, original)}
    if kind == "longrope":
        out = {}
        for which in ("long", "short"):
            factors = np.asarray(rope[f"{which}_factor"], dtype=np.float32)
            if factors.shape != (dims // 2,):
                raise ExportError(
                    f"longrope {which}_factor has {factors.size} values; the rotary dimensions "
                    f"({dims}) need {dims // 2}"
                )
            out[f"rope_factors_{which}.weight"] = factors
        return out
    return {}
