import pytest
import torch

from omniquant.activations import ActivationStore, MemoryBudget, parse_bytes, peak_rss_bytes
from omniquant.block_loop import LoopMemory, calibrate_blocks
from omniquant.capture import capture_block_inputs
from omniquant.config import CalibConfig, WeightQuant
from omniquant.models import decoder_layers, get_architecture
from omniquant.runtime import Runtime
from omniquant.transforms.let import attention_shape, plan_let
from tests.conftest import random_ids, tiny_model


def _batches(n=3):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, 5, 8, generator=g) for _ in range(n)]


def test_a_spilled_store_holds_the_same_values_as_one_in_ram(tmp_path):
    batches = _batches()
    ram = ActivationStore.of("a", torch.float32, MemoryBudget(), batches)
    budget = MemoryBudget(limit=0, folder=tmp_path / "spill")
    disk = ActivationStore.of("a", torch.float32, budget, batches)
    assert disk.spilled == 3 and ram.spilled == 0
    assert budget.spilled_bytes == 3 * 2 * 5 * 8 * 4 and budget.ram_bytes == 0
    for x, y in zip(ram, disk, strict=True):
        assert torch.equal(x, y)
    disk[1] = batches[1] * 2  # replaced in place: a batch read earlier keeps its old values
    earlier = disk[1 - 1]
    assert torch.equal(disk[1], batches[1] * 2) and torch.equal(earlier, batches[0])
    assert [t.shape for t in disk[1:]] == [(2, 5, 8)] * 2
    disk.clear()
    assert not any((tmp_path / "spill").iterdir()) and budget.disk_bytes == 0


def test_the_budget_keeps_what_fits_in_ram_and_spills_the_rest(tmp_path):
    one = 2 * 5 * 8 * 2  # a bf16 batch
    budget = MemoryBudget(limit=2 * one, folder=tmp_path)
    store = ActivationStore.of("b", torch.bfloat16, budget, _batches(3))
    assert store.spilled == 1 and budget.ram_bytes == 2 * one and budget.peak_ram_bytes == 2 * one
    assert all(t.dtype == torch.bfloat16 for t in store)
    assert torch.equal(store[2], _batches(3)[2].to(torch.bfloat16))


def test_memory_sizes_parse():
    assert parse_bytes("24GB") == 24 << 30
    assert parse_bytes("1.5GiB") == int(1.5 * (1 << 30))
    assert parse_bytes("800M") == 800 << 20
    assert parse_bytes("4096") == 4096
    for bad in ("lots", "-1G", "0"):
        with pytest.raises(ValueError):
            parse_bytes(bad)
    assert peak_rss_bytes() > 10 << 20


def _calibrate(family, memory, let=False, aug=False):
    model = tiny_model(family)
    arch = get_architecture(model)
    blocks = decoder_layers(model, arch)
    cfg = CalibConfig(nsamples=4, batch_size=1, seqlen=24, epochs=1, let=let, aug_loss=aug)
    cap = capture_block_inputs(model, blocks, list(random_ids(6, 24).split(1)))
    plan = plan_let(arch, model.config, None, shifts=False) if let else None
    reports = calibrate_blocks(
        blocks,
        cap,
        WeightQuant(3, 16),
        cfg,
        Runtime(progress=False),
        let_plan=plan,
        arch=arch,
        head_dim=attention_shape(model.config, arch).head_dim,
        val_batches=2,
        memory=memory,
    )
    losses = [(r.loss_before, r.loss_after, r.val_losses) for r in reports]
    return model.state_dict(), losses


@pytest.mark.parametrize(("family", "let", "aug"), [("llama", True, True), ("opt", False, False)])
def test_spilled_activations_give_the_same_weights_as_activations_in_ram(
    family, let, aug, tmp_path
):
    in_ram, losses_ram = _calibrate(family, LoopMemory(), let, aug)
    budget = MemoryBudget(limit=0, folder=tmp_path / "spill")
    spilled, losses_spilled = _calibrate(family, LoopMemory(budget=budget), let, aug)
    assert budget.spilled_bytes > 0 and budget.peak_ram_bytes == 0
    assert losses_ram == losses_spilled
    for name, value in in_ram.items():
        assert torch.equal(value, spilled[name]), name
    assert not list((tmp_path / "spill").iterdir())  # the loop deletes its spill files


def test_the_loop_keeps_two_chains_of_activations_three_with_aug_loss():
    one_chain = 6 * 24 * 64 * 4  # 6 windows of 24 tokens, hidden 64, float32
    for aug, copies in ((False, 2), (True, 3)):
        budget = MemoryBudget()
        _calibrate("llama", LoopMemory(budget=budget), aug=aug)
        assert budget.peak_ram_bytes <= copies * one_chain + 24 * 64 * 4  # + one batch in flight
        assert LoopMemory().copies(CalibConfig(aug_loss=aug)) == copies


def test_bf16_storage_runs_and_stays_close(tmp_path):
    f32, _ = _calibrate("llama", LoopMemory())
    bf16, _ = _calibrate("llama", LoopMemory(dtype=torch.bfloat16))
    w = "model.layers.1.mlp.down_proj.weight"
    assert (f32[w] - bf16[w]).abs().max() < 0.5  # at most a few grid points apart
