"""The `omniquant` command: a thin layer over the public API; library messages name settings in
backticks, which `settings.flag_names` turns into this command's flags.

parser.py    the flags (`build_parser`)
settings.py  flags to config fields (`FIELD_FLAGS`, `config_from_args`) and back (`flag_names`)
commands.py  one function per subcommand
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sys
from collections.abc import Iterator, Sequence

import torch

from omniquant.cli.commands import COMMANDS
from omniquant.cli.parser import build_parser
from omniquant.cli.settings import (
    API_ONLY_FIELDS,
    EVAL_FLAG_OF,
    FIELD_FLAGS,
    config_from_args,
    flag_names,
)
from omniquant.errors import OmniQuantError


@contextlib.contextmanager
def bars_off() -> Iterator[None]:
    """Every tqdm bar off for the duration, including those of libraries that offer no switch
    (compressed-tensors' "Decompressing model"); a bar asked with disable= keeps its choice."""
    from tqdm import std

    init = std.tqdm.__dict__["__init__"]
    std.tqdm.__init__ = functools.partialmethod(std.tqdm.__init__, disable=True)
    try:
        yield
    finally:
        std.tqdm.__init__ = init


def notes(e: BaseException) -> list[str]:
    return [str(n) for n in getattr(e, "__notes__", [])]


def error_line(e: BaseException, text: bool = True) -> str:
    """An error (and its notes: what a failed run kept) as one line, settings named as flags."""
    parts = ([str(e)] if text and str(e) else []) + notes(e)
    return flag_names("; ".join(parts))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if args.threads is not None and args.threads < 1:
        print(f"error: --threads must be at least 1, got {args.threads}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    if args.quiet:  # transformers' own bars too ("Loading weights")
        hf_logging.disable_progress_bar()
    try:
        with bars_off() if args.quiet else contextlib.nullcontext():
            return COMMANDS[args.command](args)
    except OmniQuantError as e:
        print(f"error: {error_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"interrupted{'; ' if notes(e) else ''}{error_line(e, text=False)}", file=sys.stderr)
        return 130
    finally:
        if bars and args.quiet:
            hf_logging.enable_progress_bar()


__all__ = [
    "API_ONLY_FIELDS",
    "COMMANDS",
    "EVAL_FLAG_OF",
    "FIELD_FLAGS",
    "build_parser",
    "config_from_args",
    "error_line",
    "flag_names",
    "main",
]

if __name__ == "__main__":
    sys.exit(main())
