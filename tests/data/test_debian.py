"""The out-of-domain evaluation text: the Debian Policy Manual from Debian's debian-policy."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import pytest

from omniquant.data import DEBIAN_DOCS, eval_windows, load_text, read_debian_doc, tokenize_text
from omniquant.errors import DataError
from tests.conftest import needs_policy, needs_smollm2

POLICY = DEBIAN_DOCS["policy"]


@needs_policy
def test_the_policy_manual_matches_its_pinned_sha256_and_starts_at_chapter_one():
    raw = gzip.decompress(POLICY.path.read_bytes())
    assert hashlib.sha256(raw).hexdigest() == POLICY.sha256
    text = load_text("debian:policy")
    assert text == read_debian_doc("policy")
    assert text.startswith("1. About this manual\n****")
    assert "This manual describes the policy requirements for the Debian" in text[:400]
    assert "* 1.1. Scope" not in text  # the table of contents is skipped
    assert text.rstrip().endswith("https://www.gnu.org/licenses/.")


@needs_policy
@needs_smollm2
def test_the_policy_manual_holds_the_80_evaluation_windows(tokenizer):
    tokens = tokenize_text(tokenizer, read_debian_doc("policy"))
    assert tokens.numel() == 115_206
    windows = eval_windows(tokens, 512, tokenizer.bos_token_id, max_windows=None)
    assert windows.shape == (225, 512)
    assert eval_windows(tokens, 512, tokenizer.bos_token_id).shape == (80, 512)


def test_a_missing_manual_names_the_package_to_install(tmp_path: Path):
    with pytest.raises(DataError, match=r"apt-get install debian-policy"):
        read_debian_doc("policy", path=tmp_path / "policy.txt.gz")


def test_an_unknown_document_lists_the_known_ones():
    with pytest.raises(DataError, match="choose one of: policy"):
        load_text("debian:faq")


def test_a_changed_manual_fails_its_checksum_unless_verify_is_off(tmp_path: Path):
    path = tmp_path / "policy.txt.gz"
    path.write_bytes(gzip.compress(b"contents\n1. About this manual\n*****\nchanged text\n"))
    with pytest.raises(DataError, match="SHA-256"):
        read_debian_doc("policy", path=path)
    assert read_debian_doc("policy", path=path, verify=False) == (
        "1. About this manual\n*****\nchanged text\n"
    )


def test_a_corrupt_file_is_a_clear_error(tmp_path: Path):
    path = tmp_path / "policy.txt.gz"
    path.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="cannot read the Debian Policy Manual"):
        read_debian_doc("policy", path=path)


def test_a_text_without_its_first_chapter_is_a_clear_error(tmp_path: Path):
    path = tmp_path / "policy.txt.gz"
    path.write_bytes(gzip.compress(b"something else"))
    with pytest.raises(DataError, match=r"no '1\. About this manual' to start from"):
        read_debian_doc("policy", path=path, verify=False)
