"""What a user meets on bad input, interruptions and resumes: one clear line (exit 2) before
anything is loaded or written, and no work lost (issue 11)."""

import json
import shutil

import pytest
import torch

import omniquant
from omniquant import block_loop, cli
from omniquant.config import CalibConfig, OmniQuantConfig, WeightQuant
from omniquant.errors import ModelError
from omniquant.model_io import load_model
from omniquant.pipeline import export as export_step
from omniquant.pipeline import output, source
from omniquant.pipeline import quantize as quantize_step
from tests.conftest import interrupt_after_block, needs_austen

pytestmark = needs_austen
FAST = ["--epochs", "1", "--nsamples", "2", "--seqlen", "32", "--quiet"]
EVAL_FAST = ["--eval-seqlen", "32", "--eval-windows", "2", "--quiet"]


def run(capsys, *args):
    """`omniquant ARGS` in-process: (exit code, stdout, stderr)."""
    rc = cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def one_error_line(err: str) -> str:
    """The error line of a refused command (no traceback)."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def runs(tiny_llama_folder, tmp_path_factory):
    """A fake-quantized W4g32 run folder and its omniquant-packed and compressed-tensors exports."""
    root = tmp_path_factory.mktemp("runs")
    config = OmniQuantConfig(WeightQuant(4, 32), calib=CalibConfig(epochs=1, nsamples=2, seqlen=32))
    omniquant.quantize(tiny_llama_folder, config, output=root / "fake", progress=False)
    omniquant.export(root / "fake", root / "packed", "omniquant-packed")
    omniquant.export(root / "fake", root / "ct", "compressed-tensors")
    return root


def no_model_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr(source, "load_model", refuse)


# ---------------------------------------------------------------- 1. packed folders


@pytest.mark.parametrize("name", ["packed", "fake", "ct"])
def test_quantizing_an_already_quantized_folder_is_refused_before_loading(
    runs, tmp_path, capsys, monkeypatch, name
):
    no_model_loading(monkeypatch)
    rc, _, err = run(capsys, "quantize", "--model", runs / name, "--output", tmp_path / "q", *FAST)
    assert rc == 2 and "is already quantized" in one_error_line(err)
    assert list(tmp_path.iterdir()) == []


def test_plain_loading_of_a_packed_folder_is_refused_and_says_how_to_open_it(runs):
    with pytest.raises(ModelError, match=r"omniquant-packed export.*omniquant.load.*--kernels"):
        load_model(runs / "packed")


def test_a_folder_whose_weights_do_not_match_its_model_is_refused(
    tiny_llama_folder, tmp_path, capsys
):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "broken"
    shutil.copytree(tiny_llama_folder, folder)
    state = load_file(folder / "model.safetensors")
    state["model.layers.0.mlp.up_proj.qweight"] = state.pop("model.layers.0.mlp.up_proj.weight")
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    rc, _, err = run(capsys, "eval", folder, *EVAL_FAST)
    line = one_error_line(err)
    assert rc == 2 and "do not match" in line and "random values" in line
    assert "up_proj.weight" in line and "up_proj.qweight" in line


# ---------------------------------------------------------------- 2. format constraints


@pytest.mark.parametrize(
    "flags,match",
    [
        (["--group-size", "48"], "does not divide its width 64"),
        (["--wbits", "3", "--group-size", "32"], "not 3"),
        (["--abits", "4"], "only as W8A8"),
    ],
)
def test_what_compressed_tensors_cannot_hold_is_refused_before_loading(
    tiny_llama_folder, tmp_path, capsys, monkeypatch, flags, match
):
    no_model_loading(monkeypatch)
    out = tmp_path / "q"
    rc, _, err = run(
        capsys,
        "quantize",
        "--model",
        tiny_llama_folder,
        *flags,
        "--format",
        "compressed-tensors",
        "--output",
        out,
        *FAST,
    )
    assert rc == 2 and match in one_error_line(err)
    assert list(tmp_path.iterdir()) == []  # no <output>.partial either


# ---------------------------------------------------------------- 3. kill while writing


def test_a_kill_while_writing_keeps_the_blocks_and_resume_only_writes(
    tiny_llama_folder, tmp_path, capsys, monkeypatch, caplog
):
    out = tmp_path / "q"
    args = ["quantize", "--model", tiny_llama_folder, "--group-size", "32", "--output", out, *FAST]

    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(
        quantize_step, "write_run_report", killed
    )  # the last step before the rename
    rc, _, err = run(capsys, *args)
    assert rc == 130 and "Traceback" not in err and "rerun with --resume" in err
    partial = tmp_path / "q.partial"
    assert not out.exists()
    assert sorted(p.name for p in (partial / "state").iterdir()) == [
        "block_0000.pt",
        "block_0001.pt",
    ]
    monkeypatch.undo()

    def no_training(*a, **k):
        raise AssertionError("a finished block was trained again")

    monkeypatch.setattr(block_loop, "train_block", no_training)
    with caplog.at_level("INFO", logger="omniquant"):
        rc, out_text, _ = run(capsys, *args, "--resume")
    assert rc == 0 and "2 blocks" in out_text
    assert "all 2 blocks are done" in caplog.text
    assert (out / "model.safetensors").exists() and not partial.exists()
    assert json.loads((out / "omniquant.json").read_text())["setting"] == "W4A16g32"


# ---------------------------------------------------------------- 4. one line, not a traceback


def test_truncated_safetensors_is_one_line_in_quantize_and_eval(
    tiny_llama_folder, tmp_path, capsys
):
    folder = tmp_path / "truncated"
    shutil.copytree(tiny_llama_folder, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    rc, _, err = run(capsys, "eval", folder, *EVAL_FAST)
    assert rc == 2 and "could not read the weights" in one_error_line(err)
    rc, _, err = run(capsys, "quantize", "--model", folder, "--output", tmp_path / "q", *FAST)
    assert rc == 2 and "could not read the weights" in one_error_line(err)
    assert not (tmp_path / "q").exists() and not (tmp_path / "q.partial").exists()


@pytest.mark.parametrize("content", [b"GGUF\x03\x00\x00\x00trunc", b"not a gguf file at all"])
def test_truncated_or_fake_gguf_is_one_line(tmp_path, capsys, monkeypatch, content):
    monkeypatch.setenv("OMNIQUANT_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(content)
    rc, _, err = run(capsys, "eval", gguf, *EVAL_FAST)
    assert rc == 2 and "could not read GGUF file" in one_error_line(err)
    assert not list((tmp_path / "cache").glob("*")) if (tmp_path / "cache").exists() else True


@pytest.mark.parametrize("device,match", [("tpu", "unknown device"), ("mps", "not supported")])
def test_unsupported_devices_are_one_line(tiny_llama_folder, tmp_path, capsys, device, match):
    rc, _, err = run(
        capsys, "quantize", "--model", tiny_llama_folder, "--device", device, "--output", tmp_path
    )
    assert rc == 2 and match in one_error_line(err)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", [["eval"], ["generate", "--prompt", "Hi"]])
def test_cuda_without_cuda_is_one_line_before_loading(
    tiny_llama_folder, capsys, monkeypatch, command
):
    monkeypatch.setattr(source, "load_model", None)  # any loading would raise a TypeError
    rc, _, err = run(capsys, command[0], tiny_llama_folder, *command[1:], "--device", "cuda")
    assert rc == 2 and "no CUDA device" in one_error_line(err)


def test_an_output_that_cannot_be_created_is_refused_before_loading(
    tiny_llama_folder, tmp_path, capsys, monkeypatch
):
    no_model_loading(monkeypatch)
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    rc, _, err = run(
        capsys, "quantize", "--model", tiny_llama_folder, "--output", a_file / "out", *FAST
    )
    assert rc == 2 and "is a file, not a folder" in one_error_line(err)
    monkeypatch.setattr("omniquant.paths.os.access", lambda *a: False)
    rc, _, err = run(
        capsys, "quantize", "--model", tiny_llama_folder, "--output", tmp_path / "o", *FAST
    )
    assert rc == 2 and "is not writable" in one_error_line(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]


def test_a_calibration_file_that_is_not_utf8_is_one_line_before_loading(
    tiny_llama_folder, tmp_path, capsys, monkeypatch
):
    no_model_loading(monkeypatch)
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "a.txt").write_text("Plain text. " * 50)
    (texts / "b.txt").write_bytes(b"caf\xe9 latin-1 text")
    rc, _, err = run(
        capsys,
        "quantize",
        "--model",
        tiny_llama_folder,
        "--calib-dataset",
        texts,
        "--output",
        tmp_path / "q",
        *FAST,
    )
    line = one_error_line(err)
    assert rc == 2 and "b.txt is not UTF-8" in line
    assert not (tmp_path / "q.partial").exists()


def test_an_empty_prompt_is_refused_before_loading(tiny_llama_folder, capsys, monkeypatch):
    monkeypatch.setattr(source, "load_model", None)
    rc, _, err = run(capsys, "generate", tiny_llama_folder, "--prompt", "  ")
    assert rc == 2 and "the prompt is empty" in one_error_line(err)


@pytest.mark.parametrize(
    "damage", ['{"setting": "W4A16g32"}', "{not json", '{"setting": "x", "config": {"weight": 3}}']
)
def test_a_malformed_omniquant_json_is_one_line_in_export_eval_and_report(
    runs, tmp_path, capsys, damage
):
    folder = tmp_path / "damaged"
    shutil.copytree(runs / "fake", folder)
    (folder / "omniquant.json").write_text(damage)
    for args in (
        ["export", folder, tmp_path / "x"],
        ["eval", folder, *EVAL_FAST],
        ["report", folder, "--output", tmp_path / "r"],
    ):
        rc, _, err = run(capsys, *args)
        line = one_error_line(err)
        assert rc == 2 and "omniquant.json" in line, args
        assert "not readable JSON" in line or "malformed" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["damaged"]


def test_zero_shot_tasks_offline_are_one_line(tiny_llama_folder, capsys, monkeypatch):
    pytest.importorskip("lm_eval")
    import lm_eval

    from omniquant.eval import zeroshot

    def offline(**kwargs):
        raise ConnectionError("Couldn't reach 'baber/piqa' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(zeroshot, "task_manager", lambda tasks, include: None)
    monkeypatch.setattr(lm_eval, "simple_evaluate", offline)
    rc, _, err = run(capsys, "eval", tiny_llama_folder, "--tasks", "piqa", "--quiet")
    line = one_error_line(err)
    assert rc == 2 and "piqa" in line and "--tasks-include" in line


def test_resume_with_a_truncated_block_state_trains_that_block_again(
    tiny_llama_folder, tmp_path, capsys, monkeypatch, caplog
):
    out = tmp_path / "q"
    args = ["quantize", "--model", tiny_llama_folder, "--group-size", "32", "--output", out, *FAST]
    interrupt_after_block(monkeypatch, index=1)
    assert run(capsys, *args)[0] == 130
    monkeypatch.undo()
    state = tmp_path / "q.partial" / "state" / "block_0001.pt"
    state.write_bytes(state.read_bytes()[:100])
    with caplog.at_level("INFO", logger="omniquant"):
        rc, _, err = run(capsys, *args, "--resume")
    assert rc == 0 and "Traceback" not in err
    assert (
        "block_0001.pt is damaged" in caplog.text and "block 1 will be trained again" in caplog.text
    )
    assert "from block 1 of 2" in caplog.text
    assert out.exists()


def test_a_pickle_checkpoint_is_refused_without_unpickling_advice(
    tiny_llama_folder, tmp_path, capsys
):
    from safetensors.torch import load_file

    folder = tmp_path / "bin"
    shutil.copytree(tiny_llama_folder, folder)
    weights = folder / "model.safetensors"
    torch.save(load_file(weights), folder / "pytorch_model.bin")  # as older transformers wrote
    weights.unlink()
    rc, _, err = run(capsys, "eval", folder, *EVAL_FAST)
    line = one_error_line(err)
    assert rc == 2 and "pickle checkpoint" in line and "weights_only" not in err


# ---------------------------------------------------------------- 5. report output


def test_report_refuses_an_existing_output_even_its_own_run(runs, capsys):
    before = (runs / "fake" / "report.md").read_text()
    rc, _, err = run(capsys, "report", runs / "fake", "--output", runs / "fake")
    assert rc == 2 and "exists already" in one_error_line(err)
    assert (runs / "fake" / "report.md").read_text() == before


# ---------------------------------------------------------------- 6. perplexity with its windows


def test_saved_perplexity_records_its_windows_and_reports_show_them(runs, tmp_path, capsys):
    folder = tmp_path / "run"
    shutil.copytree(runs / "fake", folder)
    rc, out, _ = run(capsys, "eval", folder, "--save", *EVAL_FAST)
    assert rc == 0
    saved = json.loads((folder / "eval.json").read_text())
    assert (saved["dataset"], saved["seqlen"], saved["windows"]) == ("austen:emma", 32, 2)
    assert json.loads(out.splitlines()[0])["windows"] == 2
    rc, _, _ = run(capsys, "report", folder, "--output", tmp_path / "r", "--quiet")
    assert rc == 0 and "austen:emma, 2 × 32" in (tmp_path / "r" / "report.md").read_text()


# ---------------------------------------------------------------- 7. flags that would be ignored


@pytest.mark.parametrize(
    "args,match",
    [
        (["quantize", "--let-lr", "0.1"], "--let-lr only applies with --let"),
        (["quantize", "--let-alpha", "0.6"], "--let-alpha only applies with --let"),
        (["quantize", "--e2e-lr", "0.01"], "--e2e-lr only applies with --e2e-epochs"),
        (["quantize", "--e2e-epochs", "1", "--abits", "8"], "trains weight-only models"),
        (["quantize", "--eval-windows", "3"], "--eval-windows only applies with --eval"),
        (["quantize", "--eval-dataset", "austen:emma", "--eval-seqlen", "64"], "--eval-seqlen"),
        (["eval", "--limit", "5"], "--limit only applies with --tasks"),
        (["eval", "--tasks-include", "x"], "--tasks-include only applies with --tasks"),
        (["eval", "--tasks", "piqa", "--eval-seqlen", "64"], "to perplexity, not to --tasks"),
        (["quantize", "--epochs", "0"], "--method rtn"),
    ],
)
def test_flags_that_would_be_ignored_are_refused(
    tiny_llama_folder, tmp_path, capsys, monkeypatch, args, match
):
    no_model_loading(monkeypatch)
    monkeypatch.setattr(export_step, "load", None)
    model = ["--model", tiny_llama_folder, "--output", tmp_path / "q"]
    full = [*args, *model] if args[0] == "quantize" else [args[0], tiny_llama_folder, *args[1:]]
    rc, _, err = run(capsys, *full)
    assert rc == 2 and match in one_error_line(err)
    assert list(tmp_path.iterdir()) == []


def test_demo_has_no_method_flag(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["demo", "--method", "rtn"])
    assert e.value.code == 2 and "unrecognized arguments: --method rtn" in capsys.readouterr().err


# ---------------------------------------------------------------- 8. resume messages


def test_resume_without_a_partial_run_says_it_starts_afresh(
    tiny_llama_folder, tmp_path, capsys, caplog
):
    args = ["quantize", "--model", tiny_llama_folder, "--group-size", "32"]
    with caplog.at_level("WARNING", logger="omniquant"):
        rc, _, _ = run(capsys, *args, "--output", tmp_path / "q", "--resume", *FAST)
    assert rc == 0 and "no interrupted run" in caplog.text and "starting afresh" in caplog.text


def test_resume_with_other_settings_names_the_difference(tmp_path):
    partial = tmp_path / "q.partial"
    partial.mkdir()
    run_id = {"model": "m", "config": OmniQuantConfig(WeightQuant(4, 32)).to_dict()}
    (partial / "run.json").write_text(json.dumps(run_id))
    other = {"model": "m", "config": OmniQuantConfig(WeightQuant(3, 32)).to_dict()}
    with pytest.raises(Exception, match=r"\(config\.weight\.bits: 4 -> 3; started -> now\)"):
        output.check_resume(partial, other)


def test_settings_diff_names_each_changed_leaf():
    saved = {"a": 1, "b": {"c": 2, "d": 3}}
    now = {"a": 1, "b": {"c": 5}, "e": 0}
    assert output.settings_diff(saved, now) == [
        "b.c: 2 -> 5",
        "b.d: 3 -> '(absent)'",
        "e: '(absent)' -> 0",
    ]


# ------------------------------------------------ 9. messages that say the right thing


def test_messages_name_the_right_flag_and_cause(runs, tiny_llama_folder, tmp_path, capsys):
    rc, _, err = run(capsys, "eval", tiny_llama_folder, "--eval-seqlen", "10000000", "--quiet")
    assert rc == 2 and "--eval-seqlen" in one_error_line(err)
    rc, _, err = run(capsys, "eval", tiny_llama_folder, "--eval-windows", "-1", "--quiet")
    assert rc == 2 and "--eval-windows must be 0 (all) or positive" in one_error_line(err)
    rc, _, err = run(capsys, "export", tmp_path / "nonexistent", tmp_path / "out")
    assert rc == 2 and "does not exist" in one_error_line(err)
    rc, _, err = run(capsys, "eval", runs / "ct", "--kernels", "--quiet")
    assert rc == 2 and "is a compressed-tensors export" in one_error_line(err)


# ---------------------------------------------------------------- 10. help


def test_help_describes_what_each_command_takes(capsys):
    with pytest.raises(SystemExit):
        cli.main(["export", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default auto)" in text and "fake =" not in text and "--threads" in text
    with pytest.raises(SystemExit):
        cli.main(["quantize", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "activation bits: 4..8" in text and "--method rtn" in text


# ---------------------------------------------------------------- 11. fail fast, stay quiet


def test_a_name_that_is_neither_local_nor_reachable_fails_fast(capsys, monkeypatch):
    import time

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    rc, _, err = run(capsys, "eval", "typo", "--quiet")
    assert rc == 2 and "Hub is unreachable" in one_error_line(err)
    assert time.perf_counter() - t0 < 10
    rc, _, err = run(capsys, "eval", "a/b/c", "--quiet")
    assert rc == 2 and "does not exist" in one_error_line(err)


def test_quiet_silences_the_bars_of_compressed_tensors(runs, capsys):
    rc, _, err = run(capsys, "eval", runs / "ct", *EVAL_FAST)
    assert rc == 0 and "Decompressing" not in err and "it/s" not in err


# ---------------------------------------------------------------- 12. export and report


def test_export_takes_threads_and_shows_its_progress(runs, tmp_path, capsys):
    rc, out, err = run(
        capsys,
        "export",
        runs / "fake",
        tmp_path / "p",
        "--format",
        "omniquant-packed",
        "--threads",
        "1",
    )
    assert rc == 0 and "omniquant-packed model written" in out
    assert "packing layers" in err
    rc, _, _ = run(capsys, "report", runs / "fake", "--output", tmp_path / "r", "--threads", "1")
    assert rc == 0


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_rows_of_uint8_codes_matches_a_bit_by_bit_reference(bits):
    from omniquant.quant.packing import pack_rows, unpack_rows

    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (3, 77), generator=g, dtype=torch.int64)
    codes[0] = 2**bits - 1  # the top code, which uint8 comparisons once got wrong
    stream = [(int(c) >> i) & 1 for c in codes[1] for i in range(bits)]
    stream += [0] * (-len(stream) % 32)
    words = [
        sum(b << i for i, b in enumerate(stream[j : j + 32])) for j in range(0, len(stream), 32)
    ]
    packed = pack_rows(codes.to(torch.uint8), bits)
    assert [w & 0xFFFFFFFF for w in packed[1].tolist()] == words
    assert torch.equal(unpack_rows(packed, bits, 77), codes.to(torch.uint8))


def test_gguf_cache_folder_follows_the_content_not_the_place(tmp_path, monkeypatch):
    """A copy of the same file elsewhere (a reinstall, a fresh venv) maps to the same cache
    folder; a file whose bytes changed maps to another."""
    from omniquant.model_io import gguf_cache_folder

    monkeypatch.setenv("OMNIQUANT_CACHE", str(tmp_path / "cache"))
    a = tmp_path / "one" / "m.gguf"
    b = tmp_path / "two" / "m.gguf"
    for f in (a, b):
        f.parent.mkdir()
        f.write_bytes(b"GGUF" + bytes(range(256)) * 64)
    assert gguf_cache_folder(a) == gguf_cache_folder(b)
    assert gguf_cache_folder(a).parent == tmp_path / "cache"
    b.write_bytes(b"GGUF" + bytes(range(256)) * 63)
    assert gguf_cache_folder(a) != gguf_cache_folder(b)


@pytest.mark.parametrize("command", [["eval"], ["generate", "--prompt", "Emma"]])
def test_a_float16_head_without_the_kernels_is_refused_before_loading(capsys, tmp_path, command):
    missing = tmp_path / "not-there"  # refused before anything is read
    rc, _, err = run(capsys, command[0], missing, *command[1:], "--head", "float16")
    assert rc == 2
    assert "--head float16" in err and "add --kernels" in err
