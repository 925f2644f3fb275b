"""A named registry of plug-ins (model families, compression schemes) with built-ins loaded on first use."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

from publisher.errors import PublisherError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, what: str, name_of: Callable[[T], str], builtins: Callable[[], Iterable[T]]) -> None:
        self.what = what  # for messages: "model family", "compression scheme"
        self._name_of = name_of
        self._builtins = builtins  # imported on first use: the built-in modules import the registry's own module
        self._items: dict[str, T] = {}
        self._lock = threading.Lock()
        self._loaded = False

    def register(self, item: T) -> T:
        with self._lock:
            self._items[self._name_of(item)] = item
        return item

    def unregister(self, name: str) -> None:
        with self._lock:
            self._items.pop(name, None)

    def all(self) -> dict[str, T]:
        if not self._loaded:
            for item in self._builtins():
                self._items.setdefault(self._name_of(item), item)
            self._loaded = True
        return dict(self._items)

    def named(self, name: str) -> T:
        known = self.all()
        if name not in known:
            raise PublisherError(f"unknown {self.what} '{name}' (known: {', '.join(known)})")
        return known[name]
