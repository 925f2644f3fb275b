"""A named registry of plug-ins (model families, compression schemes) with built-ins loaded on first use.

Built-ins are named as `module:attribute` and imported by name when the registry is first read: a plug-in module
imports the registry's module (for the types it implements), never the reverse, so there is no import cycle.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from publisher.errors import PublisherError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, what: str, name_of: Callable[[T], str], builtins: Sequence[str]) -> None:
        self.what = what  # for messages: "model family", "compression scheme"
        self._name_of = name_of
        self._builtins = tuple(builtins)  # "module:attribute", imported on first use
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
            for where in self._builtins:
                module, _, attribute = where.partition(":")
                item = getattr(importlib.import_module(module), attribute)
                self._items.setdefault(self._name_of(item), item)
            self._loaded = True
        return dict(self._items)

    def named(self, name: str) -> T:
        known = self.all()
        if name not in known:
            raise PublisherError(f"unknown {self.what} '{name}' (known: {', '.join(known)})")
        return known[name]
