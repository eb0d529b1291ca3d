"""Options: one place for each option's default, type, help text and validation.

Every experiment's options are a keyword-only dataclass (:class:`Options` subclasses).
Each field is declared with :func:`option`, which carries its help text and, where the
command line spells it differently, its flag. From that one declaration:

- the Python API (``residual_trace.layers(model, texts, batch_size=8)``) takes the fields as
  keyword arguments, typed for a type checker (the API functions are typed by the
  dataclass's constructor);
- the ``trace`` command line gets its options (:func:`click_options`): flag, type, choices,
  default and help all read from the field;
- values are type-checked (:func:`coerce`) and validated in ``__post_init__``, whichever way
  they came in (API, command line, or a report's TOML), with a one-line :class:`UserError`
  that names the option and says what it expects.

Examples:
    >>> from dataclasses import dataclass
    >>> from residual_trace.errors import UserError
    >>> @no_type_check
    ... @dataclass(kw_only=True)
    ... class Demo(Options):
    ...     depth: int = option(3, "How deep.")
    >>> Demo(depth=4).depth
    4
    >>> try:
    ...     Demo(depth="4")
    ... except UserError as error:
    ...     print(error)
    depth (--depth): expected an integer, got '4'
"""

from __future__ import annotations

import copy
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

from residual_trace.errors import OptionError

F = TypeVar("F", bound=Callable[..., Any])
O = TypeVar("O", bound="Options")  # noqa: E741
C = TypeVar("C")


def no_type_check(cls: C) -> C:
    """Leave an options class to :func:`coerce`.

    The test suite's jaxtyping import hook skips classes decorated with a ``no_type_check`` (it
    matches the name), so that a wrong value gets the same one-line :class:`UserError` under test as
    in use. Changes nothing else.
    """
    return cls


def option(
    default: Any,
    help: str,
    *,
    flag: str | None = None,
    short: str | None = None,
    metavar: str | None = None,
    negate: str | None = None,
    parse: Callable[[str], Any] | None = None,
    cli: bool = True,
) -> Any:
    """A dataclass field with the help text and command-line spelling of an option.

    Args:
        default: the default value (immutable: tuples, not lists).
        help: one or two sentences for ``--help`` and the API docs.
        flag: the command-line flag when it is not ``--field-name`` (e.g. ``--format``).
        short: a one-letter alias (``-q``).
        metavar: how the value is shown in ``--help``.
        negate: for a boolean that defaults to ``True``, the flag that turns it off
            (``--no-cache`` for ``use_cache``).
        parse: turns the command-line string into the value (e.g. ``"0,3,6"`` -> ``(0, 3, 6)``).
        cli: whether the option appears on the command line at all.
    """
    metadata = {
        "help": help,
        "flag": flag,
        "short": short,
        "metavar": metavar,
        "negate": negate,
        "parse": parse,
        "cli": cli,
    }
    return field(default=default, metadata=metadata)


def flag_of(config_type: type, name: str) -> str:
    """The command-line flag of field ``name`` (``batch_size`` -> ``--batch-size``)."""
    for f in fields(config_type):
        if f.name == name:
            if f.metadata.get("negate"):
                return str(f.metadata["negate"])
            return str(f.metadata.get("flag") or "--" + name.replace("_", "-"))
    return "--" + name.replace("_", "-")


def label_of(config_type: type, name: str) -> str:
    """How messages name option ``name``: ``batch_size (--batch-size)``.

    Just the name for an option the command line does not have.
    """
    for f in fields(config_type):
        if f.name == name and not f.metadata.get("cli", True):
            return name
    return f"{name} ({flag_of(config_type, name)})"


def _describe(annotation: Any) -> str:
    """What a value of this annotation looks like, for error messages."""
    origin, args = get_origin(annotation), get_args(annotation)
    if annotation is bool:
        return "true or false"
    if annotation is int:
        return "an integer"
    if annotation is float:
        return "a number"
    if annotation is str:
        return "a string"
    if annotation is Path:
        return "a path"
    if origin is Literal:
        return "one of " + ", ".join(map(str, args))
    if origin in (Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        text = " or ".join(_describe(a) for a in inner)
        return text + (" (or none)" if len(inner) < len(args) else "")
    if origin in (tuple, list, Sequence):
        if len(args) == 2 and args[1] is not Ellipsis and origin is tuple:
            return f"a list of two: {_describe(args[0])}, {_describe(args[1])}"
        return f"a list of {_plural(_describe(args[0]))}" if args else "a list"
    return getattr(annotation, "__name__", str(annotation))


def _plural(text: str) -> str:
    for single, many in (
        ("an integer", "integers"),
        ("a number", "numbers"),
        ("a string", "strings"),
        ("a path", "paths"),
    ):
        if text == single:
            return many
    return text


class _Mismatch(Exception):
    pass


def _coerce(value: Any, annotation: Any) -> Any:
    origin, args = get_origin(annotation), get_args(annotation)
    if annotation is Any:
        return value
    if annotation is type(None):
        if value is None:
            return None
        raise _Mismatch
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg)
            except _Mismatch:
                continue
        raise _Mismatch
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return int(value)
        raise _Mismatch
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _Mismatch
    if annotation is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    if annotation is Path:
        if isinstance(value, (str, Path)) and str(value) != "":
            return Path(value)
        raise _Mismatch
    if origin is Literal:
        if isinstance(value, str) and value in args:
            return value
        raise _Mismatch
    if origin in (tuple, list, Sequence):
        if origin is Sequence and isinstance(value, str) and args and args[0] is str:
            return (value,)  # Sequence[str]: one string stands for itself
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise _Mismatch
        if origin is tuple and len(args) == 2 and args[1] is not Ellipsis:
            if len(value) != 2:
                raise _Mismatch
            return (_coerce(value[0], args[0]), _coerce(value[1], args[1]))
        item = args[0] if args else Any
        items = tuple(_coerce(v, item) for v in value)
        return list(items) if origin is list else items  # Sequence: stored as a tuple
    raise TypeError(f"options: unsupported annotation {annotation!r}")  # a bug, not input


def coerce(name: str, value: Any, annotation: Any, label: str | None = None) -> Any:
    """``value`` checked against ``annotation``; a one-line :class:`UserError` otherwise.

    Ints become floats where a number is expected, lists tuples, strings paths.

    Examples:
        >>> coerce("samples", 3, int)
        3
        >>> coerce("norms", ["lancaster"], tuple[str, ...])
        ('lancaster',)
    """
    try:
        return _coerce(value, annotation)
    except _Mismatch:
        shown = label or name
        detail = f"expected {_describe(annotation)}, got {value!r}"
        raise OptionError(f"{shown}: {detail}", name, detail) from None


@no_type_check
@dataclass(kw_only=True)
class Options:
    """Base of every options dataclass.

    It provides type checks in ``__post_init__``, ``to_dict`` and ``from_dict`` (which tolerates
    unknown keys, so saved ``run.json`` files stay loadable). Subclasses validate values in
    ``validate()``.
    """

    def __post_init__(self) -> None:
        """Coerce every field to its annotation, then run :meth:`validate`."""
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            value = getattr(self, f.name)
            label = label_of(type(self), f.name)
            object.__setattr__(self, f.name, coerce(f.name, value, hints[f.name], label))
        self.validate()

    def validate(self) -> None:
        """Check values (ranges, combinations); raise :class:`UserError` naming the option."""

    def fail(self, name: str, message: str) -> OptionError:
        """A :class:`UserError` for option ``name``: ``name (--flag): message``."""
        return OptionError(f"{label_of(type(self), name)}: {message}", name, message)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready values (tuples as lists, paths as strings)."""

        def plain(value: Any) -> Any:
            if isinstance(value, (tuple, list)):
                return [plain(v) for v in value]
            if isinstance(value, Path):
                return str(value)
            return value

        return {k: plain(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls: type[O], data: dict[str, Any]) -> O:
        """Rebuild from :meth:`to_dict` output, ignoring keys this version does not know."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    @property
    def context(self) -> dict[str, Any]:
        """Facts a run attaches for its shards (see :meth:`with_context`); empty by default.

        Not options: never in ``to_dict`` or ``run.json``, and no keyword of the API.
        """
        return dict(vars(self).get("_context", {}))

    def with_context(self: O, **facts: Any) -> O:
        """A copy carrying ``facts`` in :attr:`context` (e.g. counts over all the texts)."""
        other = copy.copy(self)
        vars(other)["_context"] = {**self.context, **facts}
        return other

    def replaced(self: O, **changes: Any) -> O:
        """``dataclasses.replace(self, **changes)``, keeping :attr:`context`."""
        other = replace(self, **changes)
        if self.context:
            vars(other)["_context"] = self.context
        return other

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Every option's default value."""
        return {f.name: f.default for f in fields(cls) if f.default is not MISSING}


def click_options(
    config_type: type[Options], exclude: Sequence[str] = (), only_given: bool = False
) -> Callable[[F], F]:
    """Decorate a click command with one option per field of ``config_type``.

    The command receives each value under the field's name; values are passed on to
    ``config_type(**values)``, which validates them (so the command line and the API can
    never disagree on a default or a rule). With ``only_given``, an option not given on the
    command line arrives as ``None`` (or ``()``), so that it can be layered over a config
    file; the defaults stay those of ``config_type``.
    """
    import click

    hints = typing.get_type_hints(config_type)
    decorators = []
    for f in fields(config_type):
        meta = f.metadata
        if f.name in exclude or not meta.get("cli", True) or "help" not in meta:
            continue
        decorators.append(_click_option(click, f, hints[f.name], only_given))

    def apply(command: F) -> F:
        for decorator in reversed(decorators):
            command = decorator(command)
        return command

    return apply


def _click_option(click: Any, f: Any, annotation: Any, only_given: bool) -> Callable[[F], F]:
    meta = f.metadata
    default = None if only_given else f.default
    flag = meta.get("flag") or "--" + f.name.replace("_", "-")
    names = [flag, *([meta["short"]] if meta.get("short") else []), f.name]
    kwargs: dict[str, Any] = {"help": meta["help"], "show_default": True}
    if meta.get("metavar"):
        kwargs["metavar"] = meta["metavar"]
    if only_given:
        kwargs["help"] += f" [default: {_shown(f.default)}]"
        kwargs["show_default"] = False
    inner = [a for a in get_args(annotation) if a is not type(None)]
    base = inner[0] if get_origin(annotation) in (Union, types.UnionType) else annotation
    origin, args = get_origin(base), get_args(base)
    if meta.get("negate"):
        negate = meta["negate"]
        return click.option(
            negate,
            f.name,
            flag_value=False,
            default=None if only_given else True,
            help=meta["help"],
        )
    if meta.get("parse"):
        parse = meta["parse"]

        def convert(ctx: Any, param: Any, value: Any) -> Any:
            return default if value is None else parse(value)

        kwargs.update(default=None, callback=convert, show_default=False)
        return click.option(*names, type=str, **kwargs)
    if base is bool:
        flag_kwargs = {**kwargs, "show_default": False}
        if only_given:
            flag_kwargs["default"] = None
        return click.option(*names, is_flag=True, **flag_kwargs)
    if origin is tuple and len(args) == 2 and args[1] is not Ellipsis:
        return click.option(*names, nargs=2, default=default, **kwargs)
    if origin in (tuple, Sequence):
        item = args[0]
        choice = _click_type(click, item)
        return click.option(
            *names, multiple=True, type=choice, default=() if only_given else default, **kwargs
        )
    return click.option(*names, type=_click_type(click, base), default=default, **kwargs)


def _shown(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return ", ".join(map(str, value)) or "none"
    return str(value)


def _click_type(click: Any, annotation: Any) -> Any:
    if get_origin(annotation) is Literal:
        return click.Choice([str(a) for a in get_args(annotation)])
    if annotation is Path:
        return click.Path(path_type=Path)
    return {int: int, float: float, str: str}.get(annotation, str)
