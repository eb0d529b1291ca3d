"""What a report runs: :class:`ReportOptions`, written beside it as ``config.toml``.

The whole configuration is checked before any work starts: every key's type (a wrong one is
one line naming the key and what it expects), every value, and each experiment's options
(built here with the same option classes the single experiments use).
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

from residual_trace.defaults import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_SEED,
    Device,
    DeviceMap,
    Dtype,
    FigureFormat,
)
from residual_trace.errors import OptionError, UserError
from residual_trace.experiments.options import (
    CommonOptions,
    Texts,
    device_map_option,
    device_option,
    dtype_option,
    figure_format_option,
)
from residual_trace.experiments.perturb import Mode
from residual_trace.experiments.probe import Mapper
from residual_trace.experiments.registry import EXPERIMENTS as REGISTERED
from residual_trace.experiments.registry import experiment as registered
from residual_trace.options import Options, no_type_check, option

#: The experiments a report runs: every registered one that names the tables it reads.
EXPERIMENTS: tuple[str, ...] = tuple(e.name for e in REGISTERED if e.report_tables)

#: The version of the parts' table layout: part of every fingerprint, so that a report
#: directory written with other column names is run again, not resumed (2: ``block``,
#: ``head_name``, ``follow_index``, ``score``).
TABLE_SCHEMA = 2
Experiment = Literal["layers", "decompose", "perturb", "probe", "lens"]

#: Which report key sets which option of a part (for error messages in the report's terms).
_REPORT_KEYS = {
    **{(e, k): k for e in EXPERIMENTS for k in ("batch_size", "seed")},
    ("perturb", "mode"): "perturb_mode",
    ("perturb", "samples"): "perturb_samples",
    ("probe", "norms"): "probe_norms",
    ("probe", "mappers"): "probe_mappers",
    ("probe", "folds"): "probe_folds",
    ("probe", "max_concepts"): "probe_max_concepts",
    ("lens", "tuned_lens"): "tuned_lenses",
}


@no_type_check
@dataclass(kw_only=True)
class ReportOptions(Options):
    """What a report runs. Saved beside it as ``config.toml``; ``--config`` reads one back.

    ``max_texts`` keeps the first texts of the input (the bundled sentences by default) so
    that a 30-layer model reports in minutes; ``probe_depths`` are relative depths
    (layer / blocks).
    """

    models: Sequence[str] = option(
        ("minilm", "smollm2"),
        "A model to report on (repeatable; default: minilm and smollm2).",
        flag="--model",
        short="-m",
    )
    file: str = option("", "Texts, one per line (default: the bundled sentences).", short="-f")
    texts: tuple[str, ...] = option((), "The texts themselves (instead of a file).", cli=False)
    max_texts: int = option(60, "Use the first N texts.")
    experiments: tuple[Experiment, ...] = option(
        EXPERIMENTS,
        f"Experiments to run (repeatable; default: all {len(EXPERIMENTS)}).",
        flag="--experiment",
    )
    seed: int = option(DEFAULT_SEED, "Seed of every experiment.")
    device: Device = device_option()
    dtype: Dtype = dtype_option()
    device_map: DeviceMap | None = device_map_option(cli=False)
    batch_size: int = option(DEFAULT_BATCH_SIZE, "Texts per forward pass.", cli=False)
    perturb_mode: Mode = option("shuffle", "The perturbation of the perturb part.", cli=False)
    perturb_samples: int = option(5, "Perturbations per text in the perturb part.", cli=False)
    probe_norms: Sequence[str] = option(("lancaster",), "Norm sets of the probe.", cli=False)
    probe_mappers: tuple[Mapper, ...] = option(("plsr",), "Mappers of the probe.", cli=False)
    probe_folds: int = option(10, "Cross-validation folds of the probe.", cli=False)
    probe_max_concepts: int = option(300, "Concepts per norm set.", cli=False)
    probe_depths: tuple[float, ...] = option(
        (0.0, 0.5, 1.0), "Relative depths probed (layer / blocks).", cli=False
    )
    tuned_lenses: Sequence[str] = option(
        (),
        "A tuned lens for one model's lens part, as MODEL=DIR (repeatable; DIR as trace "
        "train-lens writes it). Without one, a decoder's lens part reads the logit lens only.",
        flag="--tuned-lens",
        metavar="MODEL=DIR",
    )
    figure_format: FigureFormat = figure_format_option(cli=False)

    def validate(self) -> None:
        """Check the models, experiments, texts and depths, and each part's own options."""
        if not self.models:
            raise self.fail("models", "a report needs at least one model")
        if len(set(self.models)) != len(self.models):
            raise self.fail("models", "each model may appear only once in a report")
        if not self.experiments:
            raise self.fail("experiments", f"give some of {', '.join(EXPERIMENTS)}")
        if self.max_texts < 1:
            raise self.fail("max_texts", f"must be at least 1, got {self.max_texts}")
        if any(not 0.0 <= d <= 1.0 for d in self.probe_depths):
            raise self.fail("probe_depths", "relative depths lie between 0 and 1")
        if self.file and self.texts:
            raise self.fail("texts", "give texts or a file, not both")
        lensed = self.tuned_lens_folders()
        for experiment in self.experiments:  # each part's own options, checked now
            for model in [None, *lensed] if experiment == "lens" else [None]:
                try:
                    self.options_for(experiment, n_blocks=None, model=model)
                except OptionError as error:
                    key = _REPORT_KEYS.get((experiment, error.option))
                    if key is None:
                        raise
                    where = f"{model}: " if model else ""
                    raise self.fail(key, where + error.detail) from None

    def tuned_lens_folders(self) -> dict[str, Path]:
        """``tuned_lenses`` as model -> folder; a malformed entry or unknown model fails."""
        folders: dict[str, Path] = {}
        for entry in self.tuned_lenses:
            model, sep, folder = entry.partition("=")
            if not sep or not model or not folder:
                raise self.fail("tuned_lenses", f"expected MODEL=DIR, got {entry!r}")
            if model not in self.models:
                raise self.fail(
                    "tuned_lenses",
                    f"{model} is not a model of this report ({', '.join(self.models)})",
                )
            if model in folders:
                raise self.fail("tuned_lenses", f"{model}: one tuned lens per model")
            folders[model] = Path(folder).expanduser()
        return folders

    # -- the parts' options -----------------------------------------------------------------
    def options_for(
        self, experiment: str, n_blocks: int | None, model: str | None = None
    ) -> CommonOptions:
        """The options of one part, built from the report's keys.

        The report's batch size and seed, and the report keys of that experiment (``perturb_*``,
        ``probe_*``; ``n_blocks`` turns probe depths into layers; ``model``'s tuned lens);
        every other option at the experiment's default.
        """
        shared: dict[str, Any] = {"batch_size": self.batch_size, "seed": self.seed, "quiet": True}
        own: dict[str, Any] = {}
        if experiment == "perturb":
            own = {"mode": self.perturb_mode, "samples": self.perturb_samples}
        elif experiment == "probe":
            layers = (
                None
                if n_blocks is None
                else tuple(sorted({round(d * n_blocks) for d in self.probe_depths}))
            )
            own = {
                "norms": self.probe_norms,
                "mappers": self.probe_mappers,
                "folds": self.probe_folds,
                "max_concepts": self.probe_max_concepts,
                "layers": layers,
            }
        elif experiment == "lens" and model is not None:
            folder = self.tuned_lens_folders().get(model)
            own = {} if folder is None else {"tuned_lens": folder}
        options: CommonOptions = registered(experiment).options(**shared, **own)
        return options

    def inputs(self) -> Texts:
        """The texts argument of every part (before ``max_texts``)."""
        if self.texts:
            return list(self.texts)
        return Path(self.file) if self.file else None

    def load_texts(self) -> tuple[list[str], str]:
        """The report's texts (the first ``max_texts``) and where they came from."""
        from residual_trace.experiments.common import load_inputs

        texts, source = load_inputs(self.inputs())
        return texts[: self.max_texts], source

    # -- TOML ------------------------------------------------------------------------------
    def to_toml(self) -> str:
        """The config as TOML: ``trace report --config THIS_FILE`` reproduces the report."""
        lines = ["# trace report config: `trace report --config THIS_FILE` reproduces the report"]
        for key, value in self.to_dict().items():
            if value is not None:  # TOML has no null: an absent key means the default
                lines.append(f"{key} = {_toml_value(value)}")
        return "\n".join(lines) + "\n"

    @classmethod
    def read_toml(cls, path: Path) -> dict[str, Any]:
        """The keys of a TOML config; unknown keys and bad TOML are one-line errors.

        Values are checked when the options are built.
        """
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UserError(f"--config {path}: no such file") from None
        except IsADirectoryError:
            raise UserError(f"--config {path}: is a directory, expected a TOML file") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
            raise UserError(f"--config {path}: not valid TOML ({error})") from None
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise UserError(
                f"--config {path}: unknown key(s) {', '.join(unknown)} "
                f"(known: {', '.join(sorted(names))})"
            )
        return data

    @classmethod
    def from_toml(cls, path: Path, **overrides: Any) -> ReportOptions:
        """Options from a TOML file, with ``overrides`` on top.

        Otherwise a one-line error naming the file and the key.
        """
        data = {**cls.read_toml(path), **overrides}
        try:
            return cls(**data)
        except UserError as error:
            raise UserError(f"--config {path}: {error}") from None

    def fingerprint(self, model: str, experiment: str) -> str:
        """What one part depends on: its model, the inputs, and its experiment's options."""
        data = asdict(self)
        keep = {"file", "texts", "max_texts", "seed", "batch_size", "dtype"}
        if experiment == "perturb":
            keep |= {"perturb_mode", "perturb_samples"}
        if experiment == "probe":
            keep = {"seed", "dtype", "probe_norms", "probe_mappers", "probe_folds"}
            keep |= {"probe_max_concepts"}
            keep |= {"probe_depths"}
        payload = {
            "schema": TABLE_SCHEMA,
            "model": model,
            "experiment": experiment,
            **{k: _plain(data[k]) for k in sorted(keep)},
        }
        folder = self.tuned_lens_folders().get(model) if experiment == "lens" else None
        if folder is not None:  # a lens trained again into the same folder runs again
            payload["tuned_lens"] = [_file_digest(folder / n) for n in ("config.json", "params.pt")]
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def slug(model: str) -> str:
    """The directory of a model's parts: distinct for distinct models, the same for one.

    A packaged alias is its own name (``minilm``); a hub name keeps its organisation with
    Hugging Face's cache separator (``org/name`` -> ``org--name``; the hub allows no ``--``
    in names); a local checkpoint is its folder's name plus 8 hex digits of its absolute
    path, so ``a/model`` and ``b/model`` never share a directory, and ``./ckpt`` and
    ``ckpt`` (one checkpoint) do.

    Examples:
        >>> slug("minilm"), slug("EleutherAI/pythia-70m")
        ('minilm', 'EleutherAI--pythia-70m')
    """
    from residual_trace.models.resolve import ALIASES, HUB_RENAMES

    if model in ALIASES:
        return model
    path = Path(model).expanduser()
    if path.exists():
        where = str(path.resolve())
        digest = hashlib.sha256(where.encode("utf-8", "surrogatepass")).hexdigest()[:8]
        return f"{_safe(path.resolve().name)}-{digest}"
    repo = HUB_RENAMES.get(model, model)
    safe = "--".join(_safe(part) for part in repo.split("/"))
    if safe != repo.replace("/", "--"):  # characters a directory name cannot keep
        safe += "-" + hashlib.sha256(repo.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return safe


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name).strip("-.") or "model"
