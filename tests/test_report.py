import json
import logging
import sys
from pathlib import Path

import pytest

import omniquant
from omniquant import cli
from omniquant.config import CalibConfig, OmniQuantConfig, WeightQuant
from omniquant.errors import OutputError
from omniquant.report import (
    BITS_PLOT,
    BLOCK_PLOT,
    EPOCH_PLOT,
    REPORT_MD,
    combine_runs,
    needs_log,
    save_eval,
    write_run_report,
)
from tests.tiny_lm import WORDS, tiny_llama, word_tokenizer

mpimg = pytest.importorskip("matplotlib.image")


def fake_report(bits: int = 3, group: int | None = 128, method: str = "omniquant", epochs=3):
    """An omniquant.json report of 6 blocks whose loss grows 1000-fold from first to last."""
    config = OmniQuantConfig(
        WeightQuant(bits, group), calib=CalibConfig(method=method, epochs=epochs)
    )
    blocks = [
        {
            "index": i,
            "loss_before": 0.1 * 4**i,
            "loss_after": 0.07 * 4**i,
            "seconds": 1.5,
            "epoch_losses": [0.09 * 4**i * 0.9**e for e in range(epochs)]
            if method != "rtn"
            else [],
            "nan_events": 0,
            "final_lr_scale": 1.0,
        }
        for i in range(6)
    ]
    return {
        "model": "tiny",
        "architecture": "llama",
        "setting": config.label,
        "config": config.to_dict(),
        "runtime": {"device": "cpu", "autocast": "float32", "threads": 1},
        "calibration_seconds": 9.0,
        "nan_events": 0,
        "blocks": blocks,
        "versions": {"omniquant": "0.1.0"},
    }


def make_run(folder: Path, report: dict, ppl: float | None = None) -> Path:
    folder.mkdir(parents=True)
    (folder / "omniquant.json").write_text(json.dumps(report))
    if ppl is not None:
        save_eval(folder, {"perplexity": ppl, "dataset": "austen:emma"})
    return folder


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) in pixels of a PNG that decodes."""
    image = mpimg.imread(path)
    assert image.ndim == 3 and image.std() > 0  # decoded, and not a blank canvas
    return image.shape[1], image.shape[0]


def test_run_report_writes_markdown_and_decodable_plots(tmp_path):
    written = write_run_report(tmp_path, fake_report())
    names = {p.name for p in written}
    assert names == {REPORT_MD, BLOCK_PLOT, EPOCH_PLOT}
    for path in written:
        assert path.is_file() and path.stat().st_size > 0
    assert png_size(tmp_path / BLOCK_PLOT) == (800, 450)  # the plot width
    assert png_size(tmp_path / EPOCH_PLOT) == (800, 450)
    md = (tmp_path / REPORT_MD).read_text()
    assert f"]({BLOCK_PLOT})" in md and f"]({EPOCH_PLOT})" in md
    assert "| 5 | 102.4 | 71.68 | 0.7 |" in md  # block 5: before, after, after / before
    assert "W3A16g128" in md and "omniquant (LWC)" in md


def test_rtn_runs_have_no_epoch_curve(tmp_path):
    written = write_run_report(tmp_path, fake_report(method="rtn"))
    assert {p.name for p in written} == {REPORT_MD, BLOCK_PLOT}
    assert "No curve" in (tmp_path / REPORT_MD).read_text()


def test_log_scale_only_where_the_range_demands_it():
    assert needs_log([0.1, 102.4]) and not needs_log([1.0, 2.0, 3.0])
    assert not needs_log([float("nan"), 5.0])  # one finite value: nothing to spread


def test_without_matplotlib_the_markdown_is_written_alone(tmp_path, monkeypatch, caplog):
    for name in [m for m in sys.modules if m.split(".")[0] == "matplotlib"] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)  # every matplotlib import now fails
    with caplog.at_level(logging.WARNING):
        written = write_run_report(tmp_path, fake_report())
    assert written == [tmp_path / REPORT_MD] and not list(tmp_path.glob("*.png"))
    assert "matplotlib is not installed" in caplog.text
    assert "(no plot)" in (tmp_path / REPORT_MD).read_text()


def test_quantize_writes_the_report_beside_omniquant_json(tmp_path):
    tok = word_tokenizer()
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(WORDS * 20))
    config = OmniQuantConfig(
        WeightQuant(4, 32),
        calib=CalibConfig(epochs=2, nsamples=2, seqlen=16, calib_dataset=str(text)),
    )
    out = tmp_path / "run"
    omniquant.quantize(tiny_llama(len(tok)), config, tokenizer=tok, output=out, progress=False)
    assert {"omniquant.json", REPORT_MD, BLOCK_PLOT, EPOCH_PLOT} <= {p.name for p in out.iterdir()}
    png_size(out / BLOCK_PLOT)
    report = json.loads((out / "omniquant.json").read_text())
    md = (out / REPORT_MD).read_text()
    assert f"{report['calibration_seconds']:.1f}" in md and len(report["blocks"]) == 2
    # the time splits into the training epochs and the fixed passes around them
    assert 0 < report["train_seconds"] < report["calibration_seconds"]
    assert report["train_seconds"] == pytest.approx(
        sum(b["train_seconds"] for b in report["blocks"])
    )
    total = report["train_seconds"] + report["fixed_seconds"]
    assert total == pytest.approx(report["calibration_seconds"])


def test_combine_runs_tables_and_plots_perplexity_against_bits(tmp_path):
    runs = [
        make_run(tmp_path / "w4", fake_report(4), ppl=40.0),
        make_run(tmp_path / "w3", fake_report(3), ppl=65.0),
        make_run(tmp_path / "w2", fake_report(2, 64), ppl=790.0),
        make_run(tmp_path / "w3-rtn", fake_report(3, method="rtn")),  # no eval.json
    ]
    md = combine_runs(runs, tmp_path / "combined")
    text = md.read_text()
    assert png_size(tmp_path / "combined" / BITS_PLOT) == (800, 450)
    assert f"]({BITS_PLOT})" in text
    rows = {
        line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| w")
    }
    assert set(rows) == {"w4", "w3", "w2", "w3-rtn"}
    assert rows["w2"].rstrip(" |").endswith("790.00")
    assert "not measured (no eval.json)" in rows["w3-rtn"]


def test_combine_runs_refuses_a_folder_that_is_not_a_run(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(OutputError, match="not a run folder"):
        combine_runs([tmp_path / "empty"], tmp_path / "out")


def test_save_eval_merges_results(tmp_path):
    save_eval(tmp_path, {"perplexity": 40.0})
    save_eval(tmp_path, {"zeroshot": {"a": {"acc": 0.5}}})
    save_eval(tmp_path, {"zeroshot": {"b": {"acc": 0.75}}})
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved == {"perplexity": 40.0, "zeroshot": {"a": {"acc": 0.5}, "b": {"acc": 0.75}}}


def test_cli_report_combines_run_folders(tmp_path, capsys):
    runs = [
        make_run(tmp_path / "a", fake_report(4), ppl=40.0),
        make_run(tmp_path / "b", fake_report(3), ppl=65.0),
    ]
    out = tmp_path / "out"
    assert cli.main(["report", *map(str, runs), "--output", str(out), "--quiet"]) == 0
    assert str(out / REPORT_MD) in capsys.readouterr().out
    assert (out / BITS_PLOT).stat().st_size > 0
    assert "| a | omniquant (LWC) | W4A16g128 |" in (out / REPORT_MD).read_text()


def test_cli_eval_save_needs_a_model_folder(capsys):
    assert cli.main(["eval", "smollm2", "--save", "--quiet"]) == 2
    assert "not a folder" in capsys.readouterr().err


def test_the_report_shows_blocks_that_fell_back(tmp_path):
    report = fake_report()
    report["val_windows"] = 4
    report["blocks"][2].update(val_losses=[1.5, 4.3, 5.0], best_epoch=0, fell_back=True)
    report["blocks"][3].update(val_losses=[1.5, 0.4, 0.5], best_epoch=1, stopped_early=True)
    write_run_report(tmp_path, report)
    md = (tmp_path / REPORT_MD).read_text()
    assert "4 held-out windows, patience 2; fell back: 2; stopped early: 1 blocks" in md
    assert "1.5, epochs 4.3, 5: **fell back** to the start" in md
    assert "1.5 → 0.4 (epoch 1)" in md


def test_quantize_records_the_guard_in_omniquant_json_and_the_report(tmp_path):
    """Through the API: held-out windows drawn after the training ones; a huge weight learning
    rate makes every block fall back, and omniquant.json and report.md say so."""
    tok = word_tokenizer()
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(WORDS * 20))
    calib = CalibConfig(epochs=2, nsamples=4, seqlen=16, calib_dataset=str(text), weight_lr=20.0)
    out = tmp_path / "run"
    config = OmniQuantConfig(WeightQuant(4, 32), calib=calib)
    omniquant.quantize(tiny_llama(len(tok)), config, tokenizer=tok, output=out, progress=False)
    report = json.loads((out / "omniquant.json").read_text())
    assert report["val_windows"] == 1 and report["fallbacks"] == [0, 1]
    assert all(len(b["val_losses"]) == 3 and b["stopped_early"] is False for b in report["blocks"])
    assert "fell back: 0, 1" in (out / REPORT_MD).read_text()
