"""Registries: a name -> object table with a decorator (unknown names are a clear MVCError), and what the packages
above publish for the config (timm's `_registry.py` pattern: the table at the bottom, filled from above).

A package publishes the choices of its config keys (`publish_choices`: a registry, read whenever asked, or a
tuple of names) and the rules spanning keys that need its knowledge (`@config_rule`); `mvc.core.config` reads
both when it validates, and so imports none of those packages. Importing `mvc` imports every publisher.
"""

from __future__ import annotations

from typing import Any, Callable, Generic, Sequence, TypeVar

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


#################################################################################
#                   What the packages publish for the config                    #
#################################################################################

_CHOICES: dict[str, Registry | tuple[str, ...]] = {}
_RULES: dict[str, tuple[Callable[[Any], None], bool]] = {}


def publish_choices(kind: str, names: Registry | Sequence[str]) -> None:
    """Make `names` (a registry, whose names are read when asked, or a fixed sequence) the choices of `kind`."""
    if kind in _CHOICES:
        raise ValueError(f"choices of {kind!r} published twice")
    _CHOICES[kind] = names if isinstance(names, Registry) else tuple(names)


def choices(kind: str) -> Callable[[], list[str]]:
    """A config field's choices: a zero-argument callable returning the names published for `kind`, read when a
    config is validated (by then every publisher was imported, with `mvc`)."""
    def names() -> list[str]:
        if kind not in _CHOICES:
            raise KeyError(f"no package published the choices of {kind!r}")
        obj = _CHOICES[kind]
        return obj.names() if isinstance(obj, Registry) else list(obj)
    names.__name__ = kind
    return names


def config_rule(key: str, *, names_keys: bool = False) -> Callable:
    """Decorator: `fn(cfg)` is the rule of config key `key` that only its package can check; it raises MVCError,
    which the config reports as `config key <key>: <message>` (as it is when `names_keys`: it names them)."""
    def deco(fn: Callable[[Any], None]) -> Callable[[Any], None]:
        if key in _RULES:
            raise ValueError(f"config rule {key!r} registered twice")
        _RULES[key] = (fn, names_keys)
        return fn
    return deco


def config_rule_of(key: str) -> tuple[Callable[[Any], None], bool]:
    """The rule registered for `key` and whether its messages name their keys."""
    if key not in _RULES:
        raise KeyError(f"no package registered the config rule of {key!r}")
    return _RULES[key]
