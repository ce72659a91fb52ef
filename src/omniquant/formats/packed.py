"""omniquant-packed: our safetensors layout for every setting (2-8 bits, any group, W4A4/W6A6).

A folder with the model's config.json, tokenizer, `omniquant.json` (the run's report, whose
`config` says the weight and activation settings, plus `"format": {"name": "omniquant-packed",
"version": 1}`) and `model.safetensors` holding, for each quantized linear at module path P:

    P.qweight   int32  (out, ceil(in * bits / 32))  unsigned codes u, one dense little-endian bit
                                                     stream per row (`packing` draws the bits)
    P.scales    float32 (out, n_groups)             h
    P.zeros     uint8   (out, n_groups)             unsigned zero point z;  w = (u - z) * h

groups being `group_size` consecutive input channels with a shorter last group when it does not
divide the width (n_groups = ceil(in / group_size); per-channel: one group). Every other tensor
(embeddings, norms, biases, lm_head) is stored as it is, except that a float32 tensor whose
values are all exact in bf16 is stored as bf16 (a bf16 checkpoint's embedding, say: half the
bytes, nothing lost); the loader reads every float tensor back as float32.
`omniquant.load(folder)` reads it back: as plain linears holding the dequantized weights, or with
`kernels=True` as `QuantLinear`s.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from omniquant.config import OmniQuantConfig
from omniquant.errors import ModelError
from omniquant.formats.base import Format, LoadJob, WriteJob
from omniquant.formats.compressed_tensors import linears_to_export, quantized_linears
from omniquant.kernels.linear import QuantLinear
from omniquant.kernels.native import NATIVE_CODES_ATTR, check_grid, pack_codes
from omniquant.memory import parameters_on_meta, release_free_memory
from omniquant.quant.packing import pack_rows, unpack_rows
from omniquant.quant.primitives import effective_group_size
from omniquant.quant.qparams import QPARAMS_ATTR, LinearQParams, dequantize, weight_codes
from omniquant.runfile import RUN_FILE, read_run_record, record_config, record_format

RECORD_ENTRY = {"name": "omniquant-packed", "version": 1}  # the run record's "format"
WEIGHTS_FILE = "model.safetensors"
SUFFIXES = ("qweight", "scales", "zeros")


def _compact(t: torch.Tensor) -> torch.Tensor:
    """A float32 tensor as bf16 when that loses nothing (weights of a bf16 checkpoint, such as
    its embedding, are exactly bf16 values even after the float32 upcast); else unchanged."""
    if t.dtype != torch.float32:
        return t
    half = t.to(torch.bfloat16)
    return half if torch.equal(half.float(), t) else t


def packed_state(model: nn.Module, progress: bool = False) -> dict[str, torch.Tensor]:
    """The safetensors state dict of the packed format."""
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    linears = linears_to_export(model).items()
    for name, linear in tqdm(linears, desc="packing layers", disable=not progress):
        qp: LinearQParams = getattr(linear, QPARAMS_ATTR)
        codes = weight_codes(linear.weight, qp)
        del state[f"{name}.weight"]
        state[f"{name}.qweight"] = pack_rows(codes, qp.bits)
        state[f"{name}.scales"] = qp.scale
        state[f"{name}.zeros"] = qp.zero
    if getattr(model.config, "tie_word_embeddings", False):
        state = {k: v for k, v in state.items() if not k.startswith("lm_head.")}
    return {k: _compact(v) for k, v in state.items()}


def write_packed(
    model: nn.Module, tokenizer: Any, folder: Path, progress: bool = False
) -> dict[str, Any]:
    """Write an omniquant-packed model folder (the caller makes it atomic and writes the run
    record with the returned "format" entry)."""
    from safetensors.torch import save_file

    state = packed_state(model, progress)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    model.config.save_pretrained(folder)
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return dict(RECORD_ENTRY)


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    old = getattr(owner, child)
    module._forward_pre_hooks.update(old._forward_pre_hooks)  # activation quantizers stay
    module._forward_hooks.update(old._forward_hooks)
    setattr(owner, child, module)


def _swap_for_kernel(
    model: nn.Module, name: str, codes: torch.Tensor, qp: LinearQParams, device: str
) -> None:
    """Put a `QuantLinear` (carrying its grid) where the linear `name` is."""
    layer = QuantLinear(codes, qp, model.get_submodule(name).bias, device)
    setattr(layer, QPARAMS_ATTR, qp)
    _set_module(model, name, layer)


def _as_float(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.is_floating_point() else t


def load_packed(
    folder: Path,
    kernels: bool = False,
    device: str = "cpu",
    prepare: Callable[[nn.Module], None] | None = None,
    progress: bool = False,
    native: bool = False,
) -> tuple[nn.Module, Any, OmniQuantConfig]:
    """(model, tokenizer, config) from an omniquant-packed folder.

    kernels=False: every quantized linear is a plain nn.Linear holding its dequantized weight
    (the fake-quantized model, which `export` can write again); kernels=True: `QuantLinear`s built
    straight from the codes, so the float weights are never materialised. `prepare` runs on the
    model before the swap (it attaches the activation quantizers, which the swap keeps).
    native=True (for `kernels.native.NativeDecoder`): each quantized linear keeps its weight on the
    meta device and carries its grid and its codes in the native decoder's layout, so no float
    copy of the blocks is ever made; a grid that decoder cannot hold is refused first.
    """
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.initialization import no_init_weights

    report = read_run_record(folder)
    if report is None or record_format(report) != RECORD_ENTRY["name"]:
        raise ModelError(f"{folder} is not an omniquant-packed folder (see its {RUN_FILE})")
    if report["format"].get("version") != RECORD_ENTRY["version"]:
        raise ModelError(f"{folder}: omniquant-packed version {report['format']} is not readable")
    config = record_config(report)
    with parameters_on_meta(), no_init_weights():  # the weights come from the file
        model = AutoModelForCausalLM.from_config(
            AutoConfig.from_pretrained(folder), dtype=torch.float32
        )
    with safe_open(str(folder / WEIGHTS_FILE), framework="pt") as file:  # read as needed
        names = set(file.keys())
        grids = {k[: -len(".qweight")] for k in names if k.endswith(".qweight")}
        packed = {f"{g}.{suffix}" for g in grids for suffix in SUFFIXES}
        dense = {k: _as_float(file.get_tensor(k)) for k in sorted(names - packed)}
        missing, unexpected = model.load_state_dict(dense, strict=False, assign=True)
        del dense
        expected_missing = {f"{g}.weight" for g in grids} | {"lm_head.weight"}
        if unexpected or set(missing) - expected_missing:
            raise ModelError(
                f"{folder}: tensors do not match the model (missing {sorted(missing)[:5]}, "
                f"unexpected {sorted(unexpected)[:5]})"
            )
        model.tie_weights()
        model.eval()
        if prepare is not None:  # hooks on the linears carry over to their QuantLinear
            prepare(model)
        layers = tqdm(sorted(grids), desc="packed layers", disable=not progress)
        for name in layers:  # one layer at a time: codes never all in memory at once
            linear = model.get_submodule(name)
            assert isinstance(linear, nn.Linear)
            qp = LinearQParams(
                scale=file.get_tensor(f"{name}.scales").float(),
                zero=file.get_tensor(f"{name}.zeros"),
                bits=config.weight.bits,
                group=effective_group_size(linear.in_features, config.weight.group_size),
                in_features=linear.in_features,
            )
            # the head of a --quantize-lm-head run is dequantized: the decoder's head is float
            native_codes = native and linear is not model.get_output_embeddings()
            if native_codes:
                check_grid(name, qp)
            codes = unpack_rows(file.get_tensor(f"{name}.qweight"), qp.bits, linear.in_features)
            if native_codes:
                setattr(linear, NATIVE_CODES_ATTR, pack_codes(codes))
                setattr(linear, QPARAMS_ATTR, qp)
            elif kernels:
                _swap_for_kernel(model, name, codes, qp, device)
            else:
                with torch.no_grad():
                    linear.weight = nn.Parameter(dequantize(codes, qp, torch.float32), False)
                setattr(linear, QPARAMS_ATTR, qp)
            del codes
            release_free_memory()
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if native:  # the gridded block linears' weights stay on meta: their codes stand for them
        left = [n for n in left if n.removesuffix(".weight") not in grids]
    if left:
        raise ModelError(f"{folder}: no tensor in the file for {left[:5]}")
    has_tokenizer = any((folder / f).exists() for f in ("tokenizer.json", "tokenizer_config.json"))
    tokenizer = AutoTokenizer.from_pretrained(folder) if has_tokenizer else None
    return model, tokenizer, config


def use_kernels(model: nn.Module, device: str = "cpu") -> int:
    """Swap every linear that carries a grid for a `QuantLinear`; returns how many."""
    n = 0
    for name, linear in list(quantized_linears(model).items()):
        qp: LinearQParams = getattr(linear, QPARAMS_ATTR)
        _swap_for_kernel(model, name, weight_codes(linear.weight, qp), qp, device)
        n += 1
    return n


def check_packed(*_: Any) -> None:
    """Every setting: 2-8 bits, any group (a shorter last group too), W4A4 to W8A8."""


def write(job: WriteJob) -> dict[str, Any]:
    return write_packed(job.model, job.tokenizer, job.folder, job.progress)


def load(job: LoadJob) -> tuple[nn.Module, Any]:
    from omniquant.quant.activation import attach_act_quantizers_all

    model, tokenizer, _ = load_packed(
        job.folder,
        job.kernels,
        job.device,
        prepare=lambda m: attach_act_quantizers_all(m, job.config),
        progress=job.progress,
    )
    return model, tokenizer


FORMAT = Format(
    name="omniquant-packed",
    holds="our packed layout for every setting (2-8 bits, any group, W4A4-W8A8)",
    engine="omniquant.load (our int4/int8 kernels with `kernels`) and the native decoder",
    check=check_packed,
    write=write,
    load=load,
)
