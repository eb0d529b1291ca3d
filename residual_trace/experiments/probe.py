"""``probe``: probes from type-level embeddings to feature norms.

Every control is computed beside the score. The measures are :mod:`residual_trace.probes`'s;
this module is glue, and imports nothing heavy until a run starts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from residual_trace.errors import UserError
from residual_trace.experiments.common import load_inputs, resolve_model
from residual_trace.experiments.contract import Experiment, on_model
from residual_trace.experiments.options import (
    CommonOptions,
    ModelArg,
    Warn,
    python_warning,
    texts_argument,
)
from residual_trace.experiments.result import Result
from residual_trace.options import no_type_check, option
from residual_trace.probes import CONDITIONS, Condition, Embedding, Mapper

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure
    from tqdm.auto import tqdm

    from residual_trace.models import TracedModel
    from residual_trace.probes.embeddings import WordVectors
    from residual_trace.probes.norms import Norms

__all__ = [
    "EXPERIMENT",
    "MAX_SEEDS",
    "Mapper",
    "ProbeOptions",
    "ProbeResult",
    "parse_layers",
    "run_probe",
]

#: Identifying columns added to every score row.
KEYS = ("model", "norms", "embedding", "layer")


#: Most cross-validation repeats: beyond, a typo (an extra digit or two) would run for days.
MAX_SEEDS = 1_000


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
    embedding: Embedding = option(
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
        """Check the norms, mappers, conditions, folds, repeats, sample size and layers."""
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
        """The options as ``run.json`` records them (a corpus given as texts: its size)."""
        data = super().to_dict()
        if isinstance(self.corpus, tuple):
            data["corpus"] = f"{len(self.corpus)} texts"
        return data

    def run(self, model: ModelArg, warn: Warn = python_warning) -> ProbeResult:
        """Run on ``model``; see :func:`residual_trace.probe`."""
        return run_probe(model, self, warn)


@dataclass(repr=False)
class ProbeResult(Result):
    """Tables scores, summary, verdicts, concepts; figures conditions (and layers)."""

    command = "probe"
    n_concepts: dict[str, int] = field(default_factory=dict)
    layers: list[int] = field(default_factory=list)

    def figures(self) -> dict[str, Figure]:
        """The figures: conditions (and layers, with more than one layer)."""
        from residual_trace.figures.probe import conditions_figure, layers_figure

        figures = {"conditions": conditions_figure(self.tables["summary"])}
        if len(self.layers) > 1:
            figures["layers"] = layers_figure(self.tables["summary"])
        return figures

    def headline(self) -> str:
        """How many probes beat their controls, on one line."""
        verdict = self.tables["verdicts"]
        beats = int(verdict["beats_controls"].sum())
        return f"system beats its controls in {beats} of {len(verdict)} probe(s)"

    def describe(self) -> str:
        """The paper-style table and a verdict per line, as ``trace probe`` prints them."""
        return describe(self)


def _layers(config: ProbeOptions, model: TracedModel) -> list[int]:
    if config.embedding == "static":
        return [0]
    layers = list(config.layers or (0, model.n_blocks // 2, model.n_blocks))
    too_deep = [layer for layer in layers if layer > model.n_blocks]
    if too_deep:
        raise UserError(f"--layers {too_deep[0]}: {model.name} has layers 0..{model.n_blocks}")
    return sorted(set(layers))


def _sample(norms: Norms, available: set[str], config: ProbeOptions, notes: list[str]) -> list[str]:
    """The norms' concepts that can be embedded, at most ``max_concepts`` of them (seeded)."""
    import numpy as np

    usable = [c for c in norms.concepts if c in available]
    missing = len(norms.concepts) - len(usable)
    if missing:
        notes.append(f"{norms.name}: {missing} concept(s) could not be embedded (see concepts.csv)")
    if len(usable) > config.max_concepts:
        rng = np.random.default_rng(config.seed)
        usable = sorted(rng.choice(usable, size=config.max_concepts, replace=False).tolist())
        notes.append(
            f"{norms.name}: a seeded sample of {config.max_concepts} of its "
            f"{len(norms.concepts) - missing} usable concepts (--max-concepts)"
        )
    if len(usable) < max(20, config.folds):
        raise UserError(
            f"--norms {norms.name}: only {len(usable)} concept(s) could be embedded; "
            f"need at least {max(20, config.folds)}"
            + (f" for --folds {config.folds}" if config.folds > 20 else "")
        )
    return usable


def _embed(
    model: TracedModel,
    all_norms: list[Norms],
    config: ProbeOptions,
    corpus: list[str],
    notes: list[str],
) -> tuple[WordVectors, dict[str, list[str]], dict[str, str]]:
    """Embed only what is probed: sample first.

    A contextual corpus pass embeds every word at once, so there the sample is drawn from the
    words that occur.
    """
    from residual_trace.probes.embeddings import embed_words, representable

    pool = sorted({c for norms in all_norms for c in norms.concepts})
    if config.embedding == "contextual":
        vectors = embed_words(model, pool, "contextual", corpus, use_cache=config.use_cache)
        available, dropped = set(vectors.words), dict(vectors.dropped)
    else:
        kept, dropped = representable(model, pool)
        available = set(kept)
    samples = {norms.name: _sample(norms, available, config, notes) for norms in all_norms}
    if config.embedding != "contextual":
        chosen = sorted({c for sample in samples.values() for c in sample})
        vectors = embed_words(model, chosen, config.embedding, use_cache=config.use_cache)
    return vectors, samples, dropped


def _advance(bar: tqdm[Any]) -> Callable[[int], None]:
    def advance(fits: int) -> None:
        bar.update(fits)

    return advance


def _norms_and_corpus(config: ProbeOptions, note: Warn) -> tuple[list[Norms], list[str], str]:
    """The norm sets and the corpus of ``embedding="contextual"``.

    The norm sets are read first: a bad file fails before the model loads, and what reading
    dropped by design is noted.
    """
    from residual_trace.probes.norms import load_norms

    all_norms = [load_norms(spec) for spec in config.norms]
    corpus: list[str] = []
    source = "none (not needed)"
    if config.embedding == "contextual":
        given = config.corpus
        corpus, source = load_inputs(list(given) if isinstance(given, tuple) else given)
    for norms in all_norms:  # what reading each file dropped by design, counted
        for message in norms.notes:
            note(f"{norms.name}: {message}")
    return all_norms, corpus, source


def _concept_rows(norms: Norms, used: set[str], dropped: dict[str, str]) -> pd.DataFrame:
    """``concepts.csv``'s rows of one norm set: used or not, and why not."""
    import pandas as pd

    return pd.DataFrame(
        {
            "norms": norms.name,
            "concept": list(norms.concepts),
            "used": [c in used for c in norms.concepts],
            "reason": ["" if c in used else dropped.get(c, "not sampled") for c in norms.concepts],
        }
    )


@dataclass
class _Embedded:
    """What the probes of one model read.

    Every concept's vectors (and the random-init model's), the concepts sampled per norm set,
    and why the others were dropped.
    """

    vectors: WordVectors
    random_vectors: WordVectors | None
    samples: dict[str, list[str]]
    dropped: dict[str, str]


def _embed_all(
    traced: TracedModel, all_norms: list[Norms], config: ProbeOptions, corpus: list[str], note: Warn
) -> _Embedded:
    from residual_trace.models import random_init_copy
    from residual_trace.probes.embeddings import embed_words

    sampling: list[str] = []
    vectors, samples, dropped = _embed(traced, all_norms, config, corpus, sampling)
    for message in sampling:
        note(message)
    random_vectors: WordVectors | None = None
    if "random-init" in config.conditions:
        random_model = random_init_copy(traced, config.seed)
        random_vectors = embed_words(
            random_model, vectors.words, config.embedding, corpus, use_cache=config.use_cache
        )
    return _Embedded(vectors, random_vectors, samples, dropped)


def _probe_norms(
    traced: TracedModel,
    norms: Norms,
    embedded: _Embedded,
    layers: list[int],
    config: ProbeOptions,
    note: Warn,
) -> tuple[list[pd.DataFrame], pd.DataFrame, int]:
    """One norm set's score rows at every layer, and its ``concepts.csv`` rows.

    Also returns the number of concepts probed.
    """
    from residual_trace.probes.evaluate import applicable_metrics, evaluate
    from residual_trace.progress import progress_bar

    subset = norms.subset(embedded.samples[norms.name])
    index = {w: i for i, w in enumerate(embedded.vectors.words)}
    rows = [index[c] for c in subset.concepts]
    metrics, metric_notes = applicable_metrics(subset, config.per_feature)
    for message in metric_notes:
        note(f"{norms.name}: {message}")
    concepts = _concept_rows(norms, set(subset.concepts), embedded.dropped)
    total = len(layers) * len(config.conditions) * config.folds * config.seeds
    frames = []
    with progress_bar(
        total=total * len(config.mappers),
        desc=f"probing {traced.name} -> {norms.name}",
        unit="fit",
        enabled=config.progress,
    ) as bar:
        for layer in layers:
            random = embedded.random_vectors
            scores = evaluate(
                embedded.vectors.at(layer)[rows],
                subset,
                mappers=config.mappers,
                conditions=config.conditions,
                folds=config.folds,
                seeds=range(config.seed, config.seed + config.seeds),
                metrics=metrics,
                random_init=None if random is None else random.at(layer)[rows],
                progress=_advance(bar),
            )
            scores.insert(0, "layer", layer)
            scores.insert(0, "embedding", config.embedding)
            scores.insert(0, "norms", norms.name)
            scores.insert(0, "model", traced.name)
            frames.append(scores)
    return frames, concepts, len(subset.concepts)


def run_probe(
    model: ModelArg,
    options: ProbeOptions | None = None,
    warn: Warn = python_warning,
) -> ProbeResult:
    """Probes from type-level embeddings to feature norms, every control beside the score.

    Maps each concept's vector to its norm vector (PLSR, a tanh FFNN, ridge; capacity chosen
    inside each training fold), k-fold cross-validated, under the system condition and its
    controls: upper bound, shuffled, shuffled upper, random features, taxonomic corruption,
    structured nonsense and a random-initialised model.

    Args:
        model: a loaded model, a name for :func:`residual_trace.load_model`, or a function
            that loads one (called after the norms are read).
        options: :class:`ProbeOptions` (defaults when ``None``).
        warn: receives one-line warnings and notes.
    """
    import pandas as pd

    from residual_trace.probes.evaluate import summarise, verdicts

    config = options or ProbeOptions()
    notes: list[str] = []

    def note(message: str) -> None:
        notes.append(message)
        warn(message)

    all_norms, corpus, source = _norms_and_corpus(config, note)
    traced = resolve_model(model, note)
    config.seed_torch()
    layers = _layers(config, traced)
    embedded = _embed_all(traced, all_norms, config, corpus, note)
    frames, concept_rows, n_concepts = [], [], {}
    for norms in all_norms:
        scored, concepts, n_concepts[norms.name] = _probe_norms(
            traced, norms, embedded, layers, config, note
        )
        frames += scored
        concept_rows.append(concepts)
    scores = pd.concat(frames, ignore_index=True)
    summary = summarise(scores, keys=KEYS)
    return ProbeResult(
        model=traced,
        options=config,
        tables={
            "scores": scores,
            "summary": summary,
            "verdicts": verdicts(summary, keys=KEYS),
            "concepts": pd.concat(concept_rows, ignore_index=True),
        },
        texts=corpus,
        source=source,
        notes=notes,
        record={"layers": layers, "concepts": n_concepts},
        n_concepts=n_concepts,
        layers=layers,
    )


def _run(model: ModelArg, inputs: None, options: ProbeOptions, warn: Warn) -> ProbeResult:
    """:func:`run_probe` as the contract calls it (the probe takes no texts)."""
    return run_probe(model, options, warn)


_SHORT = {
    "system": "system",
    "upper": "upper",
    "shuffled": "shuffle",
    "shuffled-upper": "shuf.upper",
    "random": "random",
    "taxonomic": "taxonomic",
    "nonsense": "nonsense",
    "random-init": "rand.init",
}


def describe(result: ProbeResult) -> str:
    """The paper-style table (mean and 95% interval per condition) and a verdict per line."""
    from residual_trace.console import table
    from residual_trace.stats import format_interval

    summary = result.tables["summary"]
    model = result.model
    lines = [
        f"{model.name}: {model.model_type} {model.spec.family}, "
        + ", ".join(f"{k} ({v} concepts)" for k, v in result.n_concepts.items())
    ]
    conditions = [c for c in CONDITIONS if c in set(summary["condition"])]
    rows = []
    for key, part in summary.groupby(
        ["norms", "embedding", "layer", "mapper", "metric"], sort=False
    ):
        norms, _, layer, mapper, metric = key
        by = part.set_index("condition")
        cells = [f"{norms} layer {layer} {mapper} {metric}"]
        for condition in conditions:
            if condition not in by.index:
                cells.append("n/a")
                continue
            row = by.loc[condition]
            interval = format_interval(row["score_lo"], row["score_hi"], ".2f")
            cells.append(f"{row['score']:.3f} {interval}")
        rows.append(cells)
    headers = ["norms, layer, mapper, metric", *(_SHORT[c] for c in conditions)]
    lines += table(headers, rows, left=1)
    lines.append("verdicts (system vs shuffled and structured nonsense, 95% intervals):")
    for row in result.tables["verdicts"].itertuples(index=False):
        claim = "beats" if row.beats_controls else "does NOT beat"
        lines.append(
            f"  {row.norms} layer {row.layer} {row.mapper} {row.metric}: system {row.system:.3f} "
            f"{claim} its controls; {row.share_of_upper:.0%} of the upper bound "
            f"(gap {row.gap_to_upper:+.3f})"
        )
    # the notes went to ``warn`` (stderr) as they arose, and are in run.json
    return "\n".join(lines)


EXPERIMENT = Experiment(
    name="probe",
    options=ProbeOptions,
    run=_run,
    result=ProbeResult,
    help="""Probe type-level embeddings for feature norms, with every control beside the score.

    Maps each concept's vector to its norm vector (PLSR, a tanh FFNN, ridge; capacity chosen
    inside each training fold), k-fold cross-validated, under the system condition and its
    controls: upper bound, shuffled, shuffled upper, random features, taxonomic corruption,
    structured nonsense and a random-initialised model. Writes scores.csv, summary.csv (the
    paper-style table with 95% intervals), verdicts.csv, concepts.csv, run.json and figures.
    --text/--file give the corpus of --embedding contextual.
    """,
    epilog="""\b
Examples:
  trace probe --model minilm                        # bundled Lancaster sensorimotor norms
  trace probe --model minilm --norms mcrae:CONCS_FEATS_concstats_brm.txt --layers 0,3,6
  trace probe --model bert-base-uncased --norms binder:WordSet1_Ratings.csv --mapper ridge
  trace probe --model smollm2 --embedding contextual --file corpus.txt --layers 0,15,30
""",
    doc="""Feature-norm probes with every control beside the score (``trace probe``).

    ``probe(model, norms=("lancaster",), **options)`` with the options of
    :class:`ProbeOptions` (``norms`` may also be one string). Returns a :class:`ProbeResult`
    (tables ``scores``, ``summary``, ``verdicts``, ``concepts``).
    """,
    inputs="model",
    texts_option="corpus",
    report_tables=("summary", "verdicts"),
)


#: ``residual_trace.probe``: the Python function of this verb.
probe = on_model(EXPERIMENT)
