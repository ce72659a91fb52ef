import importlib.util
import json
import random
import sys
from pathlib import Path

import pytest
import torch

from omniquant import cli
from omniquant.errors import ConfigError, MissingDependencyError
from omniquant.eval.choice_task import write_choice_task
from omniquant.eval.zeroshot import format_table, mean_metrics, require_lm_eval, zeroshot
from tests.tiny_lm import WORDS, save, tiny_llama, train_to_prefer, word_tokenizer

needs_lm_eval = pytest.mark.skipif(
    importlib.util.find_spec("lm_eval") is None,
    reason="needs pip install 'omniquant[zeroshot]'",
)
TASK = "tiny_choice"


def choice_docs(n: int = 8, seed: int = 0) -> list[dict]:
    """Contexts of three words, four one-word choices; the answer sits at position i % 4."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        words = rng.sample(WORDS, 7)
        choices = words[4:]
        choices.insert(i % 4, words[3])
        docs.append({"context": " ".join(words[:3]), "choices": choices, "label": i % 4})
    return docs


@pytest.fixture(scope="module")
def task_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tasks")
    write_choice_task(folder, TASK, choice_docs())
    return folder


@pytest.fixture(scope="module")
def trained_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama trained on each context followed by its right answer."""
    tok = word_tokenizer()
    texts = [f"{d['context']} {d['choices'][d['label']]}" for d in choice_docs()]
    model = train_to_prefer(tiny_llama(len(tok)), tok, texts)
    return save(model, tok, tmp_path_factory.mktemp("model") / "trained")


def direct_loglikelihood(model, tok, context: str, continuation: str) -> tuple[float, bool]:
    """Sum of log-softmax over the continuation's tokens after [BOS] + context; greedy or not."""
    ctx = [tok.bos_token_id, *tok(context, add_special_tokens=False)["input_ids"]]
    cont = tok(continuation, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = model(torch.tensor([ctx + cont])).logits[0].log_softmax(-1)
    rows = [len(ctx) - 1 + j for j in range(len(cont))]
    total = sum(logp[r, t].item() for r, t in zip(rows, cont, strict=True))
    return total, all(logp[r].argmax().item() == t for r, t in zip(rows, cont, strict=True))


@needs_lm_eval
def test_adapter_loglikelihoods_equal_a_direct_computation():
    from lm_eval.api.instance import Instance

    from omniquant.eval.lm_adapter import ModuleLM

    tok = word_tokenizer()
    model = tiny_llama(len(tok), seed=1)
    with torch.no_grad():  # a continuation that greedy decoding produces, so the flag is tested
        after = model(torch.tensor([[tok.bos_token_id, *tok("w1 w2")["input_ids"]]])).logits
    greedy_word = tok.convert_ids_to_tokens(after[0, -1].argmax().item())
    pairs = [
        ("w1 w2", " w3"),
        ("w1 w2", f" {greedy_word}"),
        ("w5 w6 w7 w8 w9 w10", " w11 w12 w13"),
        ("w4", " w4 w4 w4 w4"),
        ("", "w20 w21"),
    ]
    requests = [
        Instance("loglikelihood", doc={}, arguments=pair, idx=i) for i, pair in enumerate(pairs)
    ]
    expected = [direct_loglikelihood(model, tok, *pair) for pair in pairs]
    assert expected[1][1] and not expected[0][1]
    for batch_size in (1, 3):  # padding to the batch's longest sequence changes nothing
        got = ModuleLM(model, tok, batch_size=batch_size).loglikelihood(requests)
        for (ll, greedy), (want, want_greedy) in zip(got, expected, strict=True):
            assert ll == pytest.approx(want, abs=1e-4) and greedy == want_greedy


@needs_lm_eval
def test_a_model_made_to_prefer_the_answers_beats_a_broken_one(trained_folder, task_folder):
    from omniquant import load

    model, tok = load(trained_folder)
    good = zeroshot(model, tok, [TASK], include_path=str(task_folder), progress=False)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()  # uniform next-token distribution: every choice ties, the first wins
    broken = zeroshot(model, tok, [TASK], include_path=str(task_folder), progress=False)
    assert set(good[TASK]) == {"acc", "acc_norm"}
    assert good[TASK]["acc"] == 1.0
    assert broken[TASK]["acc"] == pytest.approx(0.25)  # labels cycle through the 4 positions
    assert mean_metrics(good)["acc"] == 1.0


@needs_lm_eval
def test_limit_caps_the_documents(trained_folder, task_folder):
    from omniquant import load

    model, tok = load(trained_folder)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    # the first 3 documents have their answers at positions 0, 1, 2: first-choice-wins scores 1/3
    out = zeroshot(model, tok, [TASK], include_path=str(task_folder), limit=3, progress=False)
    assert out[TASK]["acc"] == pytest.approx(1 / 3)


@needs_lm_eval
def test_cli_eval_tasks_prints_the_table_and_saves_it(trained_folder, task_folder, capsys):
    argv = ["eval", str(trained_folder), "--tasks", TASK, "--tasks-include", str(task_folder)]
    assert cli.main([*argv, "--save", "--quiet"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith(f"| {TASK}"))
    assert [c.strip() for c in row.strip("|").split("|")][1] == "1.0000"
    assert any(line.startswith("| mean") for line in out.splitlines())
    saved = json.loads((trained_folder / "eval.json").read_text())
    assert saved["zeroshot"][TASK]["acc"] == 1.0


@needs_lm_eval
def test_unknown_tasks_are_named(task_folder):
    tok = word_tokenizer()
    with pytest.raises(ConfigError, match="no_such_task"):
        zeroshot(tiny_llama(len(tok)), tok, ["no_such_task"], include_path=str(task_folder))


def test_missing_lm_eval_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # makes `import lm_eval` fail
    with pytest.raises(MissingDependencyError, match=r"pip install 'omniquant\[zeroshot\]'"):
        require_lm_eval()


def test_cli_reports_a_missing_lm_eval_cleanly(monkeypatch, capsys, trained_folder):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    assert cli.main(["eval", str(trained_folder), "--tasks", "piqa", "--quiet"]) == 2
    assert "omniquant[zeroshot]" in capsys.readouterr().err


def test_format_table_shows_missing_acc_norm_as_a_dash():
    table = format_table({"a": {"acc": 0.5, "acc_norm": 0.75}, "b": {"acc": 0.25}})
    lines = table.splitlines()
    assert lines[2].split("|")[2:4] == [" 0.5000 ", "   0.7500 "]
    assert lines[3].split("|")[3].strip() == "—"
    assert lines[4].split("|")[2].strip() == "0.3750"  # mean acc over both tasks
    assert lines[4].split("|")[3].strip() == "0.7500"  # mean acc_norm over the one task with it
