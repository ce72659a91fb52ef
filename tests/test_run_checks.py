"""The run's checks in one place: the API refuses what the CLI refuses, the CLI's flags are the
config's fields (same defaults), and the failure paths of issue 23 end in one line before the
model is loaded (or, for a failed write, with the work kept)."""

from __future__ import annotations

import dataclasses
import errno
import logging
from collections import namedtuple

import pytest

import omniquant
from omniquant import checks, cli
from omniquant.activations import MemoryPlan
from omniquant.config import ActQuant, CalibConfig, OmniQuantConfig, WeightQuant, check_run
from omniquant.errors import ConfigError, DataError, OutputError
from omniquant.pipeline import plan as plan_step
from omniquant.pipeline import quantize as quantize_step
from omniquant.pipeline import source
from tests.conftest import interrupt_after_block, needs_austen, tiny_config

FAST = ["--epochs", "1", "--nsamples", "2", "--seqlen", "32", "--group-size", "32", "--quiet"]


def _config(**calib) -> OmniQuantConfig:
    calib = {"epochs": 1, "nsamples": 2, "seqlen": 32, **calib}
    return OmniQuantConfig(WeightQuant(4, 32), calib=CalibConfig(**calib))


def run(capsys, *args):
    rc = cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def no_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr(source, "load_model", refuse)


# ---------------------------------------------------------------- one place for settings


@pytest.mark.parametrize(
    "calib, message",
    [
        ({"epochs": 0}, "`epochs` 0 trains nothing"),
        ({"let_lr": 1e-3}, "`let_lr` only applies with `let`"),
        ({"let_alpha": 0.7, "let_lr": 1e-3}, "`let_alpha`, `let_lr` only apply with `let`"),
        ({"e2e_lr": 1e-4}, "`e2e_lr` only applies with `e2e_epochs`"),
    ],
)
def test_the_api_refuses_what_the_cli_refuses_before_loading(
    calib, message, tiny_llama_folder, tmp_path, monkeypatch
):
    no_loading(monkeypatch)
    config = _config(**calib)
    with pytest.raises(ConfigError, match=message):
        check_run(config)
    with pytest.raises(ConfigError, match=message):
        omniquant.quantize(tiny_llama_folder, config, output=tmp_path / "q", progress=False)
    assert not list(tmp_path.iterdir())


def test_rtn_with_zero_epochs_is_not_refused():
    check_run(OmniQuantConfig(calib=CalibConfig(method="rtn", epochs=0)))


@pytest.mark.parametrize(
    "flags, line",
    [
        (["--epochs", "0"], "--epochs 0 trains nothing"),
        (["--let-lr", "0.001"], "--let-lr only applies with --let: set --let, or drop --let-lr"),
        (["--e2e-loss", "next-token"], "--e2e-loss only applies with --e2e-epochs"),
    ],
)
def test_the_cli_names_library_settings_as_its_flags(flags, line, capsys, monkeypatch, tmp_path):
    no_loading(monkeypatch)
    rc, _, err = run(capsys, "quantize", *flags, "--output", tmp_path / "q", "--quiet")
    assert rc == 2 and "Traceback" not in err
    assert line in err and "`" not in err


def test_flag_names_maps_fields_paths_and_overrides():
    text = "use `weight.bits` 7, `act.bits` 16, `group_size` 0, `quantize_qkv` off, `resume`"
    flags = "use --wbits 7, --abits 16, --group-size 0, --qkv-quant off, --resume"
    assert cli.flag_names(text) == flags
    assert cli.flag_names("`seqlen`", cli.EVAL_FLAG_OF) == "--eval-seqlen"
    assert cli.flag_names("`a b` stays") == "`a b` stays"


def _fields(config: object, prefix: str = "") -> dict[str, object]:
    """Every leaf field of the config by dotted path ('weight.bits')."""
    leaves: dict[str, object] = {}
    for f in dataclasses.fields(config):  # type: ignore[arg-type]
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            leaves |= _fields(value, f"{prefix}{f.name}.")
        else:
            leaves[f"{prefix}{f.name}"] = value
    return leaves


def test_every_config_field_is_a_flag_or_named_api_only():
    fields = set(_fields(OmniQuantConfig()))
    assert set(cli.FIELD_FLAGS) | set(cli.API_ONLY_FIELDS) == fields
    assert not set(cli.FIELD_FLAGS) & set(cli.API_ONLY_FIELDS)


def test_the_cli_defaults_are_the_config_defaults():
    args = cli.build_parser().parse_args(["quantize", "--output", "x"])
    assert _fields(cli.config_from_args(args)) == _fields(OmniQuantConfig())


def test_each_flag_reaches_its_field():
    argv = ["quantize", "--output", "x", "--wbits", "3", "--group-size", "0", "--symmetric"]
    argv += ["--epochs", "7", "--let", "--let-lr", "0.002", "--zero-point-grad", "none"]
    argv += ["--e2e-epochs", "2", "--qkv-point", "projection"]
    config = cli.config_from_args(cli.build_parser().parse_args(argv))
    assert config.weight == WeightQuant(3, None, symmetric=True)
    assert config.act == ActQuant(qkv_point="projection")
    assert (config.calib.epochs, config.calib.let, config.calib.let_lr) == (7, True, 0.002)
    assert (config.calib.zero_point_ste, config.calib.e2e_epochs) == (False, 2)


# ---------------------------------------------------------------- model-dependent checks


def test_windows_longer_than_the_models_context_are_refused(
    tiny_llama_folder, tmp_path, monkeypatch
):
    context = tiny_config("llama").max_position_embeddings
    checks.check_context(tiny_config("llama"), context)  # the whole context is fine
    no_loading(monkeypatch)
    with pytest.raises(ConfigError, match=f"`seqlen` {context + 1} is longer than the model's"):
        omniquant.quantize(
            tiny_llama_folder, _config(seqlen=context + 1), output=tmp_path / "q", progress=False
        )
    assert not list(tmp_path.iterdir())


def test_overlapping_windows_are_refused_with_a_guard_and_warned_without(caplog):
    with pytest.raises(DataError, match=r"50 windows x 64 tokens need 3,200 tokens.* has 100"):
        checks.check_windows(100, 50, 64, val_windows=2)
    with caplog.at_level(logging.WARNING, logger="omniquant"):
        checks.check_windows(100, 50, 64, val_windows=0)
    assert "each token is seen about 32.0 times" in caplog.text
    checks.check_windows(3200, 50, 64, val_windows=2)  # enough text: nothing said


@needs_austen
def test_a_short_text_with_the_guard_is_refused_before_calibration(
    tiny_llama_folder, tmp_path, monkeypatch
):
    text = tmp_path / "short.txt"
    text.write_text("It is a truth universally acknowledged. " * 10)
    calls = []
    monkeypatch.setattr(quantize_step, "calibrate_blocks", lambda *a, **k: calls.append(a))
    config = _config(calib_dataset=str(text), nsamples=8, seqlen=64, val_samples=2)
    with pytest.raises(DataError, match="held-out windows would repeat training text"):
        omniquant.quantize(tiny_llama_folder, config, output=tmp_path / "q", progress=False)
    assert not calls and not (tmp_path / "q").exists()


@needs_austen
def test_rtn_takes_one_batch_of_windows(tokenizer):
    rtn = OmniQuantConfig(calib=CalibConfig(method="rtn", nsamples=128, seqlen=64, batch_size=2))
    batches = quantize_step.calibration_batches(tokenizer, rtn)
    assert [tuple(b.shape) for b in batches] == [(2, 64)]
    trained = dataclasses.replace(rtn, calib=dataclasses.replace(rtn.calib, method="omniquant"))
    windows = sum(b.shape[0] for b in quantize_step.calibration_batches(tokenizer, trained))
    assert windows == 128 + trained.calib.val_windows


def test_a_disk_without_room_is_refused_before_loading(tiny_llama_folder, tmp_path, monkeypatch):
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(checks.shutil, "disk_usage", lambda _: Usage(1 << 30, 1 << 30, 1000))
    no_loading(monkeypatch)
    with pytest.raises(OutputError, match=r"has 0.00 GiB free and the run writes about"):
        omniquant.quantize(tiny_llama_folder, _config(), output=tmp_path / "q", progress=False)
    assert not list(tmp_path.iterdir())


def test_an_output_place_that_takes_no_folders_is_one_line_before_loading(
    capsys, monkeypatch, tiny_llama_folder
):
    no_loading(monkeypatch)
    rc, _, err = run(capsys, "quantize", "--model", tiny_llama_folder, "--output", "/proc/x")
    assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "cannot create output folder /proc/x: /proc takes no new folders" in err


def _small_plan(given: bool) -> MemoryPlan:
    return MemoryPlan(
        max_memory=1 << 20,
        stream=False,
        block_bytes=1 << 30,
        work_bytes=1 << 30,
        outside_bytes=0,
        resident_bytes=0,
        batch_bytes=1 << 20,
        n_batches=4,
        store_itemsize=4,
        copies=2,
        given=given,
    )


def test_the_default_budget_is_named_as_the_default_not_as_a_flag():
    with pytest.raises(ConfigError) as default:
        _small_plan(given=False).check("tiny")
    assert "the free memory" in str(default.value)
    assert "the default budget: `max_memory` was not given" in str(default.value)
    with pytest.raises(ConfigError, match=r"^`max_memory` 0.00 GiB is too small"):
        _small_plan(given=True).check("tiny")


def test_the_default_budget_runs_at_the_minimum_when_only_the_margin_is_short(
    tiny_llama_folder, monkeypatch, caplog
):
    shape = source.model_skeleton(tiny_llama_folder)
    need = plan_step.memory_plan(shape, _config(), False, "64GB").minimum
    monkeypatch.setattr(plan_step, "default_max_memory", lambda: need // 2)  # free minus margin
    monkeypatch.setattr(plan_step, "available_memory_bytes", lambda: need + 1)  # free
    with caplog.at_level(logging.WARNING, logger="omniquant"):
        plan = plan_step.memory_plan(shape, _config(), False, None)
    plan.check("tiny")  # runs
    assert plan.max_memory == plan.minimum and "running at the minimum" in caplog.text
    monkeypatch.setattr(plan_step, "available_memory_bytes", lambda: need - 1)  # truly short
    with pytest.raises(ConfigError, match="the free memory"):
        plan_step.memory_plan(shape, _config(), False, None).check("tiny")


# ---------------------------------------------------------------- interrupted and failed runs


@needs_austen
def test_ctrl_c_is_one_line_and_exit_130(capsys, monkeypatch, tiny_llama_folder, tmp_path):
    interrupt_after_block(monkeypatch)
    out = tmp_path / "q"
    rc, _, err = run(capsys, "quantize", "--model", tiny_llama_folder, "--output", out, *FAST)
    assert rc == 130 and "Traceback" not in err and "KeyboardInterrupt" not in err
    assert err.strip().splitlines() == [
        f"interrupted; {out}.partial keeps 1 finished blocks: rerun with --resume to continue"
    ]


@needs_austen
def test_a_failed_write_is_one_line_and_keeps_the_blocks(
    capsys, monkeypatch, tiny_llama_folder, tmp_path
):
    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(quantize_step, "write_output", full_disk)
    out = tmp_path / "q"
    rc, _, err = run(capsys, "quantize", "--model", tiny_llama_folder, "--output", out, *FAST)
    assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "No space left on device" in err and "--resume" in err
    assert not out.exists() and len(list((tmp_path / "q.partial" / "state").glob("*.pt"))) == 2
