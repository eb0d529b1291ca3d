"""Settings read from the environment: each one read, and checked, in exactly one place.

==============================  ===============================================================
``RESIDUAL_TRACE_MEMORY_MB``    budget for the temporaries of one chunked step, in MiB: a whole
                                number from 16 to 1,048,576 (1 TiB); unset or empty: 512
``RESIDUAL_TRACE_DEBUG``        show the traceback of an internal error (and Ray's own log):
                                ``1``/``true``/``yes``/``on`` or ``0``/``false``/``no``/``off``;
                                unset or empty: off
``RESIDUAL_TRACE_CACHE``        where converted models and cached embeddings are kept: a
                                directory (created when needed); unset: the user cache
==============================  ===============================================================

:func:`check_environment` checks every one of them. Every experiment calls it when its
options are built (:meth:`CommonOptions.validate
<residual_trace.experiments.options.CommonOptions.validate>`, which the report's parts go
through too) and again just before its model loads
(:func:`~residual_trace.experiments.common.resolve_model`), so a bad value fails every verb
alike, in one line, before any work: never only the verbs that happen to read it, and never
after a model has loaded. The cache location (``RESIDUAL_TRACE_CACHE``) is checked up front
the same way (:func:`cache_location`), and again where the cache is used.

Examples:
    >>> import os
    >>> os.environ["RESIDUAL_TRACE_MEMORY_MB"] = "64"
    >>> memory_mb()
    64
    >>> os.environ["RESIDUAL_TRACE_MEMORY_MB"] = "64MB"
    >>> try:
    ...     check_environment()
    ... except UserError as error:
    ...     print(error)
    RESIDUAL_TRACE_MEMORY_MB='64MB': expected a whole number of MiB from 16 to 1048576, e.g. 512
    >>> del os.environ["RESIDUAL_TRACE_MEMORY_MB"]
"""

from __future__ import annotations

import os
import re

from residual_trace.errors import UserError

__all__ = ["DEFAULT_MEMORY_MB", "cache_location", "check_environment", "debug", "memory_mb"]

MEMORY_MB = "RESIDUAL_TRACE_MEMORY_MB"
DEBUG = "RESIDUAL_TRACE_DEBUG"

#: ``RESIDUAL_TRACE_MEMORY_MB``: its default, and the range it must lie in (below 16 MiB a
#: chunk of one item already exceeds the budget; above 1 TiB the value is a typo).
DEFAULT_MEMORY_MB = 512
MIN_MEMORY_MB = 16
MAX_MEMORY_MB = 1 << 20

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _shown(raw: str) -> str:
    """The value as typed, quoted and escaped, cut short if long.

    Escaped, a tab or newline cannot break the line.
    """
    text = repr(raw[:40] + ("..." if len(raw) > 40 else ""))
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _raw(name: str) -> str | None:
    """The variable's value, ``None`` when unset or blank (blank counts as unset)."""
    raw = os.environ.get(name)
    return raw if raw is not None and raw.strip() else None


def memory_mb() -> int:
    """``RESIDUAL_TRACE_MEMORY_MB`` in MiB (default 512).

    Any other value is a one-line :class:`UserError` naming the variable, its value and what
    it must be.
    """
    raw = _raw(MEMORY_MB)
    if raw is None:
        return DEFAULT_MEMORY_MB
    text = raw.strip()
    expected = f"a whole number of MiB from {MIN_MEMORY_MB} to {MAX_MEMORY_MB}"
    if not re.fullmatch(r"[0-9]{1,12}", text):  # ASCII digits only: no "1_024", "1e3", "٥١٢"
        raise UserError(f"{MEMORY_MB}={_shown(raw)}: expected {expected}, e.g. 512")
    value = int(text)
    if value < MIN_MEMORY_MB:
        raise UserError(f"{MEMORY_MB}={value}: expected at least {MIN_MEMORY_MB} (MiB)")
    if value > MAX_MEMORY_MB:
        raise UserError(
            f"{MEMORY_MB}={value}: expected at most {MAX_MEMORY_MB} (MiB, 1 TiB): "
            "it is the budget of one step's temporaries, not of the whole run"
        )
    return value


def debug() -> bool:
    """``RESIDUAL_TRACE_DEBUG``: whether an internal error shows its traceback."""
    raw = _raw(DEBUG)
    if raw is None:
        return False
    text = raw.strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise UserError(
        f"{DEBUG}={_shown(raw)}: expected 1 or 0 (also true/false, yes/no, on/off), or unset"
    )


def cache_location() -> str:
    """The cache directory: ``RESIDUAL_TRACE_CACHE``, else a default under the user's cache.

    Without the variable it is ``$XDG_CACHE_HOME/residual-trace``, else
    ``~/.cache/residual-trace``. It is checked by
    :func:`residual_trace.models.resolve.cache_dir`: a location that is, or lies under, a
    file is a one-line :class:`UserError`.
    """
    from residual_trace.models.resolve import cache_dir  # standard library only

    return str(cache_dir())


#: Every setting's reader; :func:`check_environment` calls each (add a new setting here).
_READERS = (memory_mb, debug, cache_location)


def check_environment() -> None:
    """Read every setting once: a bad value is a one-line :class:`UserError`.

    Called by every experiment before any work (see the module docstring). Cheap: it reads
    environment variables only.
    """
    for read in _READERS:
        read()
