"""Pieces every ``trace`` job shares: where its texts come from and what run.json records."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from residual_trace.errors import UserError
from residual_trace.models import TracedModel, load_model
from residual_trace.runs import default_out, texts_sha256


def bundled_sentences() -> list[str]:
    """The English sentences shipped with the package (written for this project)."""
    text = resources.files("residual_trace").joinpath("data/sentences.txt").read_text("utf-8")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def read_texts(path: Path) -> list[str]:
    """One text per non-blank line of a UTF-8 file."""
    try:
        content = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"--file {path}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"--file {path}: is a directory, expected a text file") from None
    except UnicodeDecodeError:
        raise UserError(f"--file {path}: not UTF-8 text") from None
    except OSError as error:
        raise UserError(f"--file {path}: {error.strerror or error}") from None
    texts = [line.strip() for line in content.splitlines() if line.strip()]
    if not texts:
        raise UserError(f"--file {path}: holds no text (one text per non-blank line)")
    return texts


def load_inputs(texts: Sequence[str] | None, file: Path | None) -> tuple[list[str], str]:
    """The texts of a run and a description of their source (``--text``, a file, bundled)."""
    if texts is not None and file is not None:
        raise UserError("give texts with --text or --file, not both")
    if texts is not None:
        if not texts:
            raise UserError("no text given")
        return list(texts), "--text"
    if file is not None:
        return read_texts(file), str(file)
    return bundled_sentences(), "bundled sentences (residual_trace/data/sentences.txt)"


def model_record(model: TracedModel) -> dict[str, Any]:
    """The model block of ``run.json``: where the weights came from and their shape."""
    return {
        "name": model.name,
        "source": model.resolved.source,
        "directory": str(model.resolved.directory),
        "revision": model.resolved.revision,
        "weights_sha256": model.resolved.weights_sha256,
        "architecture": model.model_type,
        "family": model.spec.family,
        "norm_placement": model.spec.norm_placement,
        "n_blocks": model.n_layers,
        "d_model": model.d_model,
        "n_heads": model.n_heads,
        "d_vocab": model.d_vocab,
    }


def inputs_record(texts: Sequence[str], source: str) -> dict[str, Any]:
    return {"source": source, "n_texts": len(texts), "texts_sha256": texts_sha256(texts)}


FIGURE_FORMATS = ("png", "svg", "pdf")


@dataclass
class RunOptions:
    """Options every ``trace`` job takes; a job's config extends it with its own.

    Saved in ``run.json`` under ``options`` (``texts`` as their count).
    """

    model: str = "minilm"
    texts: list[str] | None = None
    file: Path | None = None
    out: Path | None = None
    device: str = "auto"
    batch_size: int = 16
    max_length: int | None = None
    seed: int = 0
    quiet: bool = False
    figure_format: str = "png"
    include_special: bool = False

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.max_length is not None and self.max_length < 2:
            raise UserError(f"--max-length must be at least 2, got {self.max_length}")
        if self.figure_format not in FIGURE_FORMATS:
            raise UserError(f"--format must be one of {', '.join(FIGURE_FORMATS)}")

    def output_dir(self) -> Path:
        """``--out``, or ``runs/<model>-<UTC timestamp>``."""
        return Path(self.out) if self.out is not None else default_out(self.model)

    @property
    def progress(self) -> bool:
        """Show progress bars: not with ``--quiet``, and only when stderr is a terminal."""
        return not self.quiet and sys.stderr.isatty()

    def model_for(self, model: TracedModel | None, echo: Callable[[str], None]) -> TracedModel:
        """Seed torch, then reuse ``model`` or load ``--model`` on ``--device`` (conversion
        notes go to ``echo``)."""
        torch.manual_seed(self.seed)
        if model is not None:
            return model
        return load_model(self.model, self.device, on_convert=lambda m: echo(f"note: {m}"))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["texts"] = None if self.texts is None else len(self.texts)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunOptions:
        """Rebuild from ``run.json`` options, ignoring unknown keys (texts are not saved)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names and k != "texts"})
