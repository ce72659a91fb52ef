"""The run record `omniquant.json` that `quantize` and `export` write, read back with checks.

Every reader of a model folder goes through `read_run_record`, so a damaged or hand-edited file
is one clear error instead of a KeyError deep inside loading or reporting.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omniquant.config import OmniQuantConfig
from omniquant.errors import ConfigError, ModelError

RUN_FILE = "omniquant.json"


def record_problem(record: Any) -> str | None:
    """What is wrong with a parsed omniquant.json, or None when it is as omniquant writes it."""
    if not isinstance(record, dict):
        return "it is not a JSON object"
    if not isinstance(record.get("config"), dict):
        return "its 'config' is missing"
    from omniquant.formats import FORMATS  # the registry's names (formats import this module)

    fmt = record.get("format", {"name": "fake"})
    if not isinstance(fmt, dict) or fmt.get("name") not in FORMATS:
        return f"its 'format' is not one of {', '.join(FORMATS)}"
    try:
        OmniQuantConfig.from_dict(record["config"])
    except (ConfigError, TypeError) as e:
        return f"its 'config' is invalid ({e})"
    return None


def read_run_record(folder: Path) -> dict[str, Any] | None:
    """The folder's omniquant.json, checked; None when the folder has none."""
    path = Path(folder) / RUN_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{path} is not readable JSON ({e}); restore it or quantize again") from e
    problem = record_problem(record)
    if problem is not None:
        raise ModelError(
            f"{path} is malformed: {problem}; it is not as omniquant writes it "
            f"(restore it or quantize again)"
        )
    return record


def record_config(record: dict[str, Any]) -> OmniQuantConfig:
    """The run's config from a checked record."""
    return OmniQuantConfig.from_dict(record["config"])


def record_setting(record: dict[str, Any]) -> str:
    """The run's setting name ('W4A16g128'), from the record or else from its config."""
    setting = record.get("setting")
    return setting if isinstance(setting, str) else record_config(record).label


def record_format(record: dict[str, Any]) -> str:
    """The folder's format: fake, compressed-tensors, omniquant-packed or gguf."""
    return str(record.get("format", {}).get("name", "fake"))


def write_run_record(
    folder: Path, record: dict[str, Any], fmt: dict[str, Any] | None = None
) -> None:
    """Write the folder's omniquant.json: the run's record, with `fmt` as its "format" entry
    when given (the one writer of the file; `read_run_record` is its one reader)."""
    if fmt is not None:
        record = {**record, "format": fmt}
    (Path(folder) / RUN_FILE).write_text(json.dumps(record, indent=2))


def versions() -> dict[str, str]:
    """The versions a run record names: omniquant, torch, transformers, Python."""
    import platform

    import torch
    import transformers

    from omniquant.version import __version__

    return {
        "omniquant": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
