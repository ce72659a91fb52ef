"""`omniquant demo` on a tiny model: float, RTN and OmniQuant rows with two perplexity columns."""

from dataclasses import replace

import pytest
import torch

import omniquant
from omniquant import cli
from omniquant.config import CalibConfig, OmniQuantConfig, WeightQuant
from omniquant.demo import DEMO_DEFAULTS, DemoRow, demo_rows, demo_table, recipe, with_method
from tests.conftest import needs_austen, needs_policy
from tests.tiny_lm import WORDS, save, tiny_llama, word_tokenizer


def test_demo_rows_score_every_method_on_every_text(tmp_path):
    tok = word_tokenizer()
    calib, other = tmp_path / "calib.txt", tmp_path / "other.txt"
    calib.write_text(" ".join(WORDS * 20))
    other.write_text(" ".join(reversed(WORDS * 20)))
    config = OmniQuantConfig(
        WeightQuant(3, 32),
        calib=CalibConfig(
            epochs=2, nsamples=8, seqlen=16, calib_dataset=str(calib), weight_lr=0.01
        ),
    )
    model = tiny_llama(len(tok))
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def evaluate(m: torch.nn.Module, dataset: str) -> float:
        return omniquant.evaluate(
            m, tokenizer=tok, dataset=dataset, seqlen=16, max_windows=4, progress=False
        )

    datasets = [str(calib), str(other)]
    rows = demo_rows(model, tok, config, datasets, evaluate, progress=False)
    assert [(r.method, r.setting) for r in rows] == [
        ("float", "-"),
        ("rtn", "W3A16g32"),
        ("omniquant", "W3A16g32"),
    ]
    assert all(set(r.perplexity) == set(datasets) and min(r.perplexity.values()) > 1 for r in rows)
    assert rows[0].perplexity != rows[1].perplexity  # quantized: another model
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # copies only
    table = demo_table(rows, datasets).splitlines()
    assert len(table) == 5 and table[0].count("|") == 7 and "fallbacks" in table[0]


def test_the_recipe_line_and_the_method_switch():
    config = OmniQuantConfig(
        WeightQuant(3, 128), calib=CalibConfig(nsamples=16, seqlen=512, epochs=2, weight_lr=0.007)
    )
    assert recipe(config) == (
        "LWC + weight training (lr 0.007 steps), 16x512, 2 epochs, guard on 2 held-out windows"
    )
    bounded = OmniQuantConfig(
        WeightQuant(3, 128),
        calib=CalibConfig(
            nsamples=32,
            seqlen=512,
            epochs=4,
            weight_lr=0.007,
            weight_bound=0.5,
            lr_schedule="cosine",
        ),
    )
    assert recipe(bounded) == (
        "LWC + weight training (lr 0.007 steps, within 0.5 steps) + cosine lr, 32x512, "
        "4 epochs, guard on 4 held-out windows"
    )
    assert (
        with_method(config, "rtn").calib.method == "rtn"
        and with_method(config, "rtn").weight == config.weight
    )
    e2e = replace(config, calib=replace(config.calib, e2e_epochs=1, e2e_lr=0.002))
    assert recipe(e2e).startswith(
        "LWC + weight training (lr 0.007 steps) + end-to-end scales (distill, lr 0.002, 1 epochs)"
    )
    assert with_method(e2e, "rtn").calib.e2e_epochs == 0  # the baseline stays plain RTN
    assert with_method(e2e, "omniquant").calib.e2e_epochs == 1


def test_demo_table_formats_one_column_per_text():
    rows = [
        DemoRow("float", "-", {"a": 33.3, "b": 18.4}),
        DemoRow("omniquant", "W3A16g128", {"a": 44.0, "b": 30.5}, 200.0, 1),
    ]
    lines = demo_table(rows, ["a", "b"]).splitlines()
    assert (
        lines[2]
        == "| float      | -          |        33.30 |        18.40 |      0.0 |         - |"
    )
    assert lines[3].endswith("|        44.00 |        30.50 |    200.0 |         1 |")


def test_demo_defaults_are_the_w3a16g128_recipe():
    a = cli.build_parser().parse_args(["demo"])
    config = cli.config_from_args(a)
    assert config.label == "W3A16g128" and a.eval_windows == DEMO_DEFAULTS["eval_windows"] == 40
    assert (config.calib.nsamples, config.calib.epochs, config.calib.weight_lr) == (16, 2, 0.007)
    assert a.ood_dataset == "debian:policy" and config.calib.val_windows == 2


@needs_austen
@needs_policy
def test_the_demo_command_prints_both_perplexity_columns(tmp_path, capsys):
    tok = word_tokenizer()
    folder = save(tiny_llama(len(tok)), tok, tmp_path / "tiny")
    argv = ["demo", "--model", str(folder), "--nsamples", "4", "--seqlen", "32", "--quiet"]
    argv += ["--group-size", "32"]
    argv += [
        "--eval-seqlen",
        "32",
        "--eval-windows",
        "2",
        "--threads",
        str(torch.get_num_threads()),
    ]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "perplexity on the first 2 windows of 32 tokens of each text" in out
    assert "austen:emma" in out and "debian:policy" in out
    assert "| omniquant  | W3A16g32   |" in out


@needs_austen
def test_a_missing_second_text_fails_before_any_calibration(tmp_path, capsys):
    tok = word_tokenizer()
    folder = save(tiny_llama(len(tok)), tok, tmp_path / "tiny")
    argv = ["demo", "--model", str(folder), "--ood-dataset", str(tmp_path / "missing.txt")]
    assert cli.main([*argv, "--quiet"]) == 2
    assert "unknown calibration source" in capsys.readouterr().err


pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
