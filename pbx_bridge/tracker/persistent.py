"""Cheap updates of immutable values: a persistent map (O(log32 n) per update) and a fast `replace`."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import fields
from typing import Any, TypeVar

import immutables

K = TypeVar("K")
V = TypeVar("V")
T = TypeVar("T")

_FIELD_NAMES: dict[type, frozenset[str]] = {}


def evolve(value: T, **changes: Any) -> T:
    """`dataclasses.replace` for a frozen dataclass without slots and without `__post_init__`, about
    ten times faster: the instance's attribute dict is copied and updated (no `__init__` runs).
    Unknown field names raise TypeError, as `replace` does."""
    cls = type(value)
    names = _FIELD_NAMES.get(cls)
    if names is None:
        names = _FIELD_NAMES[cls] = frozenset(f.name for f in fields(cls))  # type: ignore[arg-type]
    if not changes.keys() <= names:
        raise TypeError(f"{cls.__name__} has no field {sorted(changes.keys() - names)[0]!r}")
    new = object.__new__(cls)
    state = new.__dict__
    state.update(value.__dict__)
    state.update(changes)
    return new


class PMap(Mapping[K, V]):
    """An immutable mapping backed by a HAMT (`immutables.Map`, PEP 603's design).

    `set` and `delete` return a new map sharing all but O(log32 n) nodes with this one, so the
    tracker's state can stay a value (never mutated) without copying every call on every event.
    Iteration order is not insertion order. Compares equal to any Mapping with the same items.
    """

    __slots__ = ("_map",)

    def __init__(self, items: Mapping[K, V] | Iterable[tuple[K, V]] = ()) -> None:
        self._map: immutables.Map[K, V] = immutables.Map(items)

    @classmethod
    def _of(cls, inner: immutables.Map[K, V]) -> PMap[K, V]:
        new: PMap[K, V] = object.__new__(cls)
        new._map = inner
        return new

    def set(self, key: K, value: V) -> PMap[K, V]:
        """A map with `key` bound to `value`."""
        return PMap._of(self._map.set(key, value))

    def delete(self, key: K) -> PMap[K, V]:
        """A map without `key` (this map if it has no `key`)."""
        if key not in self._map:
            return self
        return PMap._of(self._map.delete(key))

    def __getitem__(self, key: K) -> V:
        return self._map[key]

    def get(self, key: K, default: Any = None) -> Any:
        """The value of `key`, or `default`."""
        return self._map.get(key, default)

    def __contains__(self, key: object) -> bool:
        return key in self._map

    def __iter__(self) -> Iterator[K]:
        return iter(self._map)

    def __len__(self) -> int:
        return len(self._map)

    def __repr__(self) -> str:
        return f"PMap({dict(self._map.items())!r})"
