"""The output folder's lifecycle: `<output>.partial` while a run works, resume, atomic rename.

A run works inside `<output>.partial`: its settings (`run.json`), each finished block's state
(`state/`), spilled activations (`activations/`) and, last, the finished folder (`output/`),
which is renamed to `<output>` in one step. Only then is the partial folder deleted: a run
killed at any point leaves either nothing, or a partial folder that `resume` continues without
training a finished block again, or the complete output.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from omniquant.block_loop import StateStore
from omniquant.errors import OutputError
from omniquant.paths import check_new_output

log = logging.getLogger(__name__)

OUTPUT_STAGE = "output"  # the final folder is written here inside <output>.partial, then renamed
RUN_SETTINGS = "run.json"  # what the partial run was started with, compared on resume


def partial_folder(output: Path) -> Path:
    """Where a run on `output` works until it is complete."""
    return output.with_name(output.name + ".partial")


def prepare_output(output: Path | None, resume: bool) -> Path | None:
    """The work folder `<output>.partial`; refuses an output that exists or cannot be created,
    and a stale partial run without `resume`."""
    if output is None:
        return None
    check_new_output(output)
    partial = partial_folder(output)
    if partial.exists() and not resume:
        raise OutputError(
            f"{partial} holds an interrupted run; set `resume` to continue it, or delete it"
        )
    if resume and not partial.exists():
        log.warning("resume: there is no interrupted run at %s; starting afresh", partial)
    return partial


def settings_diff(saved: Any, now: Any, prefix: str = "") -> list[str]:
    """Where two nested settings differ, one 'path: saved -> now' entry per leaf."""
    if isinstance(saved, dict) and isinstance(now, dict):
        keys = sorted(set(saved) | set(now), key=str)
        return [
            line
            for key in keys
            for line in settings_diff(
                saved.get(key, "(absent)"), now.get(key, "(absent)"), f"{prefix}{key}."
            )
        ]
    return [] if saved == now else [f"{prefix.rstrip('.')}: {saved!r} -> {now!r}"]


def check_resume(partial: Path, run: dict[str, Any]) -> None:
    """Record the run's settings in a new partial folder, or refuse to resume one that was
    started with other settings (naming each difference)."""
    path = partial / RUN_SETTINGS
    if path.exists():
        try:
            saved = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise OutputError(f"resume: {path} is unreadable ({e}); delete {partial}") from e
        diff = settings_diff(saved, run)
        if diff:
            raise OutputError(
                f"resume: {partial} was started with other settings ({'; '.join(diff)}; "
                f"started -> now); rerun with the same settings, or delete it to start afresh"
            )
    else:
        partial.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(run, indent=2))


def open_state(partial: Path | None, run: dict[str, Any], blocks: int) -> StateStore:
    """The per-block state store of the run (none without an output), resumed where it was."""
    if partial is None:
        return StateStore(None)
    check_resume(partial, run)
    store = StateStore(partial / "state")
    done = store.completed()
    if done >= blocks:
        log.info("resuming %s: all %d blocks are done; writing the output", partial, blocks)
    elif done:
        log.info("resuming %s from block %d of %d (%d done)", partial, done, blocks, done)
    return store


def stage_folder(partial: Path) -> Path:
    """The folder the finished output is written in (what an interrupted write left removed)."""
    stage = partial / OUTPUT_STAGE
    shutil.rmtree(stage, ignore_errors=True)
    return stage


def publish(stage: Path, output: Path, partial: Path) -> None:
    """Rename the finished folder to the output in one step, then drop the partial folder."""
    stage.rename(output)
    shutil.rmtree(partial, ignore_errors=True)


def after_failure(partial: Path | None, store: StateStore, error: BaseException) -> None:
    """An interrupted or failed run: keep the partial folder when it holds finished blocks, and
    say so in a note on the error (the CLI prints it in its one line)."""
    if partial is None:
        return
    done = store.completed()
    if done == 0:
        shutil.rmtree(partial, ignore_errors=True)
        return
    add_note(error, f"{partial} keeps {done} finished blocks: rerun with `resume` to continue")


def add_note(error: BaseException, note: str) -> None:
    """`error.add_note(note)`, on Python 3.10 too (where it is only stored)."""
    if hasattr(error, "add_note"):
        error.add_note(note)
    else:  # pragma: no cover - Python 3.10
        error.__notes__ = [*getattr(error, "__notes__", []), note]  # type: ignore[attr-defined]


def write_failed(error: OSError, output: Path, partial: Path) -> OutputError:
    """A failed write (a full disk, a vanished folder) as one line; what the partial folder keeps
    is added as a note by `after_failure`."""
    reason = error.strerror or str(error)
    return OutputError(f"writing {output} failed: {reason} ({error.filename or partial})")
