"""A catalog of named declarations (pruning methods, refinements, export formats), each declared
by a module of one package, which the catalog imports on first use. It imports neither torch nor
Ray, so config validation and the CLI stay fast."""

from __future__ import annotations

import importlib
import pkgutil


class Catalog:
    def __init__(self, kind: str, package: str):
        self.kind, self.package = kind, package  # e.g. "method", "asft_ray.methods"
        self._items: dict[str, object] = {}
        self._loaded = False

    def add(self, item, replace: bool = False):
        """Register `item` under `item.name`; a different item of the same name is an error unless `replace`."""
        if not replace and self._items.get(item.name, item) is not item:
            raise ValueError(f"{self.kind} {item.name!r} is already registered")
        self._items[item.name] = item
        return item

    def remove(self, name: str) -> None:
        self._items.pop(name, None)

    def items(self) -> dict:
        """Every registered item by name (the package's modules imported first, once)."""
        if not self._loaded:
            self._loaded = True
            package = importlib.import_module(self.package)
            for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
                if info.name != "registry":
                    importlib.import_module(f"{self.package}.{info.name}")
        return dict(self._items)
