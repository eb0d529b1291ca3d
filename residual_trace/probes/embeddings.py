"""Type-level vectors, one per concept word, from a model.

- ``static``: the mean of the word's subword rows of the input embedding matrix W_E (the
  paper's layer 0; no position, no context).
- ``isolated``: the word alone through the model ([CLS] word [SEP], or BOS word), the mean of
  its subword states at each residual layer.
- ``contextual``: the mean over the word's occurrences in a corpus (one text per line) of the
  mean of its subword states, at each residual layer. Words that never occur are reported.

Decoders see a word with its leading space (`` cat``), as it appears inside a sentence.
Words the tokenizer can only map to its unknown token are reported and left out.

``isolated`` and ``contextual`` vectors of every layer come from one pass and are cached in
``$RESIDUAL_TRACE_CACHE/embeddings/`` keyed by the weights' hash, the mode, the words and
the corpus, so a second run (another layer, mapper or norm set over the same words) is fast.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from residual_trace.errors import UserError, write_fault
from residual_trace.models import TracedModel, cache_dir
from residual_trace.models.resolve import cache_setting
from residual_trace.probes import EMBEDDINGS
from residual_trace.tracer import iter_batches, prepare_texts
from residual_trace.tracer.batching import EncodedText
from residual_trace.tracer.words import is_whole_word

MODES = EMBEDDINGS


@dataclass
class WordVectors:
    """Vectors of the words that could be embedded.

    Attributes:
        words: the embedded words, in input order.
        vectors: ``[word, layer, d_model]`` (one layer, 0, for ``static``).
        layers: the residual layers of axis 1.
        dropped: word -> why it was left out.
        occurrences: for ``contextual``, how many occurrences each vector averages.
    """

    words: list[str]
    vectors: np.ndarray
    layers: list[int]
    dropped: dict[str, str] = field(default_factory=dict)
    occurrences: list[int] | None = None

    def at(self, layer: int) -> np.ndarray:
        """``[word, d_model]`` at residual layer ``layer``."""
        if layer not in self.layers:
            raise UserError(f"layer {layer} was not embedded (have {self.layers})")
        return self.vectors[:, self.layers.index(layer)]


def word_pieces(model: TracedModel, word: str) -> list[int]:
    """The word's subword ids as they appear inside a text (no special tokens)."""
    form = " " + word if model.spec.family == "decoder" else word
    return [int(i) for i in model.tokenizer(form, add_special_tokens=False)["input_ids"]]


def representable(model: TracedModel, words: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """The words the tokenizer can represent, and why each other one was left out."""
    unknown = model.tokenizer.unk_token_id
    kept, dropped = [], {}
    for word in words:
        pieces = word_pieces(model, word)
        if not pieces:
            dropped[word] = "no tokens"
        elif unknown is not None and unknown in pieces:
            dropped[word] = "the tokenizer maps it to its unknown token"
        else:
            kept.append(word)
    return kept, dropped


def _with_specials(model: TracedModel, pieces: list[int]) -> tuple[list[int], int]:
    """The sequence a word is run alone as, and where its pieces start."""
    if model.spec.family == "decoder":
        bos = model.tokenizer.bos_token_id
        prefix = [] if bos is None else [int(bos)]
        return [*prefix, *pieces], len(prefix)
    cls, sep = model.tokenizer.cls_token_id, model.tokenizer.sep_token_id
    return [int(cls), *pieces, int(sep)], 1


#: Bumped whenever the vectors a mode computes change (2: contextual occurrences are whole
#: words only), so that no cached vector of an earlier definition is read back.
CACHE_VERSION = 2


def _cache_path(model: TracedModel, mode: str, words: Sequence[str], corpus: Sequence[str]) -> Path:
    digest = hashlib.sha256()
    key = [CACHE_VERSION, model.resolved.weights_sha256, mode, list(words)]
    digest.update(json.dumps(key).encode())
    for text in corpus:
        digest.update(text.encode("utf-8") + b"\n")
    return (
        cache_dir()
        / "embeddings"
        / f"{model.resolved.name.replace('/', '-')}-{mode}-{digest.hexdigest()[:20]}.npz"
    )


def _cached(path: Path) -> dict[str, np.ndarray] | None:
    if not path.is_file():
        return None
    try:
        with np.load(path) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError):
        return None


def _store(path: Path, vectors: np.ndarray, counts: np.ndarray | None) -> None:
    """Write atomically: a killed run never leaves a half-written cache entry.

    A fault of the machine (a full disk) is one line naming the file and the cache setting.
    """
    try:
        _write_entry(path, vectors, counts)
    except OSError as error:
        raise write_fault(error, f"{cache_setting()}; --no-cache skips it", path) from None


def _write_entry(path: Path, vectors: np.ndarray, counts: np.ndarray | None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=path.parent, suffix=".npz.tmp")
    os.close(handle)
    try:
        with open(name, "wb") as stream:
            if counts is None:
                np.savez(stream, vectors=vectors)
            else:
                np.savez(stream, vectors=vectors, counts=counts)
        os.replace(name, path)
    finally:
        if os.path.exists(name):
            os.unlink(name)


def embed_words(
    model: TracedModel,
    words: Sequence[str],
    mode: str = "static",
    corpus: Sequence[str] = (),
    batch_size: int = 64,
    use_cache: bool = True,
    progress: Callable[[int], None] | None = None,
) -> WordVectors:
    """Type-level vectors of ``words`` (see the module docstring)."""
    if mode not in MODES:
        raise UserError(f"--embedding {mode}: expected one of {', '.join(MODES)}")
    if mode == "contextual" and not corpus:
        raise UserError("--embedding contextual needs a corpus (--corpus FILE, one text a line)")
    kept, dropped = representable(model, words)
    if mode == "static":
        vectors = np.stack([model.W_E[word_pieces(model, w)].mean(0).cpu().numpy() for w in kept])
        return WordVectors(kept, vectors[:, None].astype(np.float64), [0], dropped)
    layers = list(range(model.n_blocks + 1))
    path = _cache_path(model, mode, kept, corpus if mode == "contextual" else ())
    cached = _cached(path) if use_cache else None
    if cached is None:
        if mode == "isolated":
            vectors, counts = _isolated(model, kept, batch_size, progress), None
        else:
            vectors, counts = _contextual(model, kept, corpus, batch_size, progress)
        if use_cache:
            _store(path, vectors, counts)
    else:
        vectors, counts = cached["vectors"], cached.get("counts")
    result = WordVectors(kept, vectors.astype(np.float64), layers, dropped)
    if counts is not None:
        seen = counts > 0
        for word in np.asarray(kept)[~seen]:
            result.dropped[str(word)] = "does not occur in the corpus"
        result.words = [w for w, s in zip(kept, seen, strict=True) if s]
        result.vectors = result.vectors[seen]
        result.occurrences = [int(c) for c in counts[seen]]
    return result


def _resid_names(model: TracedModel) -> list[str]:
    return [model.spec.resid_hook(k) for k in range(model.n_blocks + 1)]


@torch.inference_mode()
def _isolated(
    model: TracedModel,
    words: Sequence[str],
    batch_size: int,
    progress: Callable[[int], None] | None,
) -> np.ndarray:
    names = _resid_names(model)
    out = np.zeros((len(words), len(names), model.d_model), dtype=np.float32)
    spans = []  # where each word's pieces sit in its sequence
    encoded = []
    for index, word in enumerate(words):
        pieces = word_pieces(model, word)
        sequence, first = _with_specials(model, pieces)
        spans.append((first, first + len(pieces)))
        encoded.append(EncodedText(text_id=index, ids=tuple(sequence), truncated=False))
    for batch in iter_batches(encoded, batch_size, model.pad_id):
        store = model.run_hooks(batch.ids, batch.mask, names)
        stacked = torch.stack([store[n] for n in names], dim=1)  # [batch, layer, pos, d]
        for row, item in enumerate(batch.texts):
            start, end = spans[item.text_id]
            out[item.text_id] = stacked[row, :, start:end].mean(1).cpu().numpy()
        if progress is not None:
            progress(len(batch.texts))
    return out


@torch.inference_mode()
def _contextual(
    model: TracedModel,
    words: Sequence[str],
    corpus: Sequence[str],
    batch_size: int,
    progress: Callable[[int], None] | None,
) -> tuple[np.ndarray, np.ndarray]:
    names = _resid_names(model)
    pieces = {w: tuple(word_pieces(model, w)) for w in words}
    by_first: dict[int, list[int]] = {}
    for index, word in enumerate(words):
        by_first.setdefault(pieces[word][0], []).append(index)
    sums = np.zeros((len(words), len(names), model.d_model), dtype=np.float64)
    counts = np.zeros(len(words), dtype=np.int64)
    encoded = prepare_texts(model, corpus)
    for batch in iter_batches(encoded, batch_size, model.pad_id):
        store = model.run_hooks(batch.ids, batch.mask, names)
        stacked = torch.stack([store[n] for n in names], dim=1).cpu().numpy()
        for row, item in enumerate(batch.texts):
            ids = item.ids
            offsets = None
            for position, token in enumerate(ids):
                for index in by_first.get(token, ()):
                    span = pieces[words[index]]
                    if tuple(ids[position : position + len(span)]) == span:
                        end = position + len(span)
                        if offsets is None:
                            offsets = model.token_offsets(item.text, ids)
                        if not is_whole_word(item.text, offsets, position, end):
                            continue  # "dog" inside "doghouse" is not an occurrence of "dog"
                        sums[index] += stacked[row, :, position:end].mean(1)
                        counts[index] += 1
        if progress is not None:
            progress(len(batch.texts))
    means = sums / np.maximum(counts, 1)[:, None, None]
    return means.astype(np.float32), counts
