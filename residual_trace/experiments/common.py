"""Pieces every experiment shares: its inputs, its common options, what run.json records."""

from __future__ import annotations

import re
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from residual_trace.errors import UserError
from residual_trace.experiments.options import ModelArg, Texts, Warn, texts_argument
from residual_trace.runs import texts_sha256
from residual_trace.settings import check_environment

if TYPE_CHECKING:
    from residual_trace.models import TracedModel


def bundled_sentences() -> list[str]:
    """The English sentences shipped with the package (written for this project)."""
    text = resources.files("residual_trace").joinpath("data/sentences.txt").read_text("utf-8")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


#: Control characters (C0, DEL, C1) and Unicode's line and paragraph separators.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_LINE_END = re.compile("\r\n|\r|\n")


def normalise_text(text: str) -> str:
    r"""What every text goes through, from ``--text``, a file or the API alike.

    A leading UTF-8 byte-order mark is dropped, every control character (tab, CR, LF, ...)
    and line or paragraph separator is replaced by a space, and the ends are stripped.

    Examples:
        >>> normalise_text("\ufeffThe dog\r\nran.\t")
        'The dog  ran.'
    """
    return _CONTROL.sub(" ", text.removeprefix("\ufeff")).strip()


def read_texts(path: Path | str) -> list[str]:
    """One text per non-blank line of a UTF-8 file, each through :func:`normalise_text`.

    A byte-order mark is dropped; LF, CRLF and CR all end a line.
    """
    try:
        content = Path(path).read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise UserError(f"--file {path}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"--file {path}: is a directory, expected a text file") from None
    except UnicodeDecodeError:
        raise UserError(f"--file {path}: not UTF-8 text") from None
    except OSError as error:
        raise UserError(f"--file {path}: {error.strerror or error}") from None
    texts = [normalise_text(line) for line in _LINE_END.split(content)]
    texts = [text for text in texts if text]
    if not texts:
        raise UserError(f"--file {path}: holds no text (one text per non-blank line)")
    return texts


def load_inputs(texts: Texts, name: str = "texts") -> tuple[list[str], str]:
    """The texts of a run and a description of their source (for ``run.json``).

    ``texts`` is checked by :func:`~residual_trace.experiments.options.texts_argument`: a
    value of another type, a list holding a non-string or one string that looks like a file
    name is a one-line :class:`UserError` (``name`` is what the message calls it).
    """
    given = texts_argument(texts, name)
    if given is None:
        return bundled_sentences(), "bundled sentences (residual_trace/data/sentences.txt)"
    if isinstance(given, Path):
        return read_texts(given), str(given)
    if not given:
        raise UserError(f"{name}: no text given (an empty list)")
    return [normalise_text(text) for text in given], "texts given"


def resolve_model(model: ModelArg, warn: Warn) -> TracedModel:
    """``model`` itself, the model a name resolves to, or what a loader returns.

    A name resolves to a model on the default device.
    """
    check_environment()  # again, right before a model loads (the options checked it first)
    from residual_trace.models import TracedModel, load_model  # torch: only once it is needed

    if isinstance(model, TracedModel):
        return model
    if isinstance(model, str):
        return load_model(model, on_convert=lambda m: warn(f"note: {m}"))
    if callable(model):
        return model()
    raise UserError(f"model: expected a loaded model or a name, got {type(model).__name__}")


def model_record(model: TracedModel) -> dict[str, Any]:
    """The model block of ``run.json``: where the weights came from and their shape."""
    return {
        "name": model.name,
        "source": model.resolved.source,
        "directory": str(model.resolved.directory),
        "revision": model.resolved.revision,
        "weights_sha256": model.resolved.weights_sha256,
        **model.spec.describe(),
        "n_blocks": model.n_blocks,
        "d_model": model.d_model,
        "n_heads": model.n_heads,
        "d_vocab": model.d_vocab,
        "device": str(model.device),
        "dtype": str(model.dtype).removeprefix("torch."),
        "device_map": model.device_map,
    }


def inputs_record(texts: Sequence[str], source: str) -> dict[str, Any]:
    """What ``run.json`` records of the inputs: where they came from, how many, their hash."""
    return {"source": source, "n_texts": len(texts), "texts_sha256": texts_sha256(texts)}
