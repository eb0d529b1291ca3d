"""The options every experiment shares, and how an experiment takes its texts.

Each experiment's options class (``LayersOptions`` in :mod:`residual_trace.experiments.layers`,
...) extends :class:`CommonOptions` or :class:`CorpusOptions`; the Python API
(``residual_trace.layers(model, texts, batch_size=8)``), the ``trace`` command line (built
from the fields by :func:`residual_trace.options.click_options`) and the report's TOML all
go through those classes. This module imports nothing heavy, so that ``trace --help`` stays
fast.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

from residual_trace.defaults import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_DEVICE,
    DEFAULT_DTYPE,
    DEFAULT_FIGURE_FORMAT,
    DEFAULT_MODEL,
    DEFAULT_SEED,
    Device,
    DeviceMap,
    Dtype,
    FigureFormat,
)
from residual_trace.errors import UserError
from residual_trace.options import Options, no_type_check, option
from residual_trace.settings import check_environment

if TYPE_CHECKING:
    from residual_trace.models import TracedModel

#: What an experiment takes as its texts: a list of texts, one text, a file with one text
#: per non-blank line, or ``None`` for the bundled sentences. :func:`texts_argument` holds a
#: value to exactly that at run time.
Texts: TypeAlias = "Sequence[str] | str | Path | None"

#: What an experiment takes as its model: a loaded one, a name for ``load_model``, or a
#: function that loads one (called only once the inputs have been checked).
ModelArg: TypeAlias = "TracedModel | str | Callable[[], TracedModel]"

#: Receives one-line warnings and notes (the command line prints them to stderr).
Warn: TypeAlias = Callable[[str], None]


#: A lone string ending so names a file rather than a text.
FILE_SUFFIXES = (".txt", ".text", ".tsv", ".csv", ".json", ".jsonl", ".md", ".parquet")


def _type_name(value: object) -> str:
    """``list``, ``numpy.ndarray``: how messages name the type of ``value``."""
    kind = type(value)
    module = kind.__module__.split(".")[0]
    return kind.__qualname__ if module == "builtins" else f"{module}.{kind.__qualname__}"


def _shown(value: object, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 4] + "...'"


def looks_like_a_file(text: str) -> str | None:
    """Why a lone string reads as a file name rather than a text (``None``: it is a text).

    A string that ends in a file suffix (``.txt``, ``.tsv``, ``.csv``, ...), holds a path
    separator and no space, or names an existing file or directory.

    Examples:
        >>> looks_like_a_file("The dog chased the cat.") is None
        True
        >>> looks_like_a_file("data/sentences"), looks_like_a_file("my corpus.TXT")
        ('it holds a path separator and no space', 'it ends in .txt')
    """
    stripped = text.strip()
    if not stripped:
        return None
    suffix = next((s for s in FILE_SUFFIXES if stripped.lower().endswith(s)), None)
    if suffix is not None:
        return f"it ends in {suffix}"
    separators = {"/", "\\", os.sep} | ({os.altsep} if os.altsep else set())
    if not any(c.isspace() for c in stripped) and any(c in stripped for c in separators):
        return "it holds a path separator and no space"
    try:
        exists = os.path.lexists(stripped)
    except (OSError, ValueError):  # a NUL byte, a name too long: not a file
        exists = False
    if exists:
        return "a file or directory of that name exists"
    return None


def _refuse_type(value: object, name: str) -> UserError:
    kind = _type_name(value)
    expected = (
        "pass a list of strings (one text each), one string, a Path to a UTF-8 file with one "
        "text per line, or None for the bundled sentences"
    )
    if isinstance(value, (bytes, bytearray, memoryview)):
        return UserError(
            f"{name}: got {kind}, expected str: decode it first (value.decode('utf-8')), or "
            "pass Path(...) to read a file"
        )
    if isinstance(value, AbstractSet):
        return UserError(
            f"{name}: got a {kind}, whose order is arbitrary (it can change from one run to "
            "the next, and text ids with it): pass a list, e.g. sorted(...)"
        )
    if isinstance(value, Mapping):
        return UserError(
            f"{name}: got a {kind}: pass a list of strings, e.g. list(d.values()) for its values"
        )
    if isinstance(value, Iterator):
        return UserError(
            f"{name}: got a {kind}, which can be read only once: pass a list, e.g. list(...)"
        )
    if hasattr(value, "tolist") and hasattr(value, "__len__"):  # numpy, pandas
        return UserError(f"{name}: got a {kind}: pass a list of strings, e.g. value.tolist()")
    return UserError(f"{name}: got {kind} {_shown(value)}: {expected}")


def texts_argument(value: object, name: str = "texts") -> list[str] | Path | None:
    """``value`` as :data:`Texts` promises it: a list of ``str``, a ``Path``, or ``None``.

    A ``Path`` is any ``os.PathLike``. One ``str`` is one text, unless it looks like a file
    name (:func:`looks_like_a_file`): that is refused, not silently measured as a sentence.
    Anything else is a one-line :class:`UserError` naming the type received (for a list,
    the index and type of the first item that is not a ``str``) and what to pass.

    Examples:
        >>> texts_argument("The dog ran."), texts_argument(("A.", "B."))
        (['The dog ran.'], ['A.', 'B.'])
        >>> try:
        ...     texts_argument(["A.", None])
        ... except UserError as error:
        ...     print(error)
        texts[1]: got NoneType None, expected str: every text must be a string
    """
    if value is None:
        return None
    if isinstance(value, Path):
        return value
    if isinstance(value, os.PathLike):
        path = os.fspath(value)
        if isinstance(path, str):
            return Path(path)
        raise UserError(f"{name}: got a {_type_name(value)} naming a bytes path: pass Path(str)")
    if isinstance(value, str):
        why = looks_like_a_file(value)
        if why is not None:
            shown = _shown(value)
            raise UserError(
                f"{name}: the string {shown} looks like a file name ({why}): pass "
                f"Path({shown}) to read a file, or a list of one string ([{shown}]) to "
                "measure it as a text"
            )
        return [str(value)]
    if not isinstance(value, Sequence) or isinstance(value, (bytes, bytearray, memoryview)):
        raise _refuse_type(value, name)
    texts: list[str] = []
    for index, item in enumerate(value):
        if not isinstance(item, str):
            hint = (
                "decode it first (item.decode('utf-8'))"
                if isinstance(item, (bytes, bytearray))
                else "every text must be a string"
            )
            raise UserError(
                f"{name}[{index}]: got {_type_name(item)} {_shown(item)}, expected str: {hint}"
            )
        texts.append(str(item))
    return texts


def python_warning(message: str) -> None:
    """The API's default ``warn``: a Python :class:`UserWarning` (shown once in notebooks)."""
    warnings.warn(message, UserWarning, stacklevel=4)


def device_option() -> Any:
    """The ``device`` option (every verb, and the report)."""
    return option(DEFAULT_DEVICE, "Where the model runs (auto: CUDA when available, else the CPU).")


def dtype_option() -> Any:
    """The ``dtype`` option (every verb, and the report)."""
    return option(
        DEFAULT_DTYPE, "Weights and forward pass in this precision; the measures stay float32."
    )


def device_map_option(cli: bool = True) -> Any:
    """The ``device_map`` option (every verb, and the report)."""
    return option(None, "Split the model over the visible devices (accelerate).", cli=cli)


def include_special_option() -> Any:
    """The ``include_special`` option (the verbs whose summaries are over tokens)."""
    return option(
        False,
        "Keep [CLS]/[SEP]/BOS/EOS in the summaries and figures (always in the per-token tables).",
    )


def figure_format_option(cli: bool = True) -> Any:
    """The ``figure_format`` option (every verb's ``--format``, and the report's parts)."""
    return option(DEFAULT_FIGURE_FORMAT, "Figure file format.", flag="--format", cli=cli)


@no_type_check
@dataclass(kw_only=True)
class ModelOptions(Options):
    """Which model a command runs, where and in which precision.

    These are the command line's ``--model``, ``--device``, ``--dtype`` and ``--device-map``;
    the API takes a model or its name as its first argument and these as
    :func:`~residual_trace.load_model`'s.
    """

    model: str = option(
        DEFAULT_MODEL,
        "Packaged alias (minilm, smollm2), Hugging Face name, or local checkpoint dir.",
        short="-m",
    )
    device: Device = device_option()
    dtype: Dtype = dtype_option()
    device_map: DeviceMap | None = device_map_option()


@no_type_check
@dataclass(kw_only=True)
class OutputOptions(Options):
    """Where a command writes.

    These are the command line's ``--out``, ``--overwrite`` and ``--format``, and the API's
    ``result.save(out, figure_format=..., overwrite=...)``.
    """

    out: str | None = option(
        None,
        "Output directory (default: runs/<model>-<UTC timestamp>); it must be new or empty "
        "(see --overwrite).",
        short="-o",
    )
    overwrite: bool = option(
        False,
        "Replace --out if it holds an earlier output of this command (wholly: no file of the "
        "earlier run survives). Without it, a non-empty --out is refused.",
    )
    figure_format: FigureFormat = figure_format_option()
    wide: bool = option(
        False, "Print the summary at full width (default: tables split to fit 100 columns)."
    )

    def validate(self) -> None:
        """Refuse an empty ``--out``."""
        if self.out is not None and not self.out.strip():
            raise UserError("--out: give a directory name, not an empty string")

    @property
    def out_path(self) -> Path | None:
        """``out`` as a path (``None`` when not given)."""
        return None if self.out is None else Path(self.out)


@no_type_check
@dataclass(kw_only=True)
class CommonOptions(Options):
    """Options every experiment takes (each experiment's options extend these)."""

    batch_size: int = option(
        DEFAULT_BATCH_SIZE, "Texts per forward pass (results do not depend on it)."
    )
    seed: int = option(
        DEFAULT_SEED, "Seed of every random choice (bootstrap intervals, samples, controls)."
    )
    quiet: bool = option(
        False, "No progress bar (and, on the command line, no summary).", short="-q"
    )

    def validate(self) -> None:
        """Check the environment settings, the batch size and the seed."""
        check_environment()  # every verb, before any work: see residual_trace.settings
        if self.batch_size < 1:
            raise self.fail("batch_size", f"must be at least 1, got {self.batch_size}")
        if not 0 <= self.seed < 2**63:
            raise self.fail("seed", f"must be between 0 and 2**63 - 1, got {self.seed}")

    @property
    def progress(self) -> bool:
        """Show progress bars: not when quiet, and only when stderr is a terminal."""
        return not self.quiet and sys.stderr.isatty()

    def check_texts(self, texts: list[str]) -> None:
        """Options that refer to the texts, checked before any model loads: none here.

        Each experiment adds its own (for example, a text id that names no text).
        """

    def seed_torch(self) -> None:
        """Seed torch's generator with ``seed`` (the random choices of a run)."""
        import torch

        torch.manual_seed(self.seed)


#: The ``engine`` choices (see :mod:`residual_trace.experiments.engine`).
Engine = Literal["local", "ray"]


@no_type_check
@dataclass(kw_only=True)
class EngineOptions(CommonOptions):
    """Options of the experiments whose work shards over Ray: where the work runs."""

    engine: Engine = option(
        "local",
        "local: this process; ray: shard the texts over Ray workers (one model each, a GPU "
        "each where there are GPUs), same tables and summaries (pip install "
        "'residual-trace[ray]').",
    )
    ray_address: str | None = option(
        None,
        "engine ray: the cluster to join (auto: the one `ray start --head` started here; "
        "default: a local Ray instance for this run).",
        metavar="ADDR",
    )
    workers: int | None = option(
        None, "engine ray: number of workers (default: one per GPU, else one per CPU)."
    )

    def validate(self) -> None:
        """Check that the Ray options go with ``engine="ray"``.

        An address with no Ray cluster behind it fails here, before any model loads.
        """
        super().validate()
        if self.engine != "ray":
            for name in ("ray_address", "workers"):
                if getattr(self, name) is not None:
                    raise self.fail(name, f"goes with engine ray, not engine {self.engine}")
        if self.workers is not None and self.workers < 1:
            raise self.fail("workers", f"must be at least 1, got {self.workers}")
        if self.ray_address is not None and not self.ray_address.strip():
            raise self.fail("ray_address", "is empty")
        if self.ray_address is not None and self.ray_address.strip() != "auto":
            # before any model loads: an address with no Ray cluster behind it fails in
            # seconds (``auto`` is resolved by Ray itself, when the engine starts)
            from residual_trace.experiments import ray_guard

            try:
                ray_guard.check(self.ray_address.strip())
            except ray_guard.AddressError as error:
                raise self.fail(
                    "ray_address", f"{self.ray_address.strip()!r}: no Ray cluster there: {error}"
                ) from None


@no_type_check
@dataclass(kw_only=True)
class CorpusOptions(EngineOptions):
    """Options of the experiments that read a corpus of texts: how long, where the work runs."""

    max_length: int | None = option(
        None,
        "Longest input in tokens incl. special tokens; longer texts are truncated with a "
        "warning. Default: the model's limit, at most 512.",
    )

    def validate(self) -> None:
        """Check the length limit, and the engine's options."""
        super().validate()
        if self.max_length is not None and self.max_length < 2:
            raise self.fail("max_length", f"must be at least 2, got {self.max_length}")


def check_text_id(name: str, value: int, texts: Sequence[str]) -> None:
    """A text id option (``--heatmap-text`` and the like) must name one of the texts."""
    if value >= len(texts):
        flag = "--" + name.replace("_", "-")
        raise UserError(f"{name} ({flag}) {value}: only {len(texts)} text(s) given")
