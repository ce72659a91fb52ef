"""From flags to settings and back: the config fields each flag sets (`FIELD_FLAGS`, checked
against the config by the tests), and library messages with their settings named as flags
(`flag_names`)."""

from __future__ import annotations

import argparse
import re
from typing import Any

from omniquant import checks
from omniquant.cli.parser import GGUF_DEFAULTS
from omniquant.config import ActQuant, CalibConfig, OmniQuantConfig, WeightQuant
from omniquant.errors import ConfigError
from omniquant.formats.gguf.writer import GgufOptions


def gguf_options(a: argparse.Namespace) -> GgufOptions | None:
    """The GGUF storage options, refused with another format."""
    if a.format != "gguf":
        refuse_unused(changed_flags(a, GGUF_DEFAULTS), "only {verb} with --format gguf: drop it")
        return None
    return GgufOptions(
        embeddings=a.gguf_embeddings, output=a.gguf_output, approximate=a.gguf_approximate
    )


# Every config field the CLI sets, by its dotted path, and the flag (argparse dest) that sets it;
# the few that differ in name or value convert. `tests/test_run_checks.py` checks that each
# field is here or named in API_ONLY_FIELDS, and that each flag's default is the field's.
FIELD_FLAGS: dict[str, str] = {
    "weight.bits": "wbits",
    "weight.group_size": "group_size",
    "weight.symmetric": "symmetric",
    "act.bits": "abits",
    "act.quantize_qkv": "qkv_quant",
    "act.qkv_point": "qkv_point",
    "calib.zero_point_ste": "zero_point_grad",
    "quantize_lm_head": "quantize_lm_head",
    "keep_float": "keep_float",
    **{
        f"calib.{name}": name
        for name in (
            "method",
            "lwc",
            "let",
            "epochs",
            "nsamples",
            "seqlen",
            "batch_size",
            "lwc_lr",
            "let_lr",
            "wd",
            "weight_lr",
            "weight_lr_unit",
            "weight_bound",
            "lr_schedule",
            "aug_loss",
            "loss",
            "calib_dataset",
            "seed",
            "let_alpha",
            "let_scale",
            "let_init",
            "shuffle",
            "val_samples",
            "patience",
            "activation_dtype",
            "recompute",
            "e2e_epochs",
            "e2e_lr",
            "e2e_loss",
            "e2e_topk",
        )
    },
}


# config fields the CLI leaves at their defaults (the Python API sets them)
API_ONLY_FIELDS = ("act.symmetric", "calib.max_nan_retries", "calib.lwc_init")


# flag value -> field value, where they differ
FLAG_VALUES: dict[str, Any] = {
    "group_size": lambda v: v or None,  # 0 = per-channel = None
    "zero_point_grad": lambda v: v == "ste",
    "keep_float": tuple,
}


# library names (settings and arguments) whose flag is not `--` + the name with dashes
FLAG_OF: dict[str, str] = {
    **{
        field.rsplit(".", 1)[-1]: dest
        for field, dest in FIELD_FLAGS.items()
        if not field.endswith(".bits")  # weight.bits and act.bits: named by their paths
    },
    "quantize_qkv": "qkv_quant",
}


EVAL_FLAG_OF = {
    "seqlen": "eval_seqlen",
    "max_windows": "eval_windows",
    "batch_size": "eval_batch_size",
}


def flag_names(text: str, overrides: dict[str, str] | None = None) -> str:
    """A library message with each setting named as its flag: `let_lr` -> --let-lr."""
    names = {**FLAG_OF, **(overrides or {})}

    def flag(m: Any) -> str:
        name = m.group(1)
        if name in FIELD_FLAGS:  # a dotted config path: `weight.bits`
            return "--" + FIELD_FLAGS[name].replace("_", "-")
        if not name.isidentifier():
            return m.group(0)
        return "--" + names.get(name, name).replace("_", "-")

    return re.sub(r"`([\w.]+)`", flag, text)


def config_from_args(a: argparse.Namespace) -> OmniQuantConfig:
    """The run's config from the parsed flags, field by field through FIELD_FLAGS."""
    parts: dict[str, dict[str, Any]] = {"weight": {}, "act": {}, "calib": {}, "": {}}
    for field, dest in FIELD_FLAGS.items():
        part, _, name = field.rpartition(".")
        value = getattr(a, dest)
        parts[part][name] = FLAG_VALUES[dest](value) if dest in FLAG_VALUES else value
    return OmniQuantConfig(
        weight=WeightQuant(**parts["weight"]),
        act=ActQuant(**parts["act"]),
        calib=CalibConfig(**parts["calib"]),
        **parts[""],
    )


def changed_flags(a: argparse.Namespace, defaults: dict[str, Any]) -> list[str]:
    """The flags among `defaults` (by attribute name) that were given a value of their own."""
    return [
        "--" + name.replace("_", "-")
        for name, default in defaults.items()
        if getattr(a, name, default) != default
    ]


def refuse_unused(flags: list[str], reason: str) -> None:
    """Refuse flags that the command would ignore: '--a, --b only apply with ...'."""
    if flags:
        verb = "applies" if len(flags) == 1 else "apply"
        raise ConfigError(f"{', '.join(flags)} {reason.format(verb=verb)}")


def check_eval_flags(a: argparse.Namespace) -> None:
    """Refuse perplexity settings that cannot work, before anything is loaded."""
    if a.eval_windows < 0:
        raise ConfigError(f"--eval-windows must be 0 (all) or positive, got {a.eval_windows}")
    try:
        checks.check_eval_settings(a.eval_seqlen, a.eval_windows or None, a.eval_batch_size)
    except ConfigError as e:
        raise ConfigError(flag_names(str(e), EVAL_FLAG_OF)) from e
