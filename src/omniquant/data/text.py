"""Calibration and evaluation text: where it comes from.

Text sources (`load_text`):

* ``austen:<novel>`` — a Jane Austen novel read, without R, from the lazy-load database that
  Debian's ``r-cran-janeaustenr`` package installs (`read_austen`); works offline.
* ``debian:policy`` — the Debian Policy Manual, technical documentation that Debian's
  ``debian-policy`` package installs (`read_debian_doc`): the out-of-domain evaluation text.
* a path to a ``.txt`` file, or to a folder whose ``*.txt`` files are joined in name order.
* ``wikitext2``, ``ptb``, ``c4`` — the usual benchmark corpora via the ``datasets`` package
  (imported lazily; needs the network or a warm Hugging Face cache).
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

from omniquant.data.austen import AUSTEN_NOVELS, read_austen
from omniquant.data.debian import DEBIAN_DOCS, read_debian_doc
from omniquant.errors import DataError

logger = logging.getLogger(__name__)


_HF_SOURCES = ("wikitext2", "ptb", "c4")
_HF_SPLITS = ("train", "validation", "test")
_C4_TRAIN_FILE = "en/c4-train.00000-of-01024.json.gz"
_C4_VALIDATION_FILE = "en/c4-validation.00000-of-00008.json.gz"
_C4_MAX_DOCS = 20000


def _offline_hint() -> str:
    return (
        "use an offline source instead: 'austen:prideprejudice' "
        "(needs `apt-get install r-cran-janeaustenr`), 'debian:policy' (needs `apt-get install "
        "debian-policy`) or a path to a local .txt file or folder"
    )


def _load_hf(name: str, split: str) -> str:
    """Loads a benchmark corpus through the ``datasets`` package."""
    if split not in _HF_SPLITS:
        raise DataError(
            f"unknown split {split!r} for {name}; choose one of: {', '.join(_HF_SPLITS)}"
        )
    try:
        datasets = importlib.import_module("datasets")  # optional and heavy: imported lazily
    except ImportError as exc:
        raise DataError(
            f"source {name!r} needs the `datasets` package, which is not installed; "
            + _offline_hint()
        ) from exc
    try:
        if name == "wikitext2":
            ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
            return "\n\n".join(ds["text"])
        if name == "ptb":
            ds = datasets.load_dataset("ptb_text_only", "penn_treebank", split=split)
            return "\n\n".join(ds["sentence"])
        # c4: one shard of the English training (or validation) set.
        if split == "train":
            ds = datasets.load_dataset(
                "allenai/c4", data_files={"train": _C4_TRAIN_FILE}, split="train"
            )
        else:
            ds = datasets.load_dataset(
                "allenai/c4", data_files={"validation": _C4_VALIDATION_FILE}, split="validation"
            )
        n = min(_C4_MAX_DOCS, len(ds))
        return "\n\n".join(ds.select(range(n))["text"])
    except DataError:
        raise
    except Exception as exc:  # network, cache and hub errors all end here
        raise DataError(f"could not load {name!r} ({split}): {exc}; " + _offline_hint()) from exc


def _read_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"text file {path} is not UTF-8 ({exc.reason} at byte {exc.start}); "
            f"convert it to UTF-8 or move it out of the way"
        ) from exc
    except OSError as exc:
        raise DataError(f"cannot read text file {path}: {exc}") from exc


def _read_local(path: Path) -> str:
    if path.is_dir():
        files = sorted(p for p in path.glob("*.txt") if p.is_file())
        if not files:
            raise DataError(f"folder {path} has no .txt files; put the text in *.txt files")
        return "\n\n".join(_read_file(p) for p in files)
    return _read_file(path)


def load_text(source: str, split: str = "train") -> str:
    """Returns the text of a calibration or evaluation source.

    Args:
        source: ``austen:<novel>``, ``debian:policy``, a path to a text file or to a folder of
            ``*.txt`` files, or one of ``wikitext2``, ``ptb``, ``c4`` (through ``datasets``).
        split: ``train``, ``validation`` or ``test``; used by the ``datasets`` sources only.

    Raises:
        DataError: the source is unknown, missing, empty or cannot be loaded.
    """
    if source.startswith("austen:"):
        return read_austen(source.split(":", 1)[1])
    if source.startswith("debian:"):
        return read_debian_doc(source.split(":", 1)[1])
    if source in _HF_SOURCES:
        return _load_hf(source, split)
    path = Path(source).expanduser()
    if path.exists():
        return _read_local(path)
    raise DataError(
        f"unknown calibration source {source!r}: expected 'austen:<novel>' (novels: "
        f"{', '.join(AUSTEN_NOVELS)}), 'debian:<document>' (documents: "
        f"{', '.join(DEBIAN_DOCS)}), an existing .txt file or folder of .txt files, "
        f"or one of {', '.join(_HF_SOURCES)}"
    )
