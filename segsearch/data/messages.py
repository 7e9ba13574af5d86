"""Pieces of the one-line errors that ingest raises: "a, b (and 3 more)"."""

from __future__ import annotations


def and_more(count: int, shown: int = 1) -> str:
    """ " (and N more)" when `count` things were found and only `shown` are named."""
    return f" (and {count - shown} more)" if count > shown else ""
