"""A local multiple-choice lm-eval task: a YAML beside a JSONL of documents, readable offline.

Each document is ``{"context": str, "choices": [str, ...], "label": int}``; lm-eval scores
``context + " " + choice`` for every choice and reports acc and acc_norm (acc with each choice's
log-likelihood divided by its length in bytes).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TypedDict


class ChoiceDoc(TypedDict):
    context: str
    choices: list[str]
    label: int


def task_yaml(name: str, data_file: Path) -> str:
    """The task's YAML; strings are JSON-quoted (valid YAML whatever they hold)."""
    return "\n".join(
        [
            f"task: {json.dumps(name)}",
            "dataset_path: json",
            "dataset_kwargs:",
            "  data_files:",
            f"    test: {json.dumps(str(data_file.resolve()))}",
            "test_split: test",
            "output_type: multiple_choice",
            "doc_to_text: context",
            "doc_to_choice: choices",
            "doc_to_target: label",
            "metric_list:",
            *(
                f"  - {{metric: {m}, aggregation: mean, higher_is_better: true}}"
                for m in ("acc", "acc_norm")
            ),
            "metadata:",
            "  version: 1.0",
            "",
        ]
    )


def write_choice_task(folder: str | Path, name: str, docs: list[ChoiceDoc]) -> str:
    """Write `<name>.yaml` and `<name>.jsonl` into `folder` (created); returns the task name,
    which `--tasks-include folder` makes known to lm-eval."""
    for i, doc in enumerate(docs):
        if not 0 <= doc["label"] < len(doc["choices"]):
            raise ValueError(f"document {i}: label {doc['label']} is not a choice index")
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    data = out / f"{name}.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in docs), encoding="utf-8")
    (out / f"{name}.yaml").write_text(task_yaml(name, data), encoding="utf-8")
    return name
