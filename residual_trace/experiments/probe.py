"""The ``trace probe`` job: probes from type-level embeddings to feature norms, every control
computed beside the score (see :mod:`residual_trace.probes`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from residual_trace.errors import UserError
from residual_trace.experiments.common import load_inputs, resolve_model
from residual_trace.experiments.options import (
    ModelArg,
    ProbeOptions,
    Warn,
    parse_layers,
    python_warning,
)
from residual_trace.experiments.result import Result
from residual_trace.figures.probe import conditions_figure, layers_figure
from residual_trace.models import TracedModel, random_init_copy
from residual_trace.probes.controls import CONDITIONS
from residual_trace.probes.embeddings import WordVectors, embed_words, representable
from residual_trace.probes.evaluate import applicable_metrics, evaluate, summarise, verdicts
from residual_trace.probes.norms import Norms, load_norms
from residual_trace.stats import format_interval

__all__ = ["ProbeOptions", "ProbeResult", "parse_layers", "run_probe"]

#: Identifying columns added to every score row.
KEYS = ("model", "norms", "embedding", "layer")


@dataclass(repr=False)
class ProbeResult(Result):
    """Tables scores, summary, verdicts, concepts; figures conditions (and layers)."""

    command = "probe"
    n_concepts: dict[str, int] = field(default_factory=dict)
    layers: list[int] = field(default_factory=list)

    def figures(self) -> dict[str, Figure]:
        figures = {"conditions": conditions_figure(self.tables["summary"])}
        if len(self.layers) > 1:
            figures["layers"] = layers_figure(self.tables["summary"])
        return figures

    def headline(self) -> str:
        verdict = self.tables["verdicts"]
        beats = int(verdict["beats_controls"].sum())
        return f"system beats its controls in {beats} of {len(verdict)} probe(s)"

    def describe(self) -> str:
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
    """Embed only what is probed: sample first (a contextual corpus pass embeds every word
    at once, so there the sample is drawn from the words that occur)."""
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


def _advance(bar: tqdm) -> Callable[[int], None]:
    def advance(fits: int) -> None:
        bar.update(fits)

    return advance


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
    config = options or ProbeOptions()
    all_norms = [load_norms(spec) for spec in config.norms]  # fail fast, before the model
    corpus: list[str] = []
    source = "none (not needed)"
    if config.embedding == "contextual":
        given = config.corpus
        corpus, source = load_inputs(list(given) if isinstance(given, tuple) else given)
    notes: list[str] = []

    def echo(message: str) -> None:
        notes.append(message)
        warn(message)

    for norms in all_norms:  # what reading each file dropped by design, counted
        for note in norms.notes:
            echo(f"{norms.name}: {note}")
    traced = resolve_model(model, echo)
    config.seed_torch()
    layers = _layers(config, traced)
    sampling: list[str] = []
    vectors, samples, dropped = _embed(traced, all_norms, config, corpus, sampling)
    for note in sampling:
        echo(note)
    random_vectors: WordVectors | None = None
    if "random-init" in config.conditions:
        random_model = random_init_copy(traced, config.seed)
        random_vectors = embed_words(
            random_model, vectors.words, config.embedding, corpus, use_cache=config.use_cache
        )
    index = {w: i for i, w in enumerate(vectors.words)}
    frames, concept_rows, n_concepts = [], [], {}
    for norms in all_norms:
        subset = norms.subset(samples[norms.name])
        rows = [index[c] for c in subset.concepts]
        n_concepts[norms.name] = len(subset.concepts)
        metrics, metric_notes = applicable_metrics(subset, config.per_feature)
        for note in metric_notes:
            echo(f"{norms.name}: {note}")
        used = set(subset.concepts)
        concept_rows.append(
            pd.DataFrame(
                {
                    "norms": norms.name,
                    "concept": list(norms.concepts),
                    "used": [c in used for c in norms.concepts],
                    "reason": [
                        "" if c in used else dropped.get(c, "not sampled") for c in norms.concepts
                    ],
                }
            )
        )
        total = len(layers) * len(config.conditions) * config.folds * config.seeds
        with tqdm(
            total=total * len(config.mappers),
            desc=f"probing {traced.name} -> {norms.name}",
            unit="fit",
            disable=not config.progress,
            leave=False,
        ) as bar:
            for layer in layers:
                scores = evaluate(
                    vectors.at(layer)[rows],
                    subset,
                    mappers=config.mappers,
                    conditions=config.conditions,
                    folds=config.folds,
                    seeds=range(config.seed, config.seed + config.seeds),
                    metrics=metrics,
                    random_init=None if random_vectors is None else random_vectors.at(layer)[rows],
                    progress=_advance(bar),
                )
                scores.insert(0, "layer", layer)
                scores.insert(0, "embedding", config.embedding)
                scores.insert(0, "norms", norms.name)
                scores.insert(0, "model", traced.name)
                frames.append(scores)
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
    summary = result.tables["summary"]
    model = result.model
    lines = [
        f"{model.name}: {model.model_type} {model.spec.family}, "
        + ", ".join(f"{k} ({v} concepts)" for k, v in result.n_concepts.items())
    ]
    conditions = [c for c in CONDITIONS if c in set(summary["condition"])]
    header = f"{'norms':<12} {'layer':>5} {'mapper':<6} {'metric':<16}" + "".join(
        f" {_SHORT[c]:>17}" for c in conditions
    )
    lines.append(header)
    for key, part in summary.groupby(
        ["norms", "embedding", "layer", "mapper", "metric"], sort=False
    ):
        norms, _, layer, mapper, metric = key
        by = part.set_index("condition")
        cells = []
        for condition in conditions:
            if condition not in by.index:
                cells.append(f" {'—':>17}")
                continue
            row = by.loc[condition]
            interval = format_interval(row["score_lo"], row["score_hi"], ".2f")
            cells.append(f" {row['score']:>6.3f} {interval}")
        lines.append(f"{norms:<12} {layer:>5} {mapper:<6} {metric:<16}" + "".join(cells))
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
