"""Exceptions raised by sam-peft.

Every error names the offending value and what to do about it. They subclass ``ValueError`` (bad input)
or ``RuntimeError`` (bad state) so generic handlers keep working.
"""

from __future__ import annotations


class SamPeftError(Exception):
    """Base class of all sam-peft errors."""


class ConfigError(SamPeftError, ValueError):
    """An invalid configuration value."""


class SelectionError(SamPeftError, RuntimeError):
    """The burn-in or the selection could not produce a valid mask."""


class NotSelectedError(SamPeftError, RuntimeError):
    """A data-driven adapter was used before ``select_parameters`` chose its entries."""


class DeltaFileError(SamPeftError, ValueError):
    """A delta file (or adapter directory) is unreadable, corrupted or inconsistent."""


class BaseModelMismatchError(SamPeftError, ValueError):
    """A delta was recorded on a different base model than the one it is applied to."""
