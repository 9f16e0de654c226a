"""A tiny name -> object registry with a decorator; unknown names are a clear MVCError."""

from __future__ import annotations

from typing import Any, Callable, Generic, TypeVar

from mvc.core.utils import MVCError

T = TypeVar("T")


class Registry(Generic[T]):
    """Register objects by name (`@REG.register("name")`) and look them up with a helpful error."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator adding the decorated object under `name`."""
        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._items[name] = obj
            return obj
        return deco

    def get(self, name: str) -> T:
        """The object registered under `name`, or an MVCError listing the known names."""
        if name not in self._items:
            raise MVCError(f"unknown {self.kind} {name!r}; choose one of {', '.join(self.names())}")
        return self._items[name]

    def names(self) -> list[str]:
        """Registered names, in registration order."""
        return list(self._items)

    def __contains__(self, name: Any) -> bool:
        return name in self._items
