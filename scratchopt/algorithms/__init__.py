"""Every algorithm scratchopt ships, one module each, and the registry built from them.

Each module holds one algorithm: its equations and a symbol ↔ argument ↔ state-key table in the
docstring, one ``update`` (or, for a closure algorithm, its ``step``) and the class, which declares
what the tools need to know (:class:`scratchopt.optimizer.Algorithm`). :data:`ALGORITHMS` maps each
class name to its class; it is found, not listed: every :class:`~scratchopt.optimizer.Algorithm`
subclass defined in a module of this package is registered, and ``scratchopt`` exports them all. Adding
an algorithm is adding a module here (``CONTRIBUTING.md``).
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil

from scratchopt.optimizer import Algorithm


def _discover() -> dict[str, type[Algorithm]]:
    found: dict[str, type[Algorithm]] = {}
    for module_info in sorted(pkgutil.iter_modules(__path__), key=lambda info: info.name):
        module = importlib.import_module(f"{__name__}.{module_info.name}")
        for name, value in inspect.getmembers(module, inspect.isclass):
            if issubclass(value, Algorithm) and value.__module__ == module.__name__:
                found[name] = value
    return found


#: Every algorithm, by class name (modules in alphabetical order, classes by name within one).
ALGORITHMS: dict[str, type[Algorithm]] = _discover()


def torch_twins() -> dict[str, type[Algorithm]]:
    """The algorithms that reproduce a ``torch.optim`` class, by that class's name."""
    return {cls.torch_twin: cls for cls in ALGORITHMS.values() if cls.torch_twin is not None}


__all__ = ["ALGORITHMS", "torch_twins"]
