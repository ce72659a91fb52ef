"""fake: the float model with its weights on the quantization grid, which plain transformers loads.

The folder is a normal Hugging Face checkpoint (config.json, tokenizer, safetensors shards) plus
`quant_grids.safetensors` (each linear's scales and zero points), so that `export` can pack it
later and `load(kernels=True)` can run it through our kernels. Activation quantizers are not
weights: `load` attaches them again from the run record.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from omniquant.errors import ModelError
from omniquant.formats.base import Format, LoadJob, WriteJob
from omniquant.formats.packed import use_kernels
from omniquant.model_io import load_model, save_model
from omniquant.quant.activation import attach_act_quantizers_all
from omniquant.quant.qparams import attach_grids, save_grids


def check_fake(*_: Any) -> None:
    """Every setting: the weights are float."""


def write_fake(job: WriteJob) -> dict[str, Any]:
    save_model(job.model, job.tokenizer, job.folder)
    save_grids(job.model, job.folder)
    return {"name": FORMAT.name}


def load_fake(job: LoadJob) -> tuple[nn.Module, Any]:
    model, tokenizer = load_model(job.folder)
    attach_grids(model, job.folder, job.config.weight)
    attach_act_quantizers_all(model, job.config)
    if job.kernels and use_kernels(model, job.device) == 0:
        raise ModelError(
            f"{job.folder}: `kernels` found no quantization grids (quant_grids.safetensors) to "
            f"run; export the folder with `format` omniquant-packed and use that"
        )
    return model, tokenizer


FORMAT = Format(
    name="fake",
    holds="float weights on the grid, loadable by plain transformers (every setting)",
    engine="transformers; omniquant.load and the native decoder with its grids",
    check=check_fake,
    write=write_fake,
    load=load_fake,
    packed=False,
)
