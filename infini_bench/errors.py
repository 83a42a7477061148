"""Errors a user can fix: run.py prints them as one line and exits with code 2."""


class ConfigError(ValueError):
    """Bad input, named by its config key: `ConfigError("memory", "'foo' is not one of delta, linear, none")`."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key


def check_choice(key: str, value: object, choices: tuple | list) -> None:
    if value not in choices:
        raise ConfigError(key, f"{value!r} is not one of {', '.join(map(str, choices))}")


def check_positive(key: str, value: object) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
        raise ConfigError(key, f"{value!r} must be a positive number")
