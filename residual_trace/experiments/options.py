"""Every experiment's options: defaults, types, help text and checks, in one place.

The Python API (``residual_trace.layers(model, texts, batch_size=8)``), the ``trace``
command line (built from these fields by :func:`residual_trace.options.click_options`) and
the report's TOML all go through these classes. This module imports nothing heavy, so that
``trace --help`` stays fast.
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

from residual_trace.defaults import DEFAULT_BATCH_SIZE, DEFAULT_SEED
from residual_trace.errors import UserError
from residual_trace.naming import parse_head_name
from residual_trace.options import Options, no_type_check, option
from residual_trace.probes import CONDITIONS
from residual_trace.settings import check_environment

if TYPE_CHECKING:
    from residual_trace.experiments.decompose import DecomposeResult
    from residual_trace.experiments.layers import LayersResult
    from residual_trace.experiments.perturb import PerturbResult
    from residual_trace.experiments.probe import ProbeResult
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
    """``value`` as :data:`Texts` promises it: a list of ``str``, a ``Path`` (any
    ``os.PathLike``), or ``None``. One ``str`` is one text, unless it looks like a file name
    (:func:`looks_like_a_file`): that is refused, not silently measured as a sentence.
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
        check_environment()  # every verb, before any work: see residual_trace.settings
        if self.batch_size < 1:
            raise self.fail("batch_size", f"must be at least 1, got {self.batch_size}")
        if not 0 <= self.seed < 2**63:
            raise self.fail("seed", f"must be between 0 and 2**63 - 1, got {self.seed}")

    @property
    def progress(self) -> bool:
        """Show progress bars: not when quiet, and only when stderr is a terminal."""
        return not self.quiet and sys.stderr.isatty()

    def seed_torch(self) -> None:
        import torch

        torch.manual_seed(self.seed)


#: The ``engine`` choices (see :mod:`residual_trace.experiments.engine`).
Engine = Literal["local", "ray"]


@no_type_check
@dataclass(kw_only=True)
class CorpusOptions(CommonOptions):
    """Options of the experiments that read a corpus of texts: how long, where the work runs."""

    max_length: int | None = option(
        None,
        "Longest input in tokens incl. special tokens; longer texts are truncated with a "
        "warning. Default: the model's limit, at most 512.",
    )
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
        super().validate()
        if self.max_length is not None and self.max_length < 2:
            raise self.fail("max_length", f"must be at least 2, got {self.max_length}")
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

    def check_texts(self, texts: list[str]) -> None:
        """Options that refer to the texts, checked before any model loads (a text id that
        names no text): none here; each experiment adds its own."""


def check_text_id(name: str, value: int, texts: Sequence[str]) -> None:
    """A text id option (``--heatmap-text`` and the like) must name one of the texts."""
    if value >= len(texts):
        flag = "--" + name.replace("_", "-")
        raise UserError(f"{name} ({flag}) {value}: only {len(texts)} text(s) given")


@no_type_check
@dataclass(kw_only=True)
class LayersOptions(CorpusOptions):
    """Options of ``layers`` (and ``trace layers``)."""

    save_attention: bool = option(
        False,
        "Also keep every attention pattern (in memory, float16) and write one compressed "
        ".npz per text.",
    )
    heatmap_text: int = option(0, "text_id drawn in the drift_heatmap figure.")
    include_special: bool = option(
        False,
        "Keep [CLS]/[SEP]/BOS/EOS in the summaries and figures (always in the per-token tables).",
    )
    normed: bool = option(
        True, "Also measure after the model's own norm (the *_normed columns).", cli=False
    )

    def validate(self) -> None:
        super().validate()
        if self.heatmap_text < 0:
            raise self.fail("heatmap_text", f"must be a text id >= 0, got {self.heatmap_text}")

    def check_texts(self, texts: list[str]) -> None:
        """Options that refer to the texts (before any model loads)."""
        check_text_id("heatmap_text", self.heatmap_text, texts)

    def run(
        self, model: ModelArg, texts: Texts = None, warn: Warn = python_warning
    ) -> LayersResult:
        """Run on ``model`` and ``texts``; see :func:`residual_trace.layers`."""
        from residual_trace.experiments.layers import run_layers

        return run_layers(model, texts_argument(texts), self, warn)


@no_type_check
@dataclass(kw_only=True)
class DecomposeOptions(CorpusOptions):
    """Options of ``decompose`` (and ``trace decompose``)."""

    mixing_text: int = option(
        0, "text_id whose per-pair mixing map is kept (mixing_pairs, mixing_heatmap)."
    )
    per_head: bool = option(
        False, "Also split the attention part by head (heads, head_summary, heads figure)."
    )
    mixing_block: int | None = option(
        None, "Block drawn in mixing_heatmap (from 0; default: the middle block)."
    )
    include_special: bool = option(
        False,
        "Keep [CLS]/[SEP]/BOS/EOS in the summaries and figures (always in the per-token tables).",
    )
    vz_max_tokens: int = option(
        256,  # tracer.mixing.VZ_MAX_TOKENS (a test keeps them equal)
        "Value Zeroing re-runs each block's MLP once per (token, source) pair: texts longer "
        "than this get NaN in mix_vz, mix_vz_rollout and vz, with a warning (0: never).",
        metavar="N",
    )

    def validate(self) -> None:
        super().validate()
        if self.mixing_text < 0:
            raise self.fail("mixing_text", f"must be a text id >= 0, got {self.mixing_text}")
        if self.mixing_block is not None and self.mixing_block < 0:
            raise self.fail("mixing_block", f"blocks count from 0, got {self.mixing_block}")
        if self.vz_max_tokens < 0:
            raise self.fail("vz_max_tokens", f"must be 0 or more, got {self.vz_max_tokens}")

    def check_texts(self, texts: list[str]) -> None:
        check_text_id("mixing_text", self.mixing_text, texts)

    def run(
        self, model: ModelArg, texts: Texts = None, warn: Warn = python_warning
    ) -> DecomposeResult:
        """Run on ``model`` and ``texts``; see :func:`residual_trace.decompose`."""
        from residual_trace.experiments.decompose import run_decompose

        return run_decompose(model, texts_argument(texts), self, warn)


#: Most perturbations per text (each is a forward pass) and most cross-validation repeats:
#: beyond, a typo (an extra digit or two) would run for days.
MAX_SAMPLES = 100_000
MAX_SEEDS = 1_000

#: The ``mode`` choices.
MODES = ("swap", "shuffle", "embed-shuffle", "random-token")
Mode = Literal["swap", "shuffle", "embed-shuffle", "random-token"]


@no_type_check
@dataclass(kw_only=True)
class PerturbOptions(CorpusOptions):
    """Options of ``perturb`` (and ``trace perturb``).

    ``samples`` is the number of perturbations per text (pair swaps, shuffles, random-token
    draws) or, for ``embed-shuffle``, the number of embedding permutations.
    """

    mode: Mode = option(
        "swap",
        "swap: exchange two tokens (swap=) or sampled pairs; shuffle: permute the non-special "
        "tokens; embed-shuffle: permute the embedding rows (tokens meaningless, positions "
        "intact); random-token: replace tokens by random ones (control).",
    )
    swap: tuple[str, str] | None = option(
        None,
        "Exchange these two words (their subword spans, lengths may differ).",
        metavar="WORD1 WORD2",
    )
    samples: int | None = option(
        None,
        "Perturbations per text (pair swaps, shuffles, random-token draws), or the number of "
        "embedding shuffles (default 10; not with swap words or all_pairs).",
    )
    all_pairs: bool = option(False, "mode swap: every pair of non-special tokens.")
    show_text: int = option(0, "text_id drawn in the side-by-side attention figure.")
    show_heads: tuple[str, ...] = option(
        (),
        "Head drawn in the attention figure, named L<block>H<head> (TransformerLens naming, "
        "from 0), e.g. L0H2; repeatable. Default: the most token- and most "
        "position-following head.",
        flag="--show-head",
        metavar="LxHy",
    )

    def validate(self) -> None:
        super().validate()
        if self.swap is not None:
            if self.mode != "swap":
                raise self.fail("swap", f"goes with mode swap, not mode {self.mode}")
            if self.swap[0] == self.swap[1]:
                raise self.fail("swap", "needs two different words")
        if self.all_pairs and (self.mode != "swap" or self.swap is not None):
            raise self.fail("all_pairs", "goes with mode swap and no swap words")
        if self.samples is not None:
            if not 1 <= self.samples <= MAX_SAMPLES:
                raise self.fail(
                    "samples", f"must be between 1 and {MAX_SAMPLES:,}, got {self.samples}"
                )
            if self.swap is not None or self.all_pairs:
                what = "swap words (one swap per text)" if self.swap else "all_pairs"
                raise self.fail("samples", f"is not used with {what}: leave it out")
        if self.show_text < 0:
            raise self.fail("show_text", f"must be a text id >= 0, got {self.show_text}")
        for spec in self.show_heads:
            try:
                parse_head_name(spec)
            except UserError as error:
                raise self.fail("show_heads", str(error)) from None

    @property
    def n_samples(self) -> int:
        """``samples``, or its default of 10."""
        return 10 if self.samples is None else self.samples

    def check_texts(self, texts: list[str]) -> None:
        check_text_id("show_text", self.show_text, texts)

    def run(
        self, model: ModelArg, texts: Texts = None, warn: Warn = python_warning
    ) -> PerturbResult:
        """Run on ``model`` and ``texts``; see :func:`residual_trace.perturb`."""
        from residual_trace.experiments.perturb import run_perturb

        return run_perturb(model, texts_argument(texts), self, warn)


Mapper = Literal["plsr", "ffnn", "ridge"]
Condition = Literal[
    "system",
    "upper",
    "shuffled",
    "shuffled-upper",
    "random",
    "taxonomic",
    "nonsense",
    "random-init",
]


def parse_layers(spec: str) -> tuple[int, ...]:
    """``"0,3,6"`` -> ``(0, 3, 6)`` (a clear error otherwise)."""
    try:
        layers = tuple(int(part) for part in spec.split(",") if part.strip())
    except ValueError:
        raise UserError(
            f"layers (--layers) {spec}: expected comma-separated layer numbers, e.g. 0,3,6"
        ) from None
    if not layers:
        raise UserError("layers (--layers): no layer given")
    return layers


@no_type_check
@dataclass(kw_only=True)
class ProbeOptions(CommonOptions):
    """Options of ``probe`` (and ``trace probe``).

    ``corpus`` is the text of ``embedding="contextual"`` (a list of texts or a file; on the
    command line ``--text``/``--file``), unused otherwise.
    """

    norms: Sequence[str] = option(
        ("lancaster",),
        "lancaster, concreteness, lancaster+concreteness (bundled), or LAYOUT:PATH with LAYOUT "
        "mcrae, buchanan, binder, wide or long; repeatable.",
    )
    layers: tuple[int, ...] | None = option(
        None,
        "Residual layers to probe, comma-separated on the command line (default: 0, the "
        "middle and the last).",
        parse=parse_layers,
    )
    mappers: tuple[Mapper, ...] = option(("plsr", "ffnn"), "Mappers; repeatable.", flag="--mapper")
    embedding: Literal["static", "isolated", "contextual"] = option(
        "isolated",
        "static: mean of the word's W_E rows (layer 0 only); isolated: the word alone through "
        "the model; contextual: mean over its occurrences in the corpus (--file/--text).",
    )
    folds: int = option(10, "Cross-validation folds.")
    seeds: int = option(1, "Cross-validation repeats (seeds seed, seed+1, ...).")
    max_concepts: int = option(
        500, "Probe at most this many concepts per norm set (a seeded sample)."
    )
    conditions: tuple[Condition, ...] = option(
        CONDITIONS, "Conditions to run; repeatable (default: all that apply).", flag="--condition"
    )
    per_feature: bool = option(False, "Also Spearman rho per feature, across concepts.")
    use_cache: bool = option(
        True, "Recompute embeddings instead of reading the cache.", negate="--no-cache"
    )
    corpus: Sequence[str] | Path | None = option(
        None,
        "The corpus of embedding=contextual: what texts= takes elsewhere (a list of texts, "
        "one text, a Path to a file with one text per line); stored as a tuple or a Path.",
        cli=False,
    )

    def __post_init__(self) -> None:
        # the corpus is checked like every experiment's texts (before the type checks of
        # the other options, which would name a set or a generator only by its repr)
        corpus = texts_argument(self.corpus, "corpus")
        self.corpus = tuple(corpus) if isinstance(corpus, list) else corpus
        super().__post_init__()

    def validate(self) -> None:
        super().validate()
        if not self.norms:
            raise self.fail("norms", "give at least one norm set")
        if not self.mappers:
            raise self.fail("mappers", "give at least one mapper")
        if "system" not in self.conditions:
            raise self.fail("conditions", "the system condition cannot be left out")
        if self.folds < 2:
            raise self.fail("folds", f"must be at least 2, got {self.folds}")
        if not 1 <= self.seeds <= MAX_SEEDS:
            raise self.fail("seeds", f"must be between 1 and {MAX_SEEDS}, got {self.seeds}")
        if self.max_concepts < 20:
            raise self.fail("max_concepts", f"must be at least 20, got {self.max_concepts}")
        if self.layers is not None and any(layer < 0 for layer in self.layers):
            raise self.fail("layers", "layers count from 0 (the embeddings)")
        if self.folds > self.max_concepts:
            raise self.fail(
                "folds",
                f"{self.folds} folds need as many concepts; max_concepts is {self.max_concepts}",
            )
        if self.embedding == "static" and self.layers not in (None, (0,)):
            raise self.fail("layers", "embedding static has layer 0 only (the W_E rows)")
        if self.corpus is not None and self.embedding != "contextual":
            raise UserError(
                f"a corpus (--text/--file) goes with --embedding contextual, not "
                f"{self.embedding}: leave it out"
            )

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        if isinstance(self.corpus, tuple):
            data["corpus"] = f"{len(self.corpus)} texts"
        return data

    def run(self, model: ModelArg, warn: Warn = python_warning) -> ProbeResult:
        """Run on ``model``; see :func:`residual_trace.probe`."""
        from residual_trace.experiments.probe import run_probe

        return run_probe(model, self, warn)
