"""Typed errors: each names the problem and what to do about it."""


class ShiftAddError(Exception):
    """Base class of every error this package raises on bad input."""


class ModelLoadError(ShiftAddError):
    """The model could not be found or read."""


class TextLoadError(ShiftAddError):
    """The evaluation or calibration text could not be found or read."""


class ConfigError(ShiftAddError, ValueError):
    """An option has an invalid value."""


class ArtifactError(ShiftAddError):
    """An artifact file is missing, corrupt, truncated or does not match this runtime."""


class InputError(ShiftAddError, ValueError):
    """Run-time input of the wrong dtype, rank, length or range."""


class WeightError(ShiftAddError, ValueError):
    """A weight cannot be reparameterized (NaN/inf, wrong shape)."""


class UnsupportedModelError(ShiftAddError):
    """The model uses operators or shapes this compiler cannot handle."""
