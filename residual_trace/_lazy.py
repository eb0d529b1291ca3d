"""Names a package exports but imports only on first use.

That keeps importing the package cheap: no torch until a measure is reached.

Examples:
    >>> getattr_ = lazy_exports("demo", {"sqrt": "math"})
    >>> getattr_("sqrt")(4.0)
    2.0
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(package: str, exports: Mapping[str, str]) -> Callable[[str], Any]:
    """A module-level ``__getattr__`` for ``package``.

    Each name of ``exports`` is read from the module it maps to (a full dotted name, from a
    static table) when first asked for; any other name is an :class:`AttributeError`, as for
    an ordinary module.
    """

    def __getattr__(name: str) -> Any:
        if name in exports:
            return getattr(importlib.import_module(exports[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
