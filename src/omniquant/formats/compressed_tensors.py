"""Export to compressed-tensors, the format vLLM serves and llm-compressor writes.

Weight-only results use `pack-quantized`: per quantized linear
    weight_packed      int32 (out, ceil(in * bits / 32))   codes, `packing.pack_rows`
    weight_scale       (out, n_groups)                      in the model's float dtype
    weight_zero_point  int32 (ceil(out * bits / 32), n_groups)  unsigned zero points packed along
                       dim 0 (asymmetric grids only)
    weight_shape       int64 (2,)
W8A8 results use `int-quantized`: `weight` int8 (codes - 128), `weight_scale` (out, 1),
`weight_zero_point` int8 (out, 1), with dynamic per-token 8-bit input activations.
config.json carries the `quantization_config` that transformers and vLLM read.

What the format cannot hold is refused with the reason and an alternative: ragged groups (a group
size that does not divide every width), bit widths other than 2, 4 and 8, activation settings
other than W8A8, and quantized query/key/value states.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from omniquant.config import OmniQuantConfig
from omniquant.errors import ExportError
from omniquant.formats.base import Format, LoadJob, WriteJob
from omniquant.quant.packing import pack_columns, pack_rows
from omniquant.quant.qparams import QPARAMS_ATTR, LinearQParams, weight_codes

PACKED_BITS = (2, 4, 8)  # widths whose dense packing every compressed-tensors version reads alike
OTHER_FORMAT = "use `format` omniquant-packed, which holds every setting"


def quantized_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every linear that carries a quantization grid, by module path."""
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and getattr(m, QPARAMS_ATTR, None) is not None
    }


def linears_to_export(model: nn.Module) -> dict[str, nn.Linear]:
    """`quantized_linears`, or an ExportError when the model carries no grid at all."""
    linears = quantized_linears(model)
    if not linears:
        raise ExportError(
            "the model has no quantization grids to export (scales and zero points); export a "
            "model written by `omniquant quantize`"
        )
    return linears


def check_compressed_tensors_setting(config: OmniQuantConfig) -> None:
    """Raise ExportError for bits and activation settings the format cannot hold (no model
    needed, so `quantize --format compressed-tensors` refuses them before loading anything)."""
    bits = config.weight.bits
    act = config.act
    if act.enabled and not (act.bits == 8 and bits == 8):
        raise ExportError(
            f"compressed-tensors holds integer weight-activation models only as W8A8; this run is "
            f"W{bits}A{act.bits}: {OTHER_FORMAT}"
        )
    if act.enabled and act.quantize_qkv:
        raise ExportError(
            "compressed-tensors cannot hold the per-head query/key/value quantizers of this run; "
            "re-quantize with `quantize_qkv` off, or " + OTHER_FORMAT
        )
    if not act.enabled and bits not in PACKED_BITS:
        raise ExportError(
            f"compressed-tensors' pack-quantized layout is read alike by every version only for "
            f"{', '.join(map(str, PACKED_BITS))} bits, not {bits}: {OTHER_FORMAT}"
        )


def _ragged_error(name: str, group_size: int, width: int) -> ExportError:
    return ExportError(
        f"{name}: group size {group_size} does not divide its width {width} (the last group "
        f"is shorter), which compressed-tensors cannot hold; quantize with a group size that "
        f"divides every width (e.g. 64 for SmolLM2), per-channel (`group_size` 0), or "
        + OTHER_FORMAT
    )


def check_compressed_tensors_widths(widths: dict[str, int], group_size: int | None) -> None:
    """Raise ExportError when `group_size` leaves a ragged last group in a linear of these input
    widths (by module path); a group as wide as the layer or wider is one group per row."""
    for name, width in widths.items():
        if group_size and group_size < width and width % group_size:
            raise _ragged_error(name, group_size, width)


def check_compressed_tensors(model: nn.Module, config: OmniQuantConfig) -> None:
    """Raise ExportError, saying why and what would work, if the format cannot hold the run."""
    check_compressed_tensors_setting(config)
    for name, linear in linears_to_export(model).items():
        qp: LinearQParams = getattr(linear, QPARAMS_ATTR)
        if qp.ragged:
            raise _ragged_error(name, qp.group, qp.in_features)


def _strategy(qp: LinearQParams) -> dict[str, Any]:
    if qp.n_groups == 1:
        return {"strategy": "channel", "group_size": None}
    return {"strategy": "group", "group_size": qp.group}


def quantization_config(
    model: nn.Module, config: OmniQuantConfig, dense_names: list[str]
) -> dict[str, Any]:
    """The `quantization_config` entry of config.json."""
    qp: LinearQParams = next(iter(quantized_linears(model).values())).omniquant_qparams
    weights = {
        "num_bits": config.weight.bits,
        "type": "int",
        "symmetric": False,
        "dynamic": False,
        "observer": "minmax",
        "actorder": None,
        "block_structure": None,
        **_strategy(qp),
    }
    act = config.act
    inputs = None
    if act.enabled:
        inputs = {
            "num_bits": act.bits,
            "type": "int",
            "symmetric": act.symmetric,
            "strategy": "token",
            "dynamic": True,
            "group_size": None,
            "observer": None,
            "actorder": None,
            "block_structure": None,
        }
    fmt = "int-quantized" if act.enabled else "pack-quantized"
    return {
        "quant_method": "compressed-tensors",
        "format": fmt,
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": weights,
                "input_activations": inputs,
                "output_activations": None,
                "format": fmt,
            }
        },
        "ignore": dense_names,
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
    }


def compressed_tensors_state(
    model: nn.Module, config: OmniQuantConfig, progress: bool = False
) -> dict[str, torch.Tensor]:
    """The safetensors state dict: quantized linears compressed, everything else as it is."""
    dtype = next(model.parameters()).dtype
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    bits = config.weight.bits
    mid = 2 ** (bits - 1)
    linears = quantized_linears(model).items()
    for name, linear in tqdm(linears, desc="packing layers", disable=not progress):
        qp: LinearQParams = getattr(linear, QPARAMS_ATTR)
        codes = weight_codes(linear.weight, qp)
        del state[f"{name}.weight"]
        state[f"{name}.weight_scale"] = qp.scale.to(dtype)
        if config.act.enabled:  # int-quantized: signed int8 values
            state[f"{name}.weight"] = (codes.to(torch.int16) - mid).to(torch.int8)
            state[f"{name}.weight_zero_point"] = (qp.zero.to(torch.int16) - mid).to(torch.int8)
        else:
            state[f"{name}.weight_packed"] = pack_rows(codes, bits)
            state[f"{name}.weight_zero_point"] = pack_columns(qp.zero, bits)
            state[f"{name}.weight_shape"] = torch.tensor(list(linear.weight.shape))
    return state


def dense_linear_names(model: nn.Module) -> list[str]:
    """Linears left in float (lm_head, anything not quantized): the config's `ignore` list."""
    quantized = quantized_linears(model)
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in quantized]


def write_compressed_tensors(
    model: nn.Module, tokenizer: Any, config: OmniQuantConfig, folder: Path, progress: bool = False
) -> None:
    """Write a compressed-tensors model folder (the caller makes it atomic)."""
    from safetensors.torch import save_file

    check_compressed_tensors(model, config)
    state = compressed_tensors_state(model, config, progress)
    if getattr(model.config, "tie_word_embeddings", False):
        state = {k: v for k, v in state.items() if not k.startswith("lm_head.")}
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    cfg = model.config.to_dict()
    cfg["quantization_config"] = quantization_config(model, config, dense_linear_names(model))
    (folder / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def check_setting_and_widths(config: OmniQuantConfig, widths: dict[str, int], _: Any) -> None:
    check_compressed_tensors_setting(config)
    check_compressed_tensors_widths(widths, config.weight.group_size)


def write(job: WriteJob) -> dict[str, Any]:
    write_compressed_tensors(job.model, job.tokenizer, job.config, job.folder, job.progress)
    return {"name": FORMAT.name}


def load(job: LoadJob) -> tuple[nn.Module, Any]:
    """Through transformers' own compressed-tensors support (its kernels, its activations)."""
    from omniquant.model_io import load_model

    return load_model(job.folder)


FORMAT = Format(
    name="compressed-tensors",
    holds="packed integers that vLLM serves (2/4/8-bit weights with groups dividing every "
    "width, or W8A8)",
    engine="vLLM, transformers (compressed-tensors), llm-compressor",
    check=check_setting_and_widths,
    write=write,
    load=load,
    kernels="a compressed-tensors export, which runs through vLLM's or transformers' own "
    "kernels: drop `kernels`, or export quantize's output with `format` omniquant-packed for ours",
)
