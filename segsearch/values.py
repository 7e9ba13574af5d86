"""What counts as a number or an integer where values arrive untyped (YAML, JSON, Tune results):
Python's bool is an int, and True must never pass for 1."""

from __future__ import annotations

from typing import Any


def is_number(value: Any) -> bool:
    """An int or a float, not a bool."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def is_integer(value: Any) -> bool:
    """An int, not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)
