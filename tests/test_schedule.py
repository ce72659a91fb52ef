import itertools
import math

import pytest
import torch

from omniquant.block_loop import BlockData, attach_block_quant, train_block
from omniquant.capture import BlockArgs
from omniquant.config import CalibConfig, WeightQuant
from omniquant.errors import ConfigError
from omniquant.runtime import Runtime
from omniquant.schedule import lr_factor


def test_every_schedule_starts_at_the_full_rate():
    for schedule in ("constant", "cosine", "linear"):
        assert lr_factor(0, 10, schedule) == 1.0


def test_constant_never_decays():
    assert [lr_factor(t, 8, "constant") for t in range(8)] == [1.0] * 8


def test_cosine_and_linear_decay_monotonically_and_stay_above_zero():
    for schedule in ("cosine", "linear"):
        f = [lr_factor(t, 16, schedule) for t in range(16)]
        assert all(a > b for a, b in itertools.pairwise(f)), schedule
        assert 0 < f[-1] < 0.1, schedule
    assert lr_factor(8, 16, "cosine") == pytest.approx(0.5)
    assert lr_factor(4, 16, "linear") == pytest.approx(0.75)
    assert lr_factor(15, 16, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 15 / 16)))


def test_steps_past_the_end_keep_the_last_factor():
    assert lr_factor(40, 16, "linear") == lr_factor(15, 16, "linear")


def test_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match="cosine"):
        lr_factor(0, 4, "step")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="lr_schedule"):
        CalibConfig(lr_schedule="exponential")  # type: ignore[arg-type]


def _train(schedule: str, epochs: int = 3) -> tuple[list[float], torch.Tensor]:
    """A linear trained with weight training and LWC under `schedule`; returns every group's
    rate at the last step and the weight offset it learned."""
    g = torch.Generator().manual_seed(0)
    block = torch.nn.Sequential(torch.nn.Linear(32, 8, bias=False))
    with torch.no_grad():
        block[0].weight.copy_(torch.randn(8, 32, generator=g))
    teacher = block[0].weight.detach() + 0.3 * torch.randn(8, 32, generator=g)
    xs = [torch.randn(1, 6, 32, generator=g) for _ in range(4)]
    targets = [x @ teacher.T for x in xs]
    cfg = CalibConfig(weight_lr=0.05, epochs=epochs, nsamples=4, seqlen=6, lr_schedule=schedule)
    bq = attach_block_quant(block, WeightQuant(bits=3, group_size=16), cfg, None, None)
    data = BlockData(xs, targets, None, BlockArgs((), {}))
    _, state, _ = train_block(block, bq, data, cfg, Runtime(progress=False), seed=0)
    assert state.step == epochs * len(xs)
    lrs = [group["lr"] for group in state.opt.param_groups]
    return lrs, bq.offsets["0"].delta.detach().clone()


def test_training_applies_the_schedule_to_every_group():
    """12 steps: the last one ran at 1/12 of each group's rate (linear), ~1.7% (cosine), and
    the full rate (constant); the decayed runs moved the weights less."""
    const_lrs, const_delta = _train("constant")
    lin_lrs, lin_delta = _train("linear")
    cos_lrs, cos_delta = _train("cosine")
    assert const_lrs == [1e-2, 0.05]  # LWC's default rate, then the weight offsets'
    assert lin_lrs == pytest.approx([r / 12 for r in const_lrs])
    assert cos_lrs == pytest.approx([r * lr_factor(11, 12, "cosine") for r in const_lrs])
    assert lin_delta.abs().sum() < const_delta.abs().sum()
    assert cos_delta.abs().sum() < const_delta.abs().sum()
