"""Perturbations that move or replace tokens, each with the permutation it applied.

The permutation says where every token went (``permutation[i]`` = new position of the token at
position i). Special tokens ([CLS], [SEP], BOS) always stay in place.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from residual_trace.errors import UserError
from residual_trace.models import TracedModel
from residual_trace.tracer.words import word_spans


@dataclass(frozen=True)
class Perturbation:
    """A perturbed token sequence and where each original token went.

    Attributes:
        kind: ``swap``, ``shuffle``, ``random-token`` or ``identity`` (the noise floor).
        ids: the perturbed token ids (same length as the original).
        permutation: ``permutation[i]`` is the new position of original position i
            (the identity for ``random-token``: tokens change, positions do not move).
        label: a short description (``swap dog<->cat``, ``shuffle seed 3``).
    """

    kind: str
    ids: tuple[int, ...]
    permutation: tuple[int, ...]
    label: str

    def __post_init__(self) -> None:
        """Refuse a ``permutation`` that is not a permutation of the positions."""
        if sorted(self.permutation) != list(range(len(self.ids))):
            raise ValueError("permutation must be a permutation of the positions")


def _apply(ids: Sequence[int], permutation: Sequence[int]) -> tuple[int, ...]:
    moved = [0] * len(ids)
    for old, new in enumerate(permutation):
        moved[new] = ids[old]
    return tuple(moved)


def identity(ids: Sequence[int]) -> Perturbation:
    """The unperturbed text, for the noise floor."""
    n = len(ids)
    return Perturbation("identity", tuple(ids), tuple(range(n)), "identity")


def swap_spans(
    ids: Sequence[int], first: tuple[int, int], second: tuple[int, int], label: str = "swap"
) -> Perturbation:
    """Exchange two non-overlapping spans ``[start, end)``, of equal or different lengths.

    Examples:
        >>> p = swap_spans([101, 1, 2, 3, 4, 102], (1, 2), (3, 5))
        >>> p.ids, p.permutation
        ((101, 3, 4, 2, 1, 102), (0, 4, 3, 1, 2, 5))
    """
    (a0, a1), (b0, b1) = sorted([first, second])
    if not (0 <= a0 < a1 <= b0 < b1 <= len(ids)):
        raise UserError("the two spans to swap must be non-empty and must not overlap")
    order = [*range(a0), *range(b0, b1), *range(a1, b0), *range(a0, a1), *range(b1, len(ids))]
    permutation = [0] * len(ids)
    for new, old in enumerate(order):
        permutation[old] = new
    return Perturbation("swap", _apply(ids, permutation), tuple(permutation), label)


def word_span(
    model: TracedModel, text: str, ids: Sequence[int], word: str
) -> tuple[tuple[int, int], int]:
    """The token span of the first whole-word occurrence of ``word``, and the occurrence count.

    The span is ``[start, end)`` in ``text``, encoded as ``ids``; the count is how many whole-word
    occurrences there are.
    """
    try:
        spans = word_spans(text, model.token_offsets(text, ids), word, model.uncased)
    except UserError as error:
        raise UserError(f"--swap: {error}") from None
    if not spans:
        raise UserError(
            f"--swap: {word!r} is not a word of the text (whole words only, within "
            f"--max-length): {text[:80]!r}"
        )
    return spans[0], len(spans)


def pair_swaps(ids: Sequence[int], special: Sequence[bool]) -> Iterator[Perturbation]:
    """Every swap of two non-special positions holding different tokens."""
    free = [i for i, s in enumerate(special) if not s]
    for x, i in enumerate(free):
        for j in free[x + 1 :]:
            if ids[i] != ids[j]:
                yield swap_spans(ids, (i, i + 1), (j, j + 1), label=f"swap {i}<->{j}")


def shuffle(ids: Sequence[int], special: Sequence[bool], seed: int) -> Perturbation:
    """A random permutation of the non-special positions that moves at least one token.

    Examples:
        >>> p = shuffle([101, 5, 6, 7, 102], [True, False, False, False, True], seed=0)
        >>> p.permutation[0], p.permutation[-1], sorted(p.permutation[1:4])
        (0, 4, [1, 2, 3])
    """
    free = [i for i, s in enumerate(special) if not s]
    if len(set(ids[i] for i in free)) < 2:
        raise UserError("shuffling needs at least two different non-special tokens")
    rng = np.random.default_rng(seed)
    while True:
        targets = rng.permutation(free)
        permutation = list(range(len(ids)))
        for old, new in zip(free, targets, strict=True):
            permutation[old] = int(new)
        moved = _apply(ids, permutation)
        if moved != tuple(ids):
            return Perturbation("shuffle", moved, tuple(permutation), f"shuffle seed {seed}")


def random_tokens(
    ids: Sequence[int], special: Sequence[bool], candidates: Sequence[int], seed: int
) -> Perturbation:
    """Replace every non-special token by a random token from ``candidates`` (positions stay)."""
    rng = np.random.default_rng(seed)
    pool = np.asarray(candidates)
    replaced = tuple(
        int(t) if s else int(pool[rng.integers(len(pool))])
        for t, s in zip(ids, special, strict=True)
    )
    n = len(ids)
    return Perturbation("random-token", replaced, tuple(range(n)), f"random tokens seed {seed}")


def replacement_candidates(model: TracedModel) -> list[int]:
    """Vocabulary ids a random-token control may draw.

    They are not special, and not a reserved placeholder such as BERT's ``[unused17]`` or a
    decoder's ``<|im_start|>``.
    """
    tokens = model.token_strings(range(model.d_vocab))
    return [
        i
        for i, token in enumerate(tokens)
        if i not in model.special_ids and not _RESERVED.match(token)
    ]


_RESERVED = re.compile(r"^(\[.*\]|<.*>)$")


def embedding_rows(model: TracedModel) -> int:
    """Rows of the input token-embedding matrix (the ids an embed-shuffle permutes)."""
    return int(model.bridge.original_model.get_input_embeddings().weight.shape[0])


def embedding_order(rows: int, seed: int, keep: Iterable[int] = ()) -> torch.Tensor:
    """A seeded permutation of ``rows`` embedding rows that leaves the rows in ``keep`` in place.

    Under it, id ``t`` reads the vector of ``order[t]``.
    """
    generator = torch.Generator().manual_seed(seed)
    kept = torch.zeros(rows, dtype=torch.bool)
    kept[[k for k in keep if 0 <= k < rows]] = True
    free = torch.nonzero(~kept).squeeze(-1)
    order = torch.arange(rows)
    order[free] = free[torch.randperm(len(free), generator=generator)]
    return order


def embed_shuffle(
    ids: Sequence[int], order: torch.Tensor, label: str = "embedding shuffle"
) -> Perturbation:
    """The input that makes the model see the embedding matrix permuted by ``order``.

    A model whose embedding rows are permuted (id ``t`` reads row ``order[t]``) computes
    exactly what the unchanged model computes on the ids ``order[t]``: the embedding is a
    row lookup and nothing before the first block reads the ids otherwise (the special
    tokens, padding included, keep their rows). Positions do not move.
    """
    mapped = tuple(int(order[t]) for t in ids)
    return Perturbation("embed-shuffle", mapped, tuple(range(len(ids))), label)


@contextmanager
def shuffled_embeddings(
    model: TracedModel, seed: int, keep: Iterable[int] = ()
) -> Iterator[torch.Tensor]:
    """Permute the rows of the input token-embedding matrix for the duration (restored after).

    Token identity is destroyed (every id now looks up another token's vector) while
    positions stay intact. Rows in ``keep`` (the special tokens, so that [CLS], [SEP] and
    BOS stay what they were, like in every other perturbation) are not moved. Yields the row
    order used (:func:`embedding_order`): id ``t`` now reads the vector of ``order[t]``.
    """
    embedding = model.bridge.original_model.get_input_embeddings().weight
    order = embedding_order(embedding.shape[0], seed, keep).to(embedding.device)
    saved = embedding.detach().clone()
    with torch.no_grad():
        embedding.copy_(saved[order])
    try:
        yield order
    finally:
        with torch.no_grad():
            embedding.copy_(saved)
