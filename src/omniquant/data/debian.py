"""Evaluation text of another domain than Austen's novels: technical documentation from Debian.

`read_debian_doc("policy")` (source ``debian:policy``) returns the Debian Policy Manual, the
plain-text edition that Debian's ``debian-policy`` package installs (gzip-compressed) as
``/usr/share/doc/debian-policy/policy.txt.gz``: a technical reference of modern English prose
(about packaging, file systems, maintainer scripts), with lists, field names, shell commands and
version numbers, as far from 19th-century fiction as an offline text gets. Read in pure Python;
the decompressed file's SHA-256 is pinned (debian-policy 4.6.2.0, Debian 12). The text starts at
its first chapter: the table of contents before it is skipped. SmolLM2's tokenizer turns it into
115,206 tokens, 225 windows of 512, so the 80 windows of the austen-v1 protocol fit.
"""

from __future__ import annotations

import gzip
import hashlib
import zlib
from dataclasses import dataclass
from pathlib import Path

from omniquant.errors import DataError


@dataclass(frozen=True)
class DebianDoc:
    """A plain-text document that a Debian package installs."""

    title: str
    package: str  # the Debian package that installs it
    path: Path  # gzip-compressed plain text
    sha256: str  # of the decompressed file
    start: str  # the text starts where this first appears (what comes before is skipped)


DEBIAN_DOCS: dict[str, DebianDoc] = {
    "policy": DebianDoc(
        title="Debian Policy Manual",
        package="debian-policy",
        path=Path("/usr/share/doc/debian-policy/policy.txt.gz"),
        sha256="89dba06600463ed858b4ccd3bdf4e72452c512589f1029548346e5284eb71374",
        start="1. About this manual\n*****",
    ),
}
"""The documents accepted by `read_debian_doc` (source ``debian:<name>``)."""


def install_hint(doc: DebianDoc) -> str:
    return f"install it with `apt-get install {doc.package}` (or `make deps`)"


def body(text: str, start: str) -> str:
    """The text from the first occurrence of `start` on."""
    at = text.find(start)
    if at < 0:
        raise DataError(f"the text has no {start.splitlines()[0]!r} to start from")
    return text[at:]


def read_debian_doc(name: str, path: Path | None = None, verify: bool = True) -> str:
    """Returns a document of `DEBIAN_DOCS` as text, from its first chapter on.

    Args:
        name: a key of `DEBIAN_DOCS` (``policy``).
        path: the gzip file; defaults to where the Debian package installs it.
        verify: check the decompressed file's SHA-256 against the pinned one.

    Raises:
        DataError: unknown name, file missing (the message names the package to install),
            unreadable, or checksum mismatch.
    """
    if name not in DEBIAN_DOCS:
        raise DataError(
            f"unknown Debian document {name!r}; choose one of: {', '.join(sorted(DEBIAN_DOCS))}"
        )
    doc = DEBIAN_DOCS[name]
    file = Path(path) if path is not None else doc.path
    if not file.is_file():
        raise DataError(f"the {doc.title} is not found at {file}; {install_hint(doc)}")
    try:
        raw = gzip.decompress(file.read_bytes())
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"cannot read the {doc.title} at {file}: {exc}") from exc
    if verify and hashlib.sha256(raw).hexdigest() != doc.sha256:
        raise DataError(
            f"the {doc.title} at {file} has SHA-256 {hashlib.sha256(raw).hexdigest()}, expected "
            f"{doc.sha256}; the {doc.package} package differs from the reference version "
            "(pass verify=False to use it anyway)"
        )
    return body(raw.decode("utf-8"), doc.start)
