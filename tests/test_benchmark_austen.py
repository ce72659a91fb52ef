"""benchmarks/austen.py: both perplexity columns (emma and the out-of-domain text) in every row."""

import importlib.util
import json
from pathlib import Path

import torch

from tests.conftest import needs_austen, needs_policy
from tests.tiny_lm import save, tiny_llama, word_tokenizer

BENCHMARK = Path(__file__).parents[1] / "benchmarks" / "austen.py"


def _bench():
    spec = importlib.util.spec_from_file_location("austen_benchmark", BENCHMARK)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


@needs_austen
@needs_policy
def test_every_row_gets_the_out_of_domain_perplexity(tmp_path, capsys):
    bench = _bench()
    tok = word_tokenizer()
    model = save(tiny_llama(len(tok)), tok, tmp_path / "tiny")
    results = tmp_path / "rows.jsonl"
    argv = ["--model", str(model), "--methods", "float", "--results", str(results)]
    assert bench.main([*argv, "--threads", str(torch.get_num_threads())]) == 0
    row = json.loads(results.read_text())
    assert row["ood_dataset"] == "debian:policy" and row["ood_perplexity"] > 1
    line = bench.table(results).splitlines()[2]
    assert line.endswith(f"| {row['perplexity']:,.2f} | {row['ood_perplexity']:,.2f} |")
    capsys.readouterr()


def test_rows_from_before_show_a_dash_and_their_absolute_weight_lr(tmp_path):
    old = {"method": "omniquant", "setting": "W3A16g128", "nsamples": 16, "seqlen": 512}
    old.update(epochs=2, loss="mse", weight_lr=0.001, calib_seconds=370, threads=2)
    new = {**old, "weight_lr": 0.007, "weight_lr_unit": "steps", "perplexity": 40.0}
    new.update(ood_perplexity=30.0, ood_dataset="debian:policy")
    results = tmp_path / "rows.jsonl"
    results.write_text(json.dumps({**old, "perplexity": 43.59}) + "\n" + json.dumps(new) + "\n")
    head, _, before, after = _bench().table(results).splitlines()
    assert "| perplexity (emma) | perplexity (debian:policy) |" in head
    assert "| 0.001 abs. |" in before and before.endswith("| 43.59 | — |")
    assert "| 0.007 |" in after and after.endswith("| 40.00 | 30.00 |")
