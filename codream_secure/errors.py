"""User-facing errors of the CoDream core; the CLI turns each into exit status 2."""

from __future__ import annotations


class CoDreamError(ValueError):
    """Root of the errors a user can cause (bad data, bad config)."""


class DataError(CoDreamError):
    """A dataset is missing, malformed, or too small for the requested split."""


class ConfigError(CoDreamError):
    """A configuration value is invalid or inconsistent with another."""


class DeltaBudgetError(ConfigError):
    """A DP run's total delta (accountant + noise truncation) cannot stay within the stated one."""


def os_reason(error: OSError) -> str:
    """Why the operating system refused a file operation, in its own words ("Permission
    denied"), for messages that name the file themselves."""
    return error.strerror or str(error)
