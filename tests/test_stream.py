"""Weights streamed from disk give the same quantized model as the model loaded in memory."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import omniquant
from omniquant.config import ActQuant, CalibConfig, OmniQuantConfig, WeightQuant
from omniquant.errors import ConfigError
from omniquant.pipeline import quantize as quantize_step
from omniquant.pipeline import source
from omniquant.pipeline.plan import memory_plan
from omniquant.quant.qparams import GRIDS_FILE, QPARAMS_ATTR
from omniquant.stream import GRID_PARTS, SafetensorsWeights, merge_grid_parts, write_safetensors
from tests.conftest import FAMILIES, interrupt_after_block, needs_austen, tiny_config

pytestmark = needs_austen
FAST = CalibConfig(epochs=1, nsamples=2, seqlen=32)


def _config(calib=FAST, **kw):
    return OmniQuantConfig(WeightQuant(bits=4, group_size=32), calib=calib, **kw)


def _folder(family, tokenizer, root: Path, dtype=torch.float32, shard=None) -> Path:
    """A tiny random model of the family with the SmolLM2 tokenizer, saved as safetensors."""
    torch.manual_seed(0)
    cfg = tiny_config(family)
    cfg.vocab_size = len(tokenizer)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    folder = root / f"{family}-model"
    options = {"max_shard_size": shard} if shard else {}
    model.to(dtype).save_pretrained(folder, **options)
    tokenizer.save_pretrained(folder)
    return folder


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
    return out


def _same_folders(a: Path, b: Path) -> None:
    ta, tb = _tensors(a), _tensors(b)
    grids = "quant_grids.safetensors"
    assert sorted(ta) == sorted(tb)
    for name in ta:
        assert ta[name].dtype == tb[name].dtype and torch.equal(ta[name], tb[name]), name
    assert (a / grids).exists() == (b / grids).exists()
    ca, cb = (json.loads((f / "config.json").read_text()) for f in (a, b))
    assert ca == cb


@pytest.mark.parametrize("family", FAMILIES)
def test_streaming_gives_the_same_weights_as_the_model_in_memory(family, tokenizer, tmp_path):
    folder = _folder(family, tokenizer, tmp_path)
    memory = omniquant.quantize(folder, _config(), output=tmp_path / "mem", progress=False)
    streamed = omniquant.quantize(
        folder, _config(), output=tmp_path / "str", progress=False, stream=True
    )
    _same_folders(tmp_path / "mem", tmp_path / "str")
    assert streamed.report["memory"]["stream"] and not memory.report["memory"]["stream"]
    assert streamed.report["memory"]["peak_rss_bytes"] > 0
    assert all(p.is_meta for p in streamed.model.parameters())  # nothing kept in memory
    # nor the grids: each block's went to disk with the block, and into one file at the end
    assert not any(hasattr(m, QPARAMS_ATTR) for m in streamed.model.modules())
    assert (tmp_path / "str" / GRIDS_FILE).exists() and not (tmp_path / "str" / GRID_PARTS).exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "str")
    ids = torch.randint(0, 1000, (1, 16))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, memory.model(ids).logits)


def test_streaming_a_sharded_bf16_folder_with_let_aug_loss_and_lm_head(tokenizer, tmp_path):
    folder = _folder("qwen3", tokenizer, tmp_path, torch.bfloat16, shard="300KB")
    assert (folder / "model.safetensors.index.json").exists()
    assert len(set(SafetensorsWeights(folder).files.values())) > 1
    calib = CalibConfig(epochs=1, nsamples=2, seqlen=32, let=True, aug_loss=True)
    config = _config(calib, act=ActQuant(bits=8), quantize_lm_head=True)
    omniquant.quantize(folder, config, output=tmp_path / "mem", progress=False)
    omniquant.quantize(folder, config, output=tmp_path / "str", progress=False, stream=True)
    _same_folders(tmp_path / "mem", tmp_path / "str")
    loaded, _ = omniquant.load(tmp_path / "str")  # with its activation quantizers
    assert loaded.config.tie_word_embeddings is False


def test_streamed_run_killed_mid_way_resumes_from_the_written_blocks(
    tokenizer, tmp_path, monkeypatch
):
    folder = _folder("llama", tokenizer, tmp_path)
    omniquant.quantize(folder, _config(), output=tmp_path / "ref", progress=False, stream=True)
    real = interrupt_after_block(monkeypatch)
    out = tmp_path / "q"
    with pytest.raises(KeyboardInterrupt):
        omniquant.quantize(folder, _config(), output=out, progress=False, stream=True)
    partial = tmp_path / "q.partial"
    assert (partial / "output" / "block-00000.safetensors").exists()
    assert not (partial / "output" / "block-00001.safetensors").exists()
    monkeypatch.setattr(quantize_step, "calibrate_blocks", real)
    omniquant.quantize(folder, _config(), output=out, progress=False, stream=True, resume=True)
    assert not partial.exists()
    _same_folders(tmp_path / "ref", out)


def test_stream_settings_are_refused_before_loading(tokenizer, tmp_path):
    folder = _folder("llama", tokenizer, tmp_path)
    with pytest.raises(ConfigError, match="needs an `output`"):
        omniquant.quantize(folder, _config(), stream=True, progress=False)
    with pytest.raises(ConfigError, match="fake format"):
        omniquant.quantize(
            folder, _config(), output=tmp_path / "q", format="compressed-tensors", stream=True
        )
    assert not list(tmp_path.glob("q*"))


def test_a_budget_too_small_for_one_block_fails_first_naming_the_numbers(
    tokenizer, tmp_path, monkeypatch
):
    folder = _folder("llama", tokenizer, tmp_path)
    loads = []
    monkeypatch.setattr(source, "load_model", lambda *a, **k: loads.append(a))
    for stream in (False, True):
        with pytest.raises(ConfigError) as e:
            omniquant.quantize(
                folder,
                _config(),
                output=tmp_path / "q",
                stream=stream,
                max_memory="100MB",
                progress=False,
            )
        msg = str(e.value)
        assert "`max_memory` 0.10 GiB is too small" in msg and "one block takes" in msg
        assert "give at least" in msg
    assert not loads and not list(tmp_path.glob("q*"))


def test_a_small_budget_spills_activations_and_reports_it(tokenizer, tmp_path):
    folder = _folder("llama", tokenizer, tmp_path)
    plan = memory_plan(source.model_skeleton(folder), _config(), True, "1GB")
    just_enough = plan.minimum + plan.batch_bytes  # room for about one batch in RAM
    ref = omniquant.quantize(folder, _config(), output=tmp_path / "a", progress=False)
    run = omniquant.quantize(
        folder,
        _config(),
        output=tmp_path / "b",
        progress=False,
        stream=True,
        max_memory=just_enough,
    )
    assert run.report["memory"]["spilled_bytes"] > 0
    assert ref.report["memory"]["spilled_bytes"] == 0
    _same_folders(tmp_path / "a", tmp_path / "b")


def test_the_cli_streams_reports_memory_and_refuses_a_small_budget(tokenizer, tmp_path, capsys):
    from omniquant.cli import main

    folder = _folder("llama", tokenizer, tmp_path)
    flags = ["--model", str(folder), "--nsamples", "2", "--seqlen", "32", "--epochs", "1"]
    flags += ["--group-size", "32", "--quiet", "--stream"]
    assert main(["quantize", *flags, "--output", str(tmp_path / "q"), "--max-memory", "1M"]) == 2
    err = capsys.readouterr().err
    assert "--max-memory 0.00 GiB is too small" in err and "give at least" in err
    out = tmp_path / "q"
    assert main(["quantize", *flags, "--output", str(out), "--activation-dtype", "bfloat16"]) == 0
    printed = capsys.readouterr().out
    assert "peak RSS" in printed and "activations spilled 0.00 GiB" in printed
    record = json.loads((out / "omniquant.json").read_text())
    assert record["memory"]["activation_dtype"] == "bfloat16"
    assert record["config"]["calib"]["activation_dtype"] == "bfloat16"


def test_streaming_a_hub_model_from_the_hub_cache(tokenizer, tmp_path, monkeypatch):
    """A Hub id streams from huggingface_hub's cache (offline here: a cache laid out by hand)."""
    folder = _folder("qwen2", tokenizer, tmp_path)
    cache = tmp_path / "hub"
    snapshot = cache / "models--tiny--qwen2" / "snapshots" / ("0" * 40)
    snapshot.parent.mkdir(parents=True)
    (cache / "models--tiny--qwen2" / "refs").mkdir()
    (cache / "models--tiny--qwen2" / "refs" / "main").write_text("0" * 40)
    folder.rename(snapshot)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)  # "tiny/qwen2" is not a local path
    run = omniquant.quantize(
        "tiny/qwen2", _config(), output=tmp_path / "str", progress=False, stream=True
    )
    assert run.report["model"] == "tiny/qwen2"
    omniquant.quantize(snapshot, _config(), output=tmp_path / "mem", progress=False)
    _same_folders(tmp_path / "mem", tmp_path / "str")


def test_the_memory_plan_counts_the_training_working_set(tokenizer, tmp_path):
    """A block trains in 2 blocks of memory with --recompute, 4 without; weight training adds its
    offsets, their gradients, AdamW's moments and the guard's copies; RTN needs 2."""
    skeleton = source.model_skeleton(_folder("llama", tokenizer, tmp_path))

    def work(**calib):
        plan = memory_plan(skeleton, _config(replace(FAST, **calib)), True, None)
        return plan.work_bytes / plan.block_bytes

    assert work(recompute=True) == 2
    assert work(recompute=False) == 4
    assert work(recompute=True, weight_lr=0.01) == 8
    assert work(method="rtn") == 2


def test_grid_parts_merge_into_one_file_and_are_removed(tmp_path):
    from safetensors.torch import load_file

    from omniquant.stream import Entry

    parts = tmp_path / GRID_PARTS
    parts.mkdir()
    g = torch.Generator().manual_seed(0)
    want = {}
    for i in range(3):
        block = {
            f"model.layers.{i}.mlp.up_proj.scales": torch.rand(8, 2, generator=g),
            f"model.layers.{i}.mlp.up_proj.zeros": torch.randint(0, 15, (8, 2), generator=g),
        }
        want.update(block)
        entries = [Entry.of(k, v) for k, v in block.items()]
        write_safetensors(parts / f"block-{i:05d}.safetensors", entries, {})
    assert merge_grid_parts(tmp_path, tmp_path / GRIDS_FILE)
    got = load_file(str(tmp_path / GRIDS_FILE))
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[k], want[k]) and got[k].dtype == want[k].dtype for k in want)
    assert not parts.exists()
    assert not merge_grid_parts(tmp_path, tmp_path / "none.safetensors")  # nothing to merge
    assert not (tmp_path / "none.safetensors").exists()


def test_only_streamed_runs_map_large_allocations(tokenizer, tmp_path, monkeypatch):
    import sys

    import omniquant.block_loop as block_loop_mod
    from omniquant.memory import map_large_allocations

    if sys.platform.startswith("linux"):
        assert map_large_allocations()  # glibc takes the setting
    calls = []
    monkeypatch.setattr(block_loop_mod, "map_large_allocations", lambda: calls.append(1))
    folder = _folder("llama", tokenizer, tmp_path)
    omniquant.quantize(folder, _config(), output=tmp_path / "mem", progress=False)
    assert calls == []
    omniquant.quantize(folder, _config(), output=tmp_path / "str", progress=False, stream=True)
    assert calls == [1]
