"""CUDA checks (run by benchmarks/gpu_check.sh on a GPU machine; skipped without CUDA)."""

import pytest
import torch

from omniquant.block_loop import calibrate_blocks
from omniquant.capture import capture_block_inputs
from omniquant.config import CalibConfig, WeightQuant
from omniquant.models import block_linears, decoder_layers, get_architecture
from omniquant.quant.primitives import to_groups
from omniquant.runtime import runtime_for
from tests.conftest import random_ids, tiny_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("family", ["llama", "gemma3", "opt"])
def test_block_loop_on_cuda_with_bf16_autocast(family):
    runtime = runtime_for("cuda", "auto", progress=False)
    assert runtime.autocast_dtype == torch.bfloat16
    cfg = CalibConfig(epochs=4, nsamples=4, seqlen=64, lwc_lr=5e-2)
    spec = WeightQuant(3, 16)
    results = {}
    for method in ("rtn", "omniquant"):
        model = tiny_model(family)
        blocks = decoder_layers(model, get_architecture(model))
        cap = capture_block_inputs(model, blocks, list(random_ids(4, 64).split(1)), "cuda")
        c = CalibConfig(**{**cfg.__dict__, "method": method})
        results[method] = calibrate_blocks(blocks, cap, spec, c, runtime)
        # only one block at a time lived on the GPU: everything is back on the CPU
        assert all(p.device.type == "cpu" for p in model.parameters())
        for linear in block_linears(blocks[0]).values():
            assert linear.weight.dtype == torch.float32 and torch.isfinite(linear.weight).all()
            groups = to_groups(linear.weight, 16)
            assert max(groups[0, c].unique().numel() for c in range(groups.shape[1])) <= 8
    omni, rtn = results["omniquant"], results["rtn"]
    assert all(r.loss_after < r.loss_before for r in omni)
    assert sum(r.loss_after for r in omni) < sum(r.loss_after for r in rtn)


def test_let_and_activation_quantization_on_cuda():
    from omniquant.config import ActQuant
    from omniquant.transforms.let import attention_shape, plan_let

    runtime = runtime_for("cuda", "auto", progress=False)
    model = tiny_model("llama")
    arch = get_architecture(model)
    blocks = decoder_layers(model, arch)
    cap = capture_block_inputs(model, blocks, list(random_ids(4, 64).split(1)), "cuda")
    plan = plan_let(arch, model.config, 0.5, shifts=False)
    cfg = CalibConfig(let=True, epochs=2, nsamples=4, seqlen=64)
    reports = calibrate_blocks(
        blocks,
        cap,
        WeightQuant(8),
        cfg,
        runtime,
        act=ActQuant(8),
        let_plan=plan,
        arch=arch,
        head_dim=attention_shape(model.config, arch).head_dim,
    )
    assert all(r.nan_events == 0 and r.loss_after <= 1.05 * r.loss_before for r in reports)
    assert all(p.device.type == "cpu" and torch.isfinite(p).all() for p in model.parameters())
    with torch.no_grad():
        logits = model(random_ids(1, 16)).logits
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("shape,group", [((256, 1024), 128), ((192, 576), 128), ((64, 512), None)])
def test_int4_kernel_on_cuda_matches_the_fake_quantized_linear(shape, group):
    from omniquant.config import WeightQuant
    from omniquant.kernels.linear import QuantLinear
    from omniquant.quant.primitives import fake_quantize, minmax_params, to_groups
    from omniquant.quant.qparams import dequantize, from_affine, weight_codes

    torch.manual_seed(0)
    out_f, in_f = shape
    w = torch.randn(out_f, in_f) * 0.05
    spec = WeightQuant(4, group)
    qp = from_affine(minmax_params(to_groups(w, group), 4), spec, in_f)
    codes = weight_codes(fake_quantize(w, 4, group), qp)
    layer = QuantLinear(codes, qp, None, "cuda")
    assert layer.path == "int4"
    x = torch.randn(7, in_f)
    want = x @ dequantize(codes, qp, torch.float32).t()
    got = layer(x.cuda()).float().cpu()
    assert (got - want).abs().max() <= 3e-2 * want.abs().max()


def test_packed_model_runs_its_kernels_on_cuda(tmp_path):
    import omniquant
    from omniquant.config import OmniQuantConfig
    from omniquant.formats import write_packed_format
    from omniquant.kernels.linear import QuantLinear

    model = tiny_model("llama")
    blocks = decoder_layers(model, get_architecture(model))
    cap = capture_block_inputs(model, blocks, list(random_ids(2, 32).split(1)), "cpu")
    config = OmniQuantConfig(WeightQuant(4, 32), calib=CalibConfig(method="rtn"))
    calibrate_blocks(blocks, cap, config.weight, config.calib, runtime_for("cpu", progress=False))
    record = {"config": config.to_dict()}
    write_packed_format("omniquant-packed", model, None, config, record, tmp_path / "q")
    ids = random_ids(2, 24)
    with torch.no_grad():
        want = model(ids).logits
    fast, _ = omniquant.load(tmp_path / "q", kernels=True, device="cuda")
    assert any(isinstance(m, QuantLinear) and m.path == "int4" for m in fast.modules())
    with torch.no_grad():
        got = fast(ids.cuda()).logits.float().cpu()
    assert (got - want).abs().max() <= 5e-2 * want.abs().max()


def test_recompute_matches_kept_weights_under_cuda_bf16_autocast():
    """--recompute (the default) and --no-recompute train the same block on CUDA with bf16
    autocast and weight training: the same losses and weights to bf16's precision, and the
    recomputed run's gradients come back in the parameters' float32."""
    runtime = runtime_for("cuda", "auto", progress=False)
    assert runtime.autocast_dtype == torch.bfloat16
    results = {}
    for recompute in (False, True):
        torch.manual_seed(0)
        model = tiny_model("llama")
        blocks = decoder_layers(model, get_architecture(model))
        cap = capture_block_inputs(model, blocks, list(random_ids(4, 64).split(1)), "cuda")
        cfg = CalibConfig(
            epochs=3, nsamples=4, seqlen=64, weight_lr=0.01, recompute=recompute, val_samples=0
        )
        reports = calibrate_blocks(blocks, cap, WeightQuant(3, 16), cfg, runtime)
        weights = [lin.weight.clone() for lin in block_linears(blocks[0]).values()]
        results[recompute] = (reports, weights)
    (kept, w_kept), (recomputed, w_rec) = results[False], results[True]
    assert all(r.loss_after < r.loss_before for r in recomputed)
    for a, b in zip(kept, recomputed, strict=True):
        assert b.loss_after == pytest.approx(a.loss_after, rel=0.05)
    for a, b in zip(w_kept, w_rec, strict=True):
        assert b.dtype == torch.float32
        # a different rounding of a few weights' codes is bf16 noise; most are the same
        assert (a == b).float().mean() > 0.9
