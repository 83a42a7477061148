"""Errors a user can fix: run.py prints them as one line and exits with code 2."""
import math


class ConfigError(ValueError):
    """Bad input, named by its config key: `ConfigError("memory", "'foo' is not one of delta, linear, none")`."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key


def check_choice(key: str, value: object, choices: tuple | list) -> None:
    if value not in choices:
        raise ConfigError(key, f"{value!r} is not one of {', '.join(map(str, choices))}")


def check_bool(key: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ConfigError(key, f"{value!r} is not one of true, false")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


FLOAT32_MAX = 3.4028234663852886e38  # optimizer states and gates are fp32: a larger value overflows there


def check_positive(key: str, value: object) -> None:
    if not _is_number(value) or value <= 0:
        raise ConfigError(key, f"{value!r} must be a positive number")
    if value > FLOAT32_MAX:
        raise ConfigError(key, f"{value!r} overflows float32 (at most {FLOAT32_MAX:.3g})")


def check_finite(key: str, value: object) -> None:
    if not _is_number(value) or abs(value) > FLOAT32_MAX:
        raise ConfigError(key, f"{value!r} must be a finite number")


def check_int(key: str, value: object, low: int = 0) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ConfigError(key, f"{value!r} must be an integer >= {low}")


def check_range(key: str, value: object, low: float, high: float, high_open: bool = False) -> None:
    """low <= value <= high (value < high if high_open)."""
    if not _is_number(value) or value < low or value > high or (high_open and value == high):
        raise ConfigError(key, f"{value!r} must be a number in [{low}, {high}{')' if high_open else ']'}")


class Terminated(Exception):
    """SIGTERM arrived outside the training loop (evaluation, export): the job stops with one line."""


class ResourceError(RuntimeError):
    """A resource ran out (disk space, say): one line naming it, exit 1, no partial file left."""
