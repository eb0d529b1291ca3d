"""The ``trace probe`` job: probes from type-level embeddings to feature norms, every control
computed beside the score (see :mod:`residual_trace.probes`)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from residual_trace.errors import UserError
from residual_trace.experiments.common import RunOptions, inputs_record, load_inputs, model_record
from residual_trace.figures.probe import conditions_figure, layers_figure
from residual_trace.models import TracedModel, random_init_copy
from residual_trace.probes.controls import CONDITIONS
from residual_trace.probes.embeddings import MODES, WordVectors, embed_words, representable
from residual_trace.probes.evaluate import (
    applicable_metrics,
    evaluate,
    summarise,
    verdicts,
)
from residual_trace.probes.mappers import MAPPERS
from residual_trace.probes.norms import Norms, load_norms
from residual_trace.runs import RunDir, save_figures, write_run_json, write_table

__all__ = ["ProbeConfig", "ProbeResult", "describe", "run_probe"]

#: Identifying columns added to every score row.
KEYS = ("model", "norms", "embedding", "layer")


@dataclass
class ProbeConfig(RunOptions):
    """Everything ``trace probe`` needs: the shared options plus its own.

    ``texts``/``file`` are the corpus of ``--embedding contextual`` (unused otherwise).
    """

    norms: tuple[str, ...] = ("lancaster",)
    layers: tuple[int, ...] | None = None
    mappers: tuple[str, ...] = ("plsr", "ffnn")
    embedding: str = "isolated"
    folds: int = 10
    seeds: int = 1
    max_concepts: int = 500
    conditions: tuple[str, ...] = CONDITIONS
    per_feature: bool = False
    use_cache: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.norms:
            raise UserError("--norms: give at least one norm set")
        if self.embedding not in MODES:
            raise UserError(f"--embedding must be one of {', '.join(MODES)}")
        for mapper in self.mappers:
            if mapper not in MAPPERS:
                raise UserError(f"--mapper {mapper}: expected one of {', '.join(MAPPERS)}")
        if not self.mappers:
            raise UserError("--mapper: give at least one mapper")
        for condition in self.conditions:
            if condition not in CONDITIONS:
                raise UserError(f"--condition {condition}: expected one of {', '.join(CONDITIONS)}")
        if "system" not in self.conditions:
            raise UserError("--condition: the system condition cannot be left out")
        if self.folds < 2:
            raise UserError(f"--folds must be at least 2, got {self.folds}")
        if self.seeds < 1:
            raise UserError(f"--seeds must be at least 1, got {self.seeds}")
        if self.max_concepts < 20:
            raise UserError(f"--max-concepts must be at least 20, got {self.max_concepts}")
        if self.layers is not None and any(layer < 0 for layer in self.layers):
            raise UserError("--layers: layers count from 0 (the embeddings)")

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        for key in ("norms", "mappers", "conditions"):
            data[key] = list(getattr(self, key))
        data["layers"] = None if self.layers is None else list(self.layers)
        return data


def parse_layers(spec: str) -> tuple[int, ...]:
    """``"0,3,6"`` -> ``(0, 3, 6)`` (a clear error otherwise)."""
    try:
        layers = tuple(int(part) for part in spec.split(",") if part.strip())
    except ValueError:
        raise UserError(
            f"--layers {spec}: expected comma-separated layer numbers, e.g. 0,3,6"
        ) from None
    if not layers:
        raise UserError("--layers: no layer given")
    return layers


@dataclass
class ProbeResult:
    out: Path
    scores: pd.DataFrame
    summary: pd.DataFrame
    verdicts: pd.DataFrame
    model: TracedModel
    n_concepts: dict[str, int]
    notes: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)


def _layers(config: ProbeConfig, model: TracedModel) -> list[int]:
    if config.embedding == "static":
        return [0]
    layers = list(config.layers or (0, model.n_layers // 2, model.n_layers))
    too_deep = [layer for layer in layers if layer > model.n_layers]
    if too_deep:
        raise UserError(f"--layers {too_deep[0]}: {model.name} has layers 0..{model.n_layers}")
    return sorted(set(layers))


def _sample(norms: Norms, available: set[str], config: ProbeConfig, notes: list[str]) -> list[str]:
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
        )
    return usable


def _embed(
    model: TracedModel,
    all_norms: list[Norms],
    config: ProbeConfig,
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


def run_probe(
    config: ProbeConfig,
    echo: Callable[[str], None] = lambda message: print(message, file=sys.stderr),
    model: TracedModel | None = None,
) -> ProbeResult:
    """Run ``trace probe``: scores, summary, verdicts, figures and run.json into ``config.out``."""
    all_norms = [load_norms(spec) for spec in config.norms]  # fail fast, before the model
    corpus: list[str] = []
    source = "none (not needed)"
    if config.embedding == "contextual":
        corpus, source = load_inputs(config.texts, config.file)
    out = config.output_dir()
    with RunDir(out) as run:
        model = config.model_for(model, echo)
        layers = _layers(config, model)
        notes: list[str] = []
        vectors, samples, dropped = _embed(model, all_norms, config, corpus, notes)
        random_vectors: WordVectors | None = None
        if "random-init" in config.conditions:
            random_model = random_init_copy(model, config.seed)
            random_vectors = embed_words(
                random_model, vectors.words, config.embedding, corpus, use_cache=config.use_cache
            )
        index = {w: i for i, w in enumerate(vectors.words)}
        frames, concept_rows, n_concepts = [], [], {}
        for norms in all_norms:
            notes += [f"{norms.name}: {note}" for note in norms.notes]
            subset = norms.subset(samples[norms.name])
            rows = [index[c] for c in subset.concepts]
            n_concepts[norms.name] = len(subset.concepts)
            metrics, metric_notes = applicable_metrics(subset, config.per_feature)
            notes += [f"{norms.name}: {note}" for note in metric_notes]
            concept_rows.append(
                pd.DataFrame(
                    {
                        "norms": norms.name,
                        "concept": list(norms.concepts),
                        "used": [c in set(subset.concepts) for c in norms.concepts],
                        "reason": [
                            "" if c in set(subset.concepts) else dropped.get(c, "not sampled")
                            for c in norms.concepts
                        ],
                    }
                )
            )
            total = len(layers) * len(config.conditions) * config.folds * config.seeds
            with tqdm(
                total=total * len(config.mappers),
                desc=f"probing {model.name} -> {norms.name}",
                unit="fit",
                disable=not config.progress,
                leave=False,
            ) as bar:

                def advance(fits: int) -> None:
                    bar.update(fits)

                for layer in layers:
                    scores = evaluate(
                        vectors.at(layer)[rows],
                        subset,
                        mappers=config.mappers,
                        conditions=config.conditions,
                        folds=config.folds,
                        seeds=range(config.seed, config.seed + config.seeds),
                        metrics=metrics,
                        random_init=None
                        if random_vectors is None
                        else random_vectors.at(layer)[rows],
                        progress=advance,
                    )
                    scores.insert(0, "layer", layer)
                    scores.insert(0, "embedding", config.embedding)
                    scores.insert(0, "norms", norms.name)
                    scores.insert(0, "model", model.name)
                    frames.append(scores)
        scores = pd.concat(frames, ignore_index=True)
        summary = summarise(scores, keys=KEYS)
        verdict = verdicts(summary, keys=KEYS)
        concepts = pd.concat(concept_rows, ignore_index=True)
        files: list[Path] = []
        for frame, name in (
            (scores, "scores.csv"),
            (summary, "summary.csv"),
            (verdict, "verdicts.csv"),
            (concepts, "concepts.csv"),
        ):
            files += [run.out / p.name for p in write_table(frame, run.tmp / name)]
        figures = {"conditions": conditions_figure(summary)}
        if len(layers) > 1:
            figures["layers"] = layers_figure(summary)
        files += save_figures(figures, run.tmp, run.out, config.figure_format)
        write_run_json(
            run.tmp / "run.json",
            {
                "command": "probe",
                "model": model_record(model),
                "device": str(model.device),
                "corpus": inputs_record(corpus, source) if corpus else None,
                "options": config.to_dict(),
                "seed": config.seed,
                "layers": layers,
                "concepts": n_concepts,
                "notes": notes,
                "files": [p.name for p in files],
            },
        )
        files.append(run.out / "run.json")
    return ProbeResult(
        out=out,
        scores=scores,
        summary=summary,
        verdicts=verdict,
        model=model,
        n_concepts=n_concepts,
        notes=notes,
        files=files,
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
    model = result.model
    lines = [
        f"{model.name}: {model.model_type} {model.spec.family}, "
        + ", ".join(f"{k} ({v} concepts)" for k, v in result.n_concepts.items())
    ]
    summary = result.summary
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
            cells.append(f" {row['mean']:>6.3f} [{row['lo']:.2f},{row['hi']:.2f}]")
        lines.append(f"{norms:<12} {layer:>5} {mapper:<6} {metric:<16}" + "".join(cells))
    lines.append("verdicts (system vs shuffled and structured nonsense, 95% intervals):")
    for row in result.verdicts.itertuples(index=False):
        claim = "beats" if row.beats_controls else "does NOT beat"
        lines.append(
            f"  {row.norms} layer {row.layer} {row.mapper} {row.metric}: system {row.system:.3f} "
            f"{claim} its controls; {row.share_of_upper:.0%} of the upper bound "
            f"(gap {row.gap_to_upper:+.3f})"
        )
    lines += [f"note: {note}" for note in result.notes]
    lines.append(f"wrote {result.out}/: " + ", ".join(p.name for p in result.files))
    return "\n".join(lines)
