"""The ``trace report`` job: every experiment on several models, side by side, as one report.

A report is described by a TOML config (models, inputs, experiments, seeds). Each experiment
of each model runs into ``OUT/runs/<model>/<experiment>/`` through the same job as its own
command; a finished part carries a fingerprint of the options it ran with, so a report that
was killed midway resumes without redoing it. The report itself (``report.html``,
``report.md``, ``figures/``, ``tables/``) is then assembled from those tables alone, on a
relative-depth axis (layer / number of layers) so that a 6-layer and a 30-layer model compare.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import tomllib

from residual_trace.errors import UserError
from residual_trace.experiments.common import FIGURE_FORMATS, load_inputs
from residual_trace.models import TracedModel, load_model
from residual_trace.runs import default_out, write_atomic

EXPERIMENTS = ("layers", "decompose", "perturb", "probe")


@dataclass
class ReportConfig:
    """What a report runs. Saved beside it as ``config.toml``; ``--config`` reads one back.

    ``max_texts`` keeps the first texts of the input (the bundled sentences by default) so
    that a 30-layer model reports in minutes; ``probe_layers`` are relative depths.
    """

    models: list[str] = field(default_factory=lambda: ["minilm", "smollm2"])
    file: str = ""
    texts: list[str] = field(default_factory=list)
    max_texts: int = 60
    experiments: list[str] = field(default_factory=lambda: list(EXPERIMENTS))
    seed: int = 0
    device: str = "auto"
    batch_size: int = 16
    perturb_mode: str = "shuffle"
    perturb_samples: int = 5
    probe_norms: list[str] = field(default_factory=lambda: ["lancaster"])
    probe_mappers: list[str] = field(default_factory=lambda: ["plsr"])
    probe_folds: int = 10
    probe_max_concepts: int = 300
    probe_depths: list[float] = field(default_factory=lambda: [0.0, 0.5, 1.0])
    out: str = ""
    quiet: bool = False
    figure_format: str = "png"

    def __post_init__(self) -> None:
        if not self.models:
            raise UserError("a report needs at least one --model")
        if len(set(self.models)) != len(self.models):
            raise UserError("each --model may appear only once in a report")
        unknown = [e for e in self.experiments if e not in EXPERIMENTS]
        if unknown or not self.experiments:
            raise UserError(
                f"experiments must be some of {', '.join(EXPERIMENTS)}, got {unknown or 'none'}"
            )
        if self.max_texts < 1:
            raise UserError(f"max_texts must be at least 1, got {self.max_texts}")
        if any(not 0.0 <= d <= 1.0 for d in self.probe_depths):
            raise UserError("probe_depths are relative depths between 0 and 1")
        if self.figure_format not in FIGURE_FORMATS:
            raise UserError(f"--format must be one of {', '.join(FIGURE_FORMATS)}")

    # -- TOML ------------------------------------------------------------------------------
    def to_toml(self) -> str:
        """The config as TOML (``quiet`` and ``out`` are not part of what a report *is*)."""
        data = asdict(self)
        lines = ["# trace report config: `trace report --config THIS_FILE` reproduces the report"]
        for key, value in data.items():
            if key in {"quiet", "out"}:
                continue
            lines.append(f"{key} = {_toml_value(value)}")
        return "\n".join(lines) + "\n"

    @classmethod
    def from_toml(cls, path: Path) -> ReportConfig:
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UserError(f"--config {path}: no such file") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
            raise UserError(f"--config {path}: not valid TOML ({error})") from None
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise UserError(f"--config {path}: unknown key(s) {', '.join(unknown)}")
        try:
            return cls(**data)
        except TypeError as error:
            raise UserError(f"--config {path}: {error}") from None

    def fingerprint(self, model: str, experiment: str) -> str:
        """What one part depends on: its model, the inputs, and its experiment's options."""
        data = asdict(self)
        keep = {"file", "texts", "max_texts", "seed", "batch_size"}
        if experiment == "perturb":
            keep |= {"perturb_mode", "perturb_samples"}
        if experiment == "probe":
            keep = {"seed", "probe_norms", "probe_mappers", "probe_folds", "probe_max_concepts"}
            keep |= {"probe_depths"}
        payload = {"model": model, "experiment": experiment, **{k: data[k] for k in sorted(keep)}}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def slug(model: str) -> str:
    """A directory name for a model (``./ckpt/`` -> ``ckpt``, ``org/name`` -> ``org-name``)."""
    name = model.rstrip("/")
    name = Path(name).name if Path(name).exists() else name.replace("/", "-")
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name).strip("-.") or "model"


@dataclass
class Part:
    """One finished experiment of one model: where its tables are, and whether it ran now."""

    model: str
    experiment: str
    directory: Path
    ran: bool


def _texts(config: ReportConfig) -> tuple[list[str], str]:
    texts, source = load_inputs(config.texts or None, Path(config.file) if config.file else None)
    return texts[: config.max_texts], source


def _done(directory: Path, fingerprint: str) -> bool:
    marker = directory / "fingerprint.txt"
    return (
        (directory / "run.json").is_file()
        and marker.is_file()
        and marker.read_text().strip() == fingerprint
    )


def run_parts(
    config: ReportConfig,
    root: Path,
    texts: list[str],
    echo: Callable[[str], None],
    models: dict[str, TracedModel] | None = None,
) -> list[Part]:
    """Run every experiment of every model that is not already done (resume), in order."""
    from residual_trace.experiments.decompose import DecomposeConfig, run_decompose
    from residual_trace.experiments.layers import LayersConfig, run_layers
    from residual_trace.experiments.perturb import PerturbConfig, run_perturb
    from residual_trace.experiments.probe import ProbeConfig, run_probe

    loaded = dict(models or {})
    parts = []
    for name in config.models:
        for experiment in config.experiments:
            directory = root / "runs" / slug(name) / experiment
            fingerprint = config.fingerprint(name, experiment)
            if _done(directory, fingerprint):
                parts.append(Part(name, experiment, directory, ran=False))
                continue
            if name not in loaded:
                loaded[name] = load_model(
                    name, config.device, on_convert=lambda m: echo(f"note: {m}")
                )
            model = loaded[name]
            if not config.quiet:
                echo(f"report: {experiment} on {name}")
            shared: dict[str, Any] = {
                "model": name,
                "out": directory,
                "device": config.device,
                "batch_size": config.batch_size,
                "seed": config.seed,
                "quiet": True,
                "figure_format": "png",
            }
            quiet_echo = (lambda m: None) if config.quiet else echo
            if experiment == "layers":
                run_layers(LayersConfig(texts=texts, **shared), echo=quiet_echo, model=model)
            elif experiment == "decompose":
                run_decompose(DecomposeConfig(texts=texts, **shared), echo=quiet_echo, model=model)
            elif experiment == "perturb":
                perturb = PerturbConfig(
                    texts=texts,
                    mode=config.perturb_mode,
                    samples=config.perturb_samples,
                    **shared,
                )
                run_perturb(perturb, echo=quiet_echo, model=model)
            else:
                layers = sorted({round(d * model.n_layers) for d in config.probe_depths})
                probe = ProbeConfig(
                    norms=tuple(config.probe_norms),
                    mappers=tuple(config.probe_mappers),
                    folds=config.probe_folds,
                    max_concepts=config.probe_max_concepts,
                    layers=tuple(layers),
                    **shared,
                )
                run_probe(probe, echo=quiet_echo, model=model)
            (directory / "fingerprint.txt").write_text(fingerprint + "\n")
            parts.append(Part(name, experiment, directory, ran=True))
    return parts


@dataclass
class ReportResult:
    out: Path
    parts: list[Part]
    verdicts: list[str]
    files: list[Path]


def run_report(
    config: ReportConfig,
    echo: Callable[[str], None] = lambda message: print(message, file=sys.stderr),
    models: dict[str, TracedModel] | None = None,
) -> ReportResult:
    """Run (or resume) every part, then write the report into ``config.out``.

    Unlike the single-experiment commands, the output directory is filled in place: the
    finished parts *are* the resume state. The report files themselves are written to
    temporary names and renamed when complete.
    """
    from residual_trace.experiments.report_document import write_report

    texts, _ = _texts(config)  # bad inputs fail before any model loads
    root = Path(config.out) if config.out else default_out("report")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot write to --out {root}: {error.strerror or error}") from None
    if not root.is_dir():
        raise UserError(f"--out {root} exists and is not a directory")
    write_atomic(root / "config.toml", config.to_toml())
    parts = run_parts(config, root, texts, echo, models)
    verdicts, files = write_report(config, root, parts)
    return ReportResult(out=root, parts=parts, verdicts=verdicts, files=files)
