"""Exceptions raised by omniquant; every message says what to do about it."""

from __future__ import annotations


class OmniQuantError(Exception):
    """Base class of every error omniquant raises on purpose."""


class ConfigError(OmniQuantError, ValueError):
    """An invalid setting (bits out of range, a bad group size, ...)."""


class DataError(OmniQuantError, ValueError):
    """Calibration or evaluation text that is missing, unreadable or too short."""


class ModelError(OmniQuantError, ValueError):
    """A model that cannot be found, loaded, or whose architecture is not supported."""


class CalibrationError(OmniQuantError, RuntimeError):
    """Calibration could not finish (for example, a loss that stays NaN)."""


class OutputError(OmniQuantError, ValueError):
    """An output folder that exists already or cannot be written."""


class ExportError(OmniQuantError, ValueError):
    """A model or setting that the asked export format cannot hold."""


class MissingDependencyError(OmniQuantError, ImportError):
    """An optional package that a feature needs is not installed; the message names the extra."""
