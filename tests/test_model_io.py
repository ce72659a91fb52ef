"""Why `load_model` refuses a broken local folder: each refusal names what is wrong (a bad
config.json, no weights file, extra, missing or misshapen tensors) in one line, never the Hub,
and transformers' own load report is not printed before it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from omniquant.errors import ModelError
from omniquant.model_io import load_config, load_model, quiet_load_report
from tests.conftest import needs_austen
from tests.tiny_lm import save, tiny_llama, word_tokenizer

WRONG_REASONS = ("not a local model folder", "Hub did not provide", "is the download complete")
REPORT_MARKS = ("LOAD REPORT", "UNEXPECTED", "MISSING", "MISMATCH")
WEIGHTS = "model.safetensors"


@pytest.fixture(autouse=True)
def hf_stderr(capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Point transformers' log handler at this test's stderr: it holds the sys.stderr of its
    import, which capfd does not read, so "not printed" checks would pass whatever is logged."""
    import transformers.utils.logging as hf_logging

    hf_logging.get_logger("transformers")  # makes the handler, if not made yet
    handler = hf_logging._default_handler
    assert handler is not None
    monkeypatch.setattr(handler, "stream", sys.stderr)
    monkeypatch.setattr(handler, "flush", sys.stderr.flush)


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny Llama with a word-level tokenizer (loads cleanly with load_model)."""
    tokenizer = word_tokenizer()
    return save(tiny_llama(len(tokenizer)), tokenizer, tmp_path_factory.mktemp("base") / "tiny")


@pytest.fixture
def folder(base_folder: Path, tmp_path: Path) -> Path:
    """A fresh copy of the tiny model folder, to break."""
    return Path(shutil.copytree(base_folder, tmp_path / "model"))


def refusal(path: Path) -> str:
    """The message of load_model's ModelError: one line, with none of the wrong reasons."""
    with pytest.raises(ModelError) as info:
        load_model(path)
    message = str(info.value)
    assert "\n" not in message, message
    for wrong in WRONG_REASONS:
        assert wrong not in message, message
    return message


def edit_config(folder: Path, **changes: object) -> None:
    """Rewrite config.json with keys changed (None drops the key)."""
    file = folder / "config.json"
    config = json.loads(file.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    file.write_text(json.dumps(config))


def edit_weights(folder: Path, edit) -> None:
    """Rewrite model.safetensors with `edit(state)` applied to its tensors."""
    state = load_file(folder / WEIGHTS)
    edit(state)
    save_file(state, folder / WEIGHTS, metadata={"format": "pt"})


def assert_no_report(capfd: pytest.CaptureFixture[str]) -> None:
    out, err = capfd.readouterr()
    for mark in REPORT_MARKS:
        assert mark not in out and mark not in err, out + err


# ---------------------------------------------------------------- config.json


def test_a_clean_folder_loads(folder, capfd):
    model, tokenizer = load_model(folder)
    assert not model.training and tokenizer("w1 w2")["input_ids"]
    assert_no_report(capfd)


def test_invalid_json_names_the_file_and_the_line(folder):
    (folder / "config.json").write_text('{"model_type": "llama",\n  oops}')
    message = refusal(folder)
    assert message.startswith(f"{folder / 'config.json'} is not valid JSON (line 2 column 3: ")
    assert "double quotes" in message


def test_an_empty_config_is_not_valid_json(folder):
    (folder / "config.json").write_text("")
    assert f"{folder / 'config.json'} is not valid JSON (line 1 column 1" in refusal(folder)


def test_a_config_that_is_not_an_object_is_refused(folder):
    (folder / "config.json").write_text("[1, 2]")
    assert f"{folder / 'config.json'} holds an array, not a JSON object" in refusal(folder)


def test_a_config_without_model_type_or_architectures_says_so(folder):
    edit_config(folder, model_type=None, architectures=None)
    message = refusal(folder)
    assert f"{folder / 'config.json'} names no model_type" in message
    assert '"model_type": "llama"' in message


def test_a_config_without_model_type_suggests_the_one_of_its_architecture(folder):
    edit_config(folder, model_type=None, architectures=["Qwen2ForCausalLM"])
    message = refusal(folder)
    assert "names no model_type" in message
    assert '"model_type": "qwen2" for its architecture Qwen2ForCausalLM' in message


def test_load_config_gives_the_same_reason(folder):
    edit_config(folder, model_type=None)
    with pytest.raises(ModelError, match=r"config\.json names no model_type"):
        load_config(folder)


# ---------------------------------------------------------------- weights files


def test_a_folder_without_weights_says_it_has_no_weights_file(folder):
    (folder / WEIGHTS).unlink()
    message = refusal(folder)
    assert message.startswith(f"{folder} has no weights file (model.safetensors, ")
    assert "model.safetensors.index.json" in message


def test_a_pickle_only_folder_is_still_refused_as_pickle(folder):
    (folder / WEIGHTS).unlink()
    (folder / "pytorch_model-00001-of-00002.bin").write_bytes(b"never unpickled")
    message = refusal(folder)
    assert "holds only a pickle checkpoint" in message and "no weights file" not in message


def test_a_missing_shard_is_named_without_blaming_the_hub(base_folder, tmp_path):
    folder = tmp_path / "sharded"
    model = load_model(base_folder)[0]
    model.save_pretrained(folder, max_shard_size="20KB")
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) > 1 and (folder / "model.safetensors.index.json").exists()
    shards[1].unlink()
    message = refusal(folder)
    assert message.startswith(f"could not load the model folder {folder}: ")
    assert shards[1].name in message


# ---------------------------------------------------------------- tensors


def test_extra_tensors_get_their_own_reason(folder, capfd):
    extra = [f"model.layers.0.mlp.extra_{i}" for i in range(4)]

    def add(state):
        for name in extra:
            state[name] = torch.zeros(3)

    edit_weights(folder, add)
    message = refusal(folder)
    assert message.startswith(f"{folder}: the checkpoint holds 4 tensors that the model has ")
    assert ", ".join(extra[:3]) in message and extra[3] not in message
    assert "config.json does not describe these weights" in message
    assert "random values" not in message and "missing" not in message
    assert_no_report(capfd)


def test_transformers_prints_its_report_unless_silenced(folder, capfd):
    """The control of the capfd checks: transformers' report does reach capfd here."""
    from transformers import AutoModelForCausalLM

    edit_weights(folder, lambda state: state.update({"model.extra": torch.zeros(3)}))
    AutoModelForCausalLM.from_pretrained(folder)
    out, err = capfd.readouterr()
    assert "LOAD REPORT" in out + err and "UNEXPECTED" in out + err
    with quiet_load_report():
        AutoModelForCausalLM.from_pretrained(folder)
    assert_no_report(capfd)


def test_quiet_load_report_shows_the_report_an_error_refers_to(capfd):
    import transformers.utils.logging as hf_logging

    logger = hf_logging.get_logger("transformers.modeling_utils")
    with pytest.raises(RuntimeError), quiet_load_report():
        logger.warning("LlamaForCausalLM LOAD REPORT from: x\nkey | CONVERSION")
        raise RuntimeError("For details look at the `CONVERSION` entries of the above report!")
    _, err = capfd.readouterr()
    assert "LOAD REPORT" in err and "CONVERSION" in err
    with pytest.raises(KeyError), quiet_load_report():
        logger.warning("LlamaForCausalLM LOAD REPORT from: x")
        raise KeyError("unrelated")
    assert_no_report(capfd)


def test_a_missing_tensor_would_fill_random_values(folder, capfd):
    name = "model.layers.1.mlp.down_proj.weight"
    edit_weights(folder, lambda state: state.pop(name))
    message = refusal(folder)
    assert message.startswith(f"{folder}: the checkpoint's tensors do not match the model ")
    assert f"missing 1 (e.g. {name})" in message and "random values" in message
    assert "unexpected" not in message and "no place for" not in message
    assert_no_report(capfd)


def test_a_misshapen_tensor_would_fill_random_values(folder, capfd):
    def shrink(state):
        state["model.norm.weight"] = state["model.norm.weight"][:10].clone()

    edit_weights(folder, shrink)
    message = refusal(folder)
    assert "mismatched 1 (e.g. model.norm.weight (checkpoint [10], model [64]))" in message
    assert "random values" in message and "ignore_mismatched_sizes" not in message
    assert_no_report(capfd)


@needs_austen
def test_the_cli_prints_only_our_line(folder):
    """In a fresh process, as a user runs it: one error line, no report of transformers."""
    edit_weights(folder, lambda state: state.update({"model.extra": torch.zeros(3)}))
    args = ["eval", str(folder), "--eval-seqlen", "32", "--eval-windows", "2", "--quiet"]
    done = subprocess.run(
        [sys.executable, "-m", "omniquant", *args], capture_output=True, text=True, timeout=300
    )
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert done.returncode == 2 and len(errors) == 1, done.stderr
    assert "holds 1 tensor that the model has no place for (e.g. model.extra)" in errors[0]
    assert "Traceback" not in done.stderr
    for mark in REPORT_MARKS:
        assert mark not in done.stdout + done.stderr, done.stdout + done.stderr
