"""Frozen, validated configuration records.

`WeightQuant` and `ActQuant` say *what* the quantized model looks like; `CalibConfig` says *how* the
quantization parameters are learned; `OmniQuantConfig` bundles the three and round-trips
through JSON
(it is what `omniquant.json` stores).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from omniquant.errors import ConfigError
from omniquant.schedule import SCHEDULES, Schedule

Method = Literal["omniquant", "rtn"]
QkvPoint = Literal["attention", "projection"]
LossWeighting = Literal["mse", "token-normalized"]

MIN_BITS = 2
MAX_BITS = 8
NO_QUANT_BITS = 16


@dataclass(frozen=True)
class WeightQuant:
    """Uniform affine weight quantization.

    bits: 2..8. group_size: None for one scale/zero point per output row, else g consecutive input
    channels of a row share them (a ragged last group holds the remainder).
    symmetric: signed grid with
    zero point 0 instead of the asymmetric min-max grid.
    """

    bits: int = 4
    group_size: int | None = None
    symmetric: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not MIN_BITS <= self.bits <= MAX_BITS:
            raise ConfigError(
                f"weight bits must be an integer from {MIN_BITS} to {MAX_BITS}, got {self.bits!r}"
            )
        if self.group_size is not None and (
            not isinstance(self.group_size, int) or self.group_size <= 0
        ):
            raise ConfigError(
                f"group size must be a positive integer (or None/0 for per-channel), "
                f"got {self.group_size!r}"
            )

    @property
    def label(self) -> str:
        """Short name such as `W4` or `W3g128`."""
        return f"W{self.bits}" + (f"g{self.group_size}" if self.group_size else "")


@dataclass(frozen=True)
class ActQuant:
    """Per-token dynamic activation quantization; bits 16 means activations stay in float."""

    bits: int = NO_QUANT_BITS
    quantize_qkv: bool = True
    symmetric: bool = False
    # where q, k and v are quantized: "attention" = as the attention function receives them (after
    # RoPE and any q/k norm; k and v as the KV cache stores them), per token and head, as the
    # reference code does; "projection" = the q/k/v projections' outputs, before RoPE
    qkv_point: QkvPoint = "attention"

    def __post_init__(self) -> None:
        if self.qkv_point not in ("attention", "projection"):
            raise ConfigError(
                f"qkv_point must be 'attention' or 'projection', got {self.qkv_point!r}"
            )
        if self.bits != NO_QUANT_BITS and not (
            isinstance(self.bits, int) and 4 <= self.bits <= MAX_BITS
        ):
            raise ConfigError(
                f"activation bits must be 4..{MAX_BITS}, or {NO_QUANT_BITS} for no activation "
                f"quantization, got {self.bits!r}"
            )

    @property
    def enabled(self) -> bool:
        """Whether activations are quantized at all."""
        return self.bits != NO_QUANT_BITS


@dataclass(frozen=True)
class CalibConfig:
    """How the block-wise calibration runs (defaults from the paper / reference code)."""

    method: Method = "omniquant"
    lwc: bool = True
    let: bool = False
    epochs: int = 20
    nsamples: int = 128
    seqlen: int = 2048
    batch_size: int = 1
    lwc_lr: float = 1e-2
    let_lr: float = 5e-3
    wd: float = 0.0
    weight_lr: float = 0.0  # in quantization steps of each group (quant/weight_training.py)
    weight_lr_unit: Literal["step", "absolute"] = "step"  # absolute: weight units (older rows)
    weight_bound: float | None = None  # |Δ| ≤ bound (in --weight-lr's unit); None: unbounded
    lr_schedule: Schedule = "constant"  # every group's rate over a block's steps (schedule.py)
    aug_loss: bool = False
    loss: LossWeighting = "mse"
    calib_dataset: str = "austen:prideprejudice"
    seed: int = 0
    max_nan_retries: int = 4
    lwc_init: float = 4.0
    let_alpha: float | None = None  # None: 0.5, or 0.75 with 4-bit activations; identity if A16
    zero_point_ste: bool = True  # straight-through gradient through the zero point's rounding
    let_scale: Literal["log", "direct"] = "direct"  # LET learns s itself (reference), or log s
    let_init: Literal["ours", "reference"] = "ours"  # LET's starting scales (see transforms/let)
    shuffle: bool = False  # False: windows in the same order every epoch, as the reference code
    val_samples: int | None = None  # held-out windows for the guard; None: `val_windows`' default
    patience: int = 2  # epochs without a better held-out loss before a block stops; 0: never
    # the dtype the block loop stores the chains' activations in between blocks (activations.py)
    activation_dtype: Literal["float32", "bfloat16"] = "float32"
    recompute: bool = True  # Q(W) recomputed in backward, not kept (quant/recompute.py)
    # after the block loop: every linear's scales trained end to end (end_to_end.py)
    e2e_epochs: int = 0  # 0: no end-to-end stage
    e2e_lr: float = 1e-3  # relative: a scale h0 (1 + t) moves by about this fraction per step
    e2e_loss: Literal["distill", "next-token"] = "distill"  # to the float model / the text
    e2e_topk: int = 64  # the float model's most likely tokens the distillation loss keeps

    def __post_init__(self) -> None:
        if self.method not in ("omniquant", "rtn"):
            raise ConfigError(f"method must be 'omniquant' or 'rtn', got {self.method!r}")
        if self.weight_lr_unit not in ("step", "absolute"):
            raise ConfigError(
                f"weight_lr_unit must be 'step' or 'absolute', got {self.weight_lr_unit!r}"
            )
        if self.lr_schedule not in SCHEDULES:
            raise ConfigError(
                f"lr_schedule must be one of {', '.join(SCHEDULES)}, got {self.lr_schedule!r}"
            )
        if self.let_scale not in ("log", "direct"):
            raise ConfigError(f"let_scale must be 'log' or 'direct', got {self.let_scale!r}")
        if self.let_init not in ("ours", "reference"):
            raise ConfigError(f"let_init must be 'ours' or 'reference', got {self.let_init!r}")
        if self.activation_dtype not in ("float32", "bfloat16"):
            raise ConfigError(
                f"activation_dtype must be 'float32' or 'bfloat16', got {self.activation_dtype!r}"
            )
        if self.e2e_loss not in ("distill", "next-token"):
            raise ConfigError(f"e2e_loss must be 'distill' or 'next-token', got {self.e2e_loss!r}")
        if self.e2e_topk < 1:
            raise ConfigError(f"e2e_topk must be >= 1, got {self.e2e_topk}")
        if self.loss not in ("mse", "token-normalized"):
            raise ConfigError(f"loss must be 'mse' or 'token-normalized', got {self.loss!r}")
        for name in ("epochs", "max_nan_retries", "patience", "e2e_epochs"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("nsamples", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.seqlen < 2:
            raise ConfigError(f"seqlen must be >= 2, got {self.seqlen}")
        if self.nsamples % self.batch_size:
            raise ConfigError(
                f"nsamples ({self.nsamples}) must be a multiple of batch_size ({self.batch_size})"
            )
        for name in ("lwc_lr", "let_lr", "e2e_lr"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.weight_bound is not None and not self.weight_bound > 0:
            raise ConfigError(f"weight_bound must be > 0 or None, got {self.weight_bound}")
        if self.wd < 0 or self.weight_lr < 0:
            raise ConfigError(f"wd and weight_lr must be >= 0, got {self.wd}, {self.weight_lr}")
        if self.val_samples is not None and (
            self.val_samples < 0 or self.val_samples % self.batch_size
        ):
            raise ConfigError(
                f"val_samples must be >= 0 and a multiple of batch_size ({self.batch_size}), "
                f"got {self.val_samples}"
            )

    @property
    def trains(self) -> bool:
        """Whether any parameter is learned (RTN and 0 epochs learn nothing)."""
        learns = self.lwc or self.let or self.weight_lr > 0
        return self.method == "omniquant" and self.epochs > 0 and learns

    @property
    def windows(self) -> int:
        """The calibration windows a run draws: `nsamples` and the guards' `val_windows`, or one
        batch for a run that learns nothing (RTN: the block loop only measures its error)."""
        if self.trains or self.let or self.e2e_epochs:  # LET's start reads activation statistics
            return self.nsamples + self.val_windows
        return self.batch_size

    @property
    def val_windows(self) -> int:
        """Held-out windows for the guards (the block loop's and the end-to-end stage's):
        `val_samples`, or by default an eighth of `nsamples` (at least one batch), none when
        nothing is trained."""
        if not self.trains and not self.e2e_epochs:
            return 0
        if self.val_samples is not None:
            return self.val_samples
        return self.batch_size * max(1, self.nsamples // 8 // self.batch_size)


@dataclass(frozen=True)
class OmniQuantConfig:
    """Everything that defines a quantization run's result."""

    weight: WeightQuant = field(default_factory=WeightQuant)
    act: ActQuant = field(default_factory=ActQuant)
    calib: CalibConfig = field(default_factory=CalibConfig)
    quantize_lm_head: bool = False
    # module paths (fnmatch patterns) the user accepts to leave in float: weights this run cannot
    # quantize (`coverage`); without them a run leaving more than 1% in float is refused
    keep_float: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.keep_float, str) or not all(
            isinstance(p, str) and p for p in self.keep_float
        ):
            raise ConfigError(
                f"`keep_float` takes a tuple of module path patterns, got {self.keep_float!r}"
            )
        object.__setattr__(self, "keep_float", tuple(self.keep_float))
        if self.calib.e2e_epochs and self.act.enabled:
            raise ConfigError(
                f"the end-to-end stage (`e2e_epochs` {self.calib.e2e_epochs}) trains weight-only "
                f"models; drop it or quantize weights only (`act.bits` 16, not {self.act.bits})"
            )

    @property
    def label(self) -> str:
        """Setting name in the paper's notation, e.g. `W4A16g128`."""
        g = f"g{self.weight.group_size}" if self.weight.group_size else ""
        return f"W{self.weight.bits}A{self.act.bits}{g}"

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (`keep_float` only when given, so older records read the same)."""
        data = asdict(self)
        if self.keep_float:
            data["keep_float"] = list(self.keep_float)
        else:
            del data["keep_float"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OmniQuantConfig:
        """Inverse of `to_dict`; unknown keys are an error."""
        parts = {"weight": WeightQuant, "act": ActQuant, "calib": CalibConfig}
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key in parts:
                known = {f.name for f in fields(parts[key])}
                unknown = set(value) - known
                if unknown:
                    raise ConfigError(f"unknown {key} settings: {sorted(unknown)}")
                kwargs[key] = parts[key](**value)
            elif key == "quantize_lm_head":
                kwargs[key] = bool(value)
            elif key == "keep_float":
                kwargs[key] = tuple(value)
            else:
                raise ConfigError(f"unknown config key {key!r}")
        return cls(**kwargs)


def unused_settings(calib: CalibConfig) -> list[tuple[list[str], str]]:
    """Settings given a value of their own that the run would ignore, each group with the
    setting it needs: ([`let_alpha`], "let")."""
    d = CalibConfig()
    groups: list[tuple[list[str], str]] = []
    if not calib.let:
        changed = [n for n in ("let_alpha", "let_lr") if getattr(calib, n) != getattr(d, n)]
        groups.append((changed, "let"))
    if not calib.e2e_epochs:
        changed = [
            n for n in ("e2e_lr", "e2e_loss", "e2e_topk") if getattr(calib, n) != getattr(d, n)
        ]
        groups.append((changed, "e2e_epochs"))
    return [(names, needs) for names, needs in groups if names]


def check_run(config: OmniQuantConfig) -> None:
    """Every check of a quantization run that needs no model: what `quantize` and the CLI both
    refuse before anything is loaded. Settings are named as `config` fields in backticks; the
    CLI names them as its flags (`cli.flag_names`)."""
    calib = config.calib
    for names, needs in unused_settings(calib):
        listed = ", ".join(f"`{n}`" for n in names)
        verb = "applies" if len(names) == 1 else "apply"
        raise ConfigError(f"{listed} only {verb} with `{needs}`: set `{needs}`, or drop {listed}")
    if calib.method == "omniquant" and calib.epochs == 0:
        raise ConfigError(
            "`epochs` 0 trains nothing: the result would be the untrained clipping start, not "
            "OmniQuant; use `method` rtn for round-to-nearest, or `epochs` 1 or more"
        )
