import importlib.util
import json
from pathlib import Path

import pytest
import torch

from omniquant.data.austen import read_austen
from omniquant.eval.austen_tasks import (
    DISTRACTORS,
    build_docs,
    paragraphs,
    split_sentences,
    write_austen_task,
)
from tests.conftest import needs_austen, needs_policy
from tests.tiny_lm import save, tiny_llama, word_tokenizer

BENCHMARK = Path(__file__).parents[2] / "benchmarks" / "austen.py"


def flat(novel: str) -> str:
    """The novel as one line, as the task builder normalizes it."""
    return " ".join(paragraphs(read_austen(novel)))


def test_sentences_split_after_stops_and_closing_quotes_but_not_abbreviations():
    text = 'Mrs. Smith came. "Is it you?" said Anne. "Yes." Capt. F. Wentworth bowed!'
    assert split_sentences(text) == [
        "Mrs. Smith came.",
        '"Is it you?" said Anne.',
        '"Yes."',
        "Capt. F. Wentworth bowed!",
    ]


@needs_austen
def test_next_sentence_docs_are_deterministic_and_true_to_the_novel():
    docs = build_docs("persuasion", n=40, seed=0)
    assert docs == build_docs("persuasion", n=40, seed=0)
    assert docs != build_docs("persuasion", n=40, seed=1)
    text, other = flat("persuasion"), flat("emma")
    labels = set()
    for doc in docs:
        choices, label = doc["choices"], doc["label"]
        assert len(choices) == DISTRACTORS + 1 and len(set(choices)) == len(choices)
        # the right answer is the sentence that follows the context in the novel
        assert f"{doc['context']} {choices[label]}" in text
        for i, choice in enumerate(choices):
            assert choice in text  # distractors come from the same novel ...
            if i != label:
                assert f"{doc['context']} {choice}" not in text  # ... but do not follow
        labels.add(label)
    assert labels == set(range(DISTRACTORS + 1))  # the answer's position varies
    assert not any(doc["context"] in other for doc in docs)


@needs_austen
def test_write_austen_task_writes_a_yaml_and_its_jsonl(tmp_path):
    name = write_austen_task(tmp_path, n=12, seed=3)
    assert name == "austen_next_sentence_persuasion"
    yaml = (tmp_path / f"{name}.yaml").read_text()
    assert f"task: {json.dumps(name)}" in yaml and "dataset_path: json" in yaml
    assert json.dumps(str((tmp_path / f"{name}.jsonl").resolve())) in yaml
    lines = (tmp_path / f"{name}.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == build_docs("persuasion", n=12, seed=3)


@needs_austen
@needs_policy
@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="needs lm-eval")
def test_benchmark_zeroshot_rows_on_a_tiny_model(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("austen_benchmark", BENCHMARK)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    tok = word_tokenizer()
    model = save(tiny_llama(len(tok)), tok, tmp_path / "tiny")
    results = tmp_path / "rows.jsonl"
    argv = ["--model", str(model), "--methods", "float", "--results", str(results)]
    argv += ["--threads", str(torch.get_num_threads())]  # leave the session's setting as it is
    assert bench.main([*argv, "--zeroshot", "--zeroshot-items", "16"]) == 0
    row = json.loads(results.read_text())
    assert row["zeroshot_task"] == "austen_next_sentence_persuasion"
    assert row["zeroshot_items"] == 16
    for key in ("zeroshot_acc", "zeroshot_acc_norm"):
        assert 0 <= row[key] <= 1 and row[key] * 16 == pytest.approx(round(row[key] * 16))
    table = bench.table(results)
    assert "next-sentence acc / acc_norm" in table.splitlines()[0]
    assert table.splitlines()[2].endswith(
        f"| {row['zeroshot_acc']:.3f} / {row['zeroshot_acc_norm']:.3f} |"
    )
    # a results file without zero-shot rows keeps its old table
    (tmp_path / "old.jsonl").write_text(
        json.dumps({k: v for k, v in row.items() if "zeroshot" not in k}) + "\n"
    )
    assert "next-sentence" not in bench.table(tmp_path / "old.jsonl")
    capsys.readouterr()
