"""One integration test on the real benchmark model: LWC lowers the block output error vs RTN."""

import pytest
import torch
from torch import nn

from omniquant.block_loop import calibrate_blocks
from omniquant.capture import capture_block_inputs
from omniquant.config import CalibConfig, OmniQuantConfig, WeightQuant
from omniquant.model_io import load_model
from omniquant.models import decoder_layers, get_architecture
from omniquant.pipeline.quantize import calibration_batches
from omniquant.runtime import Runtime
from tests.conftest import needs_austen

pytestmark = [needs_austen, pytest.mark.slow]


def test_lwc_lowers_block_output_error_against_rtn_on_smollm2(smollm2_folder):
    spec = WeightQuant(bits=3, group_size=128)
    losses = {}
    for method in ("rtn", "omniquant"):
        model, tokenizer = load_model(smollm2_folder)
        calib = CalibConfig(method=method, epochs=3, nsamples=4, seqlen=128)
        batches = calibration_batches(tokenizer, OmniQuantConfig(spec, calib=calib))
        blocks = decoder_layers(model, get_architecture(model))
        first = nn.ModuleList(list(blocks)[:3])
        torch.manual_seed(0)
        cap = capture_block_inputs(model, blocks, batches)
        cap.block_args = cap.block_args[:3]
        reports = calibrate_blocks(first, cap, spec, calib, Runtime(progress=False))
        losses[method] = [r.loss_after for r in reports]
    assert all(o < r for o, r in zip(losses["omniquant"], losses["rtn"], strict=True)), losses
