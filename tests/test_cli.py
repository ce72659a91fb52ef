import json
import os
import subprocess
import sys

import pytest

from tests.conftest import needs_austen, needs_policy

FLAGS = [
    "--wbits",
    "--abits",
    "--group-size",
    "--lwc",
    "--let",
    "--epochs",
    "--nsamples",
    "--seqlen",
    "--calib-dataset",
    "--lwc-lr",
    "--let-lr",
    "--wd",
    "--e2e-epochs",
    "--e2e-lr",
    "--e2e-loss",
    "--e2e-topk",
    "--aug-loss",
    "--seed",
    "--device",
    "--dtype",
    "--output",
    "--resume",
    "--method",
    "--model",
    "--batch-size",
]


def omniquant(*args, check=True):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "omniquant", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_quantize_help_explains_every_flag():
    out = omniquant("quantize", "--help").stdout
    for flag in FLAGS:
        assert flag in out, flag
    assert "round-to-nearest" in out and "weight bits" in out


def test_bad_bits_exit_with_a_message():
    proc = omniquant("quantize", "--wbits", "9", "--output", "/tmp/never", check=False)
    assert proc.returncode == 2 and "weight bits must be an integer from 2 to 8" in proc.stderr
    assert not os.path.exists("/tmp/never")


def test_missing_model_exits_with_a_message(tmp_path):
    proc = omniquant("eval", str(tmp_path / "missing"), check=False)
    assert proc.returncode == 2 and "does not exist" in proc.stderr


@needs_austen
def test_quantize_then_eval_through_the_cli(tiny_llama_folder, tmp_path):
    out = tmp_path / "q"
    proc = omniquant(
        "quantize",
        "--model",
        str(tiny_llama_folder),
        "--wbits",
        "3",
        "--group-size",
        "32",
        "--epochs",
        "1",
        "--nsamples",
        "2",
        "--seqlen",
        "32",
        "--output",
        str(out),
        "--eval",
        "--eval-seqlen",
        "32",
        "--eval-windows",
        "2",
        "--quiet",
    )
    assert "W3A16g32 omniquant: 2 blocks" in proc.stdout
    ppl_after = float(proc.stdout.strip().splitlines()[-1].split(":")[-1])
    assert json.loads((out / "omniquant.json").read_text())["setting"] == "W3A16g32"
    proc = omniquant("eval", str(out), "--eval-seqlen", "32", "--eval-windows", "2", "--quiet")
    assert json.loads(proc.stdout.strip().splitlines()[-1])["perplexity"] == pytest.approx(
        ppl_after, rel=1e-4
    )


def test_every_flag_reaches_the_config():
    from omniquant.cli import build_parser, config_from_args

    args = build_parser().parse_args(
        [
            "quantize",
            "--output",
            "x",
            "--wbits",
            "3",
            "--abits",
            "8",
            "--group-size",
            "64",
            "--no-lwc",
            "--let",
            "--epochs",
            "7",
            "--nsamples",
            "6",
            "--seqlen",
            "99",
            "--batch-size",
            "2",
            "--calib-dataset",
            "austen:emma",
            "--lwc-lr",
            "0.3",
            "--let-lr",
            "0.2",
            "--let-alpha",
            "0.6",
            "--wd",
            "0.1",
            "--weight-lr",
            "0.01",
            "--aug-loss",
            "--loss",
            "token-normalized",
            "--seed",
            "5",
            "--method",
            "rtn",
            "--symmetric",
            "--quantize-lm-head",
            "--val-samples",
            "2",
            "--patience",
            "3",
            "--shuffle",
        ]
    )
    c = config_from_args(args)
    assert (c.weight.bits, c.weight.group_size, c.weight.symmetric) == (3, 64, True)
    assert c.act.bits == 8 and c.quantize_lm_head
    k = c.calib
    assert (k.method, k.lwc, k.let, k.epochs, k.nsamples, k.seqlen, k.batch_size) == (
        "rtn",
        False,
        True,
        7,
        6,
        99,
        2,
    )
    assert (k.calib_dataset, k.lwc_lr, k.let_lr, k.let_alpha, k.wd, k.weight_lr) == (
        "austen:emma",
        0.3,
        0.2,
        0.6,
        0.1,
        0.01,
    )
    assert (k.aug_loss, k.loss, k.seed) == (True, "token-normalized", 5)
    assert (k.val_samples, k.patience, k.shuffle) == (2, 3, True)
    e2e = config_from_args(
        build_parser().parse_args(
            [
                "quantize",
                "--output",
                "x",
                "--e2e-epochs",
                "2",
                "--e2e-lr",
                "0.005",
                "--e2e-loss",
                "next-token",
                "--e2e-topk",
                "8",
            ]
        )
    )
    assert (e2e.calib.e2e_epochs, e2e.calib.e2e_lr) == (2, 0.005)
    assert (e2e.calib.e2e_loss, e2e.calib.e2e_topk) == ("next-token", 8)


@needs_austen
@needs_policy
def test_demo_prints_float_rtn_and_omniquant_rows(tiny_llama_folder):
    proc = omniquant(
        "demo",
        "--model",
        str(tiny_llama_folder),
        "--group-size",
        "32",
        "--nsamples",
        "2",
        "--seqlen",
        "32",
        "--epochs",
        "1",
        "--eval-seqlen",
        "32",
        "--eval-windows",
        "2",
        "--quiet",
    )
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ")][1:]
    assert [r.split("|")[1].strip() for r in rows] == ["float", "rtn", "omniquant"]
    assert all(float(r.split("|")[3]) > 1 for r in rows)
    assert "W3A16g32" in rows[1]


@needs_austen
def test_quiet_silences_transformers_bars_for_the_command_only(tiny_llama_folder, capsys):
    from transformers.utils import logging as hf_logging

    from omniquant.cli import main

    assert hf_logging.is_progress_bar_enabled()
    rc = main(
        ["eval", str(tiny_llama_folder), "--eval-windows", "2", "--eval-seqlen", "32", "--quiet"]
    )
    assert rc == 0
    assert "Loading weights" not in capsys.readouterr().err
    assert hf_logging.is_progress_bar_enabled()  # back as it was
