"""User-facing errors. The CLI turns any :class:`UserError` into a one-paragraph message and exit 2."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user (config, data, paths): reported before any training starts."""


class ConfigError(UserError):
    """One or more invalid config values; ``problems`` holds one line per problem (key: what, fix)."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        head = f"{len(self.problems)} problem(s) in the config:"
        super().__init__("\n".join([head, *(f"  - {p}" for p in self.problems)]))


class DataError(UserError):
    """The data source cannot be read or does not fit the config (names the key and the fix)."""


class RunStopped(UserError):
    """A run stopped on purpose (e.g. too many failed clients); it can be continued with ``fedsim resume``."""
