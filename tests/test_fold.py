"""Folding is exact: a block computes the same after its parametrizations are folded into plain
tensors as it did with them attached, for every family and every combination of LET, ragged
groups, weight training and activation quantization.

This is the test that catches a quantizer folding a stale weight (a cache that outlived the
tensor it described), or a LET transform folded differently from how it was trained.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from omniquant.block_loop import (
    BlockData,
    Runtime,
    _extra_on_device,
    _train_and_report,
    attach_block_quant,
    fold_parametrizations,
    gather_stats,
    run_block,
)
from omniquant.capture import capture_block_inputs
from omniquant.config import ActQuant, CalibConfig, WeightQuant
from omniquant.models import decoder_layers, get_architecture
from omniquant.quant.activation import attach_act_quantizers
from omniquant.transforms.let import attention_shape, plan_let
from tests.conftest import FAMILIES, random_ids, tiny_model

RT = Runtime(progress=False)


@torch.no_grad()
def run_block_all(block, inputs, extra, runtime) -> list[torch.Tensor]:
    """The block on every batch; outputs back on the CPU in the inputs' dtype."""
    return [
        run_block(block, x.to(runtime.device, torch.float32), extra, runtime).to("cpu", x.dtype)
        for x in inputs
    ]


# hidden 64, MLP 96: g48 leaves a ragged last group of 16 on every 64-wide input; g32 divides both
GROUPS = {"ragged": 48, "even": 32}
CASES = list(itertools.product(FAMILIES, [False, True], GROUPS, [False, True], [16, 4]))


def _block_before_and_after_fold(
    family: str,
    let: bool,
    groups: str,
    weight_training: bool,
    abits: int,
    seed: int = 0,
    **let_options: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    model = tiny_model(family, seed=seed)
    arch = get_architecture(model)
    blocks = decoder_layers(model, arch)
    captured = capture_block_inputs(model, blocks, list(random_ids(4, 24, seed=seed).split(2)))
    act = ActQuant(abits)
    cfg = CalibConfig(
        epochs=2,
        nsamples=4,
        seqlen=24,
        batch_size=2,
        let=let,
        lwc_lr=5e-2,
        let_lr=5e-2,  # large steps, so the trained LET is far from its start
        weight_lr=1e-2 if weight_training else 0.0,
        seed=seed,
        **let_options,
    )
    spec = WeightQuant(bits=3, group_size=GROUPS[groups])
    alpha = 0.5 if act.enabled or cfg.let_init == "reference" else None
    plan = (
        plan_let(arch, model.config, alpha, act.enabled, cfg.let_scale, cfg.let_init)
        if let
        else None
    )
    extra = _extra_on_device(captured.block_args[0], RT.device)
    inputs = captured.hidden
    block = blocks[0]
    block.requires_grad_(False)
    targets = run_block_all(block, inputs, extra, RT)
    stats = gather_stats(block, plan, inputs, extra, RT) if plan is not None else None
    bq = attach_block_quant(block, spec, cfg, plan, stats)
    if act.enabled:
        attach_act_quantizers(block, act, arch, attention_shape(model.config, arch).head_dim)
    # as the block loop does: a "loss before" pass without gradients, then training
    _train_and_report(0, block, bq, BlockData(inputs, targets, None, extra), cfg, RT, 0)
    # the output with the parametrizations, computed with gradients on so that no quantizer
    # serves a cached grouping here: what the fold must reproduce is the trained block itself
    with torch.enable_grad():
        before = torch.cat([run_block(block, x, extra, RT).detach() for x in inputs])
    fold_parametrizations(block)
    after = torch.cat(run_block_all(block, inputs, extra, RT))
    return before, after


@pytest.mark.parametrize(("family", "let", "groups", "weight_training", "abits"), CASES)
def test_a_folded_block_computes_what_it_computed_before_folding(
    family: str, let: bool, groups: str, weight_training: bool, abits: int
) -> None:
    before, after = _block_before_and_after_fold(family, let, groups, weight_training, abits)
    assert torch.isfinite(before).all()
    err = (after - before).abs().max().item()
    size = before.abs().max().item()
    # float32 reassociation only; with 4-bit activations a value that sits on a rounding boundary
    # may flip by one step, so compare the typical error there
    if abits == 16:
        assert err <= 1e-4 * size, (err, size)
    else:
        assert (after - before).abs().mean().item() <= 1e-3 * before.abs().mean().item()


@pytest.mark.parametrize("seed", range(6))
def test_let_with_ragged_groups_folds_the_trained_weights_on_every_seed(seed: int) -> None:
    """The case of the stale-weight bug: LET on, ragged last group, several seeds."""
    before, after = _block_before_and_after_fold("llama", True, "ragged", False, 16, seed)
    assert (after - before).abs().max().item() <= 1e-4 * before.abs().max().item()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(("let_scale", "let_init"), [("direct", "reference"), ("log", "reference")])
def test_the_reference_let_variants_fold_exactly(
    family: str, let_scale: str, let_init: str
) -> None:
    before, after = _block_before_and_after_fold(
        family, True, "ragged", False, 16, let_scale=let_scale, let_init=let_init
    )
    assert (after - before).abs().max().item() <= 1e-4 * before.abs().max().item()


def test_folding_lets_go_of_the_unquantized_weights() -> None:
    """After the fold each linear holds only its quantized weight: no quantizer keeps the grouped
    view of the old tensor (which alone kept a second copy of the block alive: 0.8 GiB on an
    8B-shape block)."""
    import gc
    import weakref

    from omniquant.block_loop import objective

    model = tiny_model("llama")
    blocks = decoder_layers(model, get_architecture(model))
    captured = capture_block_inputs(model, blocks, list(random_ids(4, 24).split(2)))
    block = blocks[0]
    block.requires_grad_(False)
    extra = _extra_on_device(captured.block_args[0], RT.device)
    targets = run_block_all(block, captured.hidden, extra, RT)
    cfg = CalibConfig(epochs=1, nsamples=4, seqlen=24, batch_size=2)
    bq = attach_block_quant(block, WeightQuant(3, 32), cfg, None, None)
    data = BlockData(captured.hidden, targets, None, extra)
    objective(block, data, cfg, RT)  # a no-gradient pass: every quantizer caches its grouping
    assert all(q._cache is not None for q in bq.lwc.values())
    # the old weights, as tensors sharing their storage (set_ replaces a parameter's storage)
    old = {
        name: weakref.ref(lin.parametrizations.weight.original.untyped_storage())
        for name, lin in block.named_modules()
        if hasattr(lin, "parametrizations")
    }
    fold_parametrizations(block)
    gc.collect()
    assert all(q._cache is None for q in bq.lwc.values())
    assert old and all(ref() is None for ref in old.values())
