"""Pieces every ``trace`` job shares: where its texts come from and what run.json records."""

from __future__ import annotations

from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from residual_trace.errors import UserError
from residual_trace.models import TracedModel
from residual_trace.runs import texts_sha256


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
