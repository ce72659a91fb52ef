"""Checks on the folders a command will write, made before any work starts."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from omniquant.errors import OutputError


def existing_ancestor(path: Path) -> Path:
    """The nearest ancestor of `path` (itself excluded) that exists on disk."""
    for parent in Path(os.path.abspath(path)).parents:
        if parent.exists():
            return parent
    return Path("/")


def check_new_output(path: Path, what: str = "output folder") -> None:
    """Refuse an output that exists already or cannot be created (under a file, or in a folder
    that is not writable), before anything is computed or written."""
    if path.exists() or path.is_symlink():
        raise OutputError(f"{what} {path} exists already; choose another")
    parent = existing_ancestor(path)
    if not parent.is_dir():
        raise OutputError(f"cannot create {what} {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot create {what} {path}: {parent} is not writable")
    try:  # permissions are not the whole story (root on a read-only mount, /proc, a full quota)
        os.rmdir(tempfile.mkdtemp(prefix=".omniquant-probe-", dir=parent))
    except OSError as e:
        raise OutputError(
            f"cannot create {what} {path}: {parent} takes no new folders ({e.strerror})"
        ) from e
