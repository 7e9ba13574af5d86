"""A registry you can list: name → builder, with errors that name the valid choices."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from segsearch.errors import UserError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to objects of one kind (blocks, decoders, losses, ...)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator that files an object under `name`; a name may be registered once."""

        def add(item: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = item
            return item

        return add

    def get(self, name: str) -> T:
        """The object registered under `name`, or a UserError that lists the choices."""
        try:
            return self._items[name]
        except (KeyError, TypeError):
            raise UserError(f"unknown {self.kind} {name!r}; choose from {self.names()}") from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items
