"""Token-vs-position alignment on heads whose answer is known by construction, and the
perturbation generators."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import residual_trace as rt
from residual_trace.errors import UserError
from residual_trace.tracer.alignment import align_patterns, js_similarity
from residual_trace.tracer.perturbations import (
    identity,
    pair_swaps,
    random_tokens,
    shuffle,
    shuffled_embeddings,
    swap_spans,
    word_span,
)


def _softmax_rows(scores: torch.Tensor, causal: bool) -> torch.Tensor:
    if causal:
        n = scores.shape[-1]
        scores = scores.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
    return torch.softmax(scores, dim=-1)


def positional_head(n: int, causal: bool) -> torch.Tensor:
    """Attention that depends only on positions: mostly the previous token."""
    scores = torch.full((n, n), -8.0)
    scores[torch.arange(1, n), torch.arange(n - 1)] = 8.0
    scores[0, 0] = 8.0
    return _softmax_rows(scores, causal)[None]


def token_head(ids: list[int], table: torch.Tensor, causal: bool) -> torch.Tensor:
    """Attention that depends only on token identities: score(query token, key token)."""
    index = torch.tensor(ids)
    return _softmax_rows(table[index][:, index], causal)[None]


IDS = [101, 11, 12, 13, 14, 15, 16, 17, 18, 102]
SPECIAL = [True] + [False] * 8 + [True]


def _indices(original_of, causal: bool, seeds: int = 10) -> list[float]:
    """Token-following index per shuffle (NaN: the shuffle left no informative row)."""
    original = original_of(IDS)
    out = []
    for seed in range(seeds):
        p = shuffle(IDS, SPECIAL, seed)
        result = align_patterns(
            original, original_of(list(p.ids)), torch.tensor(p.permutation), causal
        )
        out.append(float(result.follow_index[0]))
    return out


@pytest.mark.parametrize("causal", [False, True])
def test_position_following_head_scores_minus_one(causal):
    indices = _indices(lambda ids: positional_head(len(ids), causal), causal)
    assert np.isfinite(indices).sum() >= 5  # most shuffles give evidence
    assert np.nanmax(indices) == pytest.approx(-1.0, abs=1e-3)
    assert np.nanmin(indices) == pytest.approx(-1.0, abs=1e-3)


@pytest.mark.parametrize("causal", [False, True])
def test_token_following_head_scores_positive(causal):
    table = torch.randn(200, 200, generator=torch.Generator().manual_seed(0)) * 6.0
    indices = _indices(lambda ids: token_head(ids, table, causal), causal)
    assert np.isfinite(indices).sum() >= 5
    # a head driven by token identity alone reproduces the original exactly in token order
    assert np.nanmin(indices) == pytest.approx(1.0, abs=1e-3)


def test_unmoved_text_compares_no_rows():
    head = positional_head(len(IDS), causal=False)
    result = align_patterns(head, head, torch.tensor(identity(IDS).permutation), causal=False)
    assert int(result.n_rows.sum()) == 0 and torch.isnan(result.follow_index).all()


def test_js_similarity_is_symmetric_and_bounded():
    p = torch.softmax(torch.randn(6, 9), -1)
    q = torch.softmax(torch.randn(6, 9), -1)
    torch.testing.assert_close(js_similarity(p, q), js_similarity(q, p))
    assert ((js_similarity(p, q) >= 0) & (js_similarity(p, q) <= 1)).all()


@pytest.mark.parametrize(
    ("first", "second"), [((1, 2), (5, 6)), ((1, 3), (4, 7)), ((6, 9), (1, 2))]
)
def test_swapped_spans_move_every_token_to_its_new_position(first, second):
    p = swap_spans(IDS, first, second)
    for old, new in enumerate(p.permutation):
        assert p.ids[new] == IDS[old]
    assert p.ids[0] == 101 and p.ids[-1] == 102


def test_overlapping_spans_are_refused():
    with pytest.raises(UserError, match="overlap"):
        swap_spans(IDS, (1, 4), (3, 6))


def test_pair_swaps_and_random_tokens_leave_special_tokens_alone():
    swaps = list(pair_swaps(IDS, SPECIAL))
    assert len(swaps) == 8 * 7 // 2
    for p in swaps:
        assert p.permutation[0] == 0 and p.permutation[-1] == len(IDS) - 1
    replaced = random_tokens(IDS, SPECIAL, candidates=list(range(1000, 2000)), seed=1)
    assert replaced.ids[0] == 101 and replaced.ids[-1] == 102
    assert all(1000 <= t < 2000 for t in replaced.ids[1:-1])
    assert replaced.permutation == tuple(range(len(IDS)))


def _span(model, text, word):
    ids = model.encode(text)
    return ids, word_span(model, text, ids, word)[0]


def test_word_spans_in_a_real_tokenization(tiny_models):
    model = tiny_models["bert"]
    text = "The dog chased the cat."
    ids, dog = _span(model, text, "dog")
    cat = _span(model, text, "cat")[1]
    tokens = model.token_strings(ids)
    assert tokens[dog[0] : dog[1]] == ["dog"] and tokens[cat[0] : cat[1]] == ["cat"]
    p = swap_spans(ids, dog, cat)
    assert model.token_strings(list(p.ids))[1:6] == ["the", "cat", "chased", "the", "dog"]
    # words of different subword lengths swap as whole spans
    text = "The dog liked skateboarding."
    ids, long = _span(model, text, "skateboarding")
    assert long[1] - long[0] == 2
    p = swap_spans(ids, _span(model, text, "dog")[1], long)
    assert model.token_strings(list(p.ids))[1:7] == [
        "the",
        "skate",
        "##boarding",
        "liked",
        "dog",
        ".",
    ]
    with pytest.raises(UserError, match="'horse' is not a word of the text"):
        _span(model, text, "horse")
    gpt2 = tiny_models["gpt2"]
    ids, (start, end) = _span(gpt2, "The dog chased the cat.", "cat")  # with its leading space
    assert "".join(gpt2.token_strings(ids[start:end])).replace("Ġ", "") == "cat"


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
@pytest.mark.parametrize(
    ("text", "word", "at"),
    [
        ("The doghouse and the dog.", "dog", 21),  # not the piece inside "doghouse"
        ("A catalogue, a cat and a bobcat.", "cat", 15),  # not inside either neighbour
        ("Its dog-like dog barked.", "dog", 4),  # a hyphen ends a word
        ("The Dog ran; the dog sat.", "dog", 17),  # case-sensitive match first
        ("THE DOG RAN.", "dog", 4),  # ... then ignoring case, for an uncased tokenizer
    ],
)
def test_word_lookup_respects_word_boundaries(tiny_models, kind, text, word, at):
    """The span found is the first occurrence standing as a word (character ``at``), whatever
    the tokenizer does with its neighbours; its characters are exactly the word."""
    model = tiny_models[kind]
    if text.isupper() and not model.uncased:
        with pytest.raises(UserError, match="is not a word of the text"):
            word_span(model, text, model.encode(text), word)
        return
    ids = model.encode(text)
    (start, end), _ = word_span(model, text, ids, word)
    offsets = model.token_offsets(text, ids)
    first, last = offsets[start], offsets[end - 1]
    assert first is not None and last is not None
    begin = first[0] + (text[first[0]] == " ")
    assert (begin, last[1]) == (at, at + len(word))


def test_a_swapped_word_that_occurs_twice_is_named_in_the_label(tiny_models):
    model = tiny_models["bert"]
    result = rt.perturb(
        model, ["The dog saw the dog and a cat."], mode="swap", swap=("dog", "cat"), quiet=True
    )
    labels = set(result.tables["perturbations"]["label"])
    assert labels - {"identity"} == {"swap dog<->cat (first of dog x2)"}
    ids = model.encode("The dog saw the dog and a cat.")
    (first, _), count = word_span(model, "The dog saw the dog and a cat.", ids, "dog")
    assert count == 2 and model.token_strings(ids)[first] == "dog" and first == 2


def test_shuffled_embeddings_change_the_forward_and_are_restored(tiny_models):
    model = tiny_models["llama"]
    ids = torch.tensor([model.encode("The dog chased the cat.")])
    mask = torch.ones_like(ids)
    before = model.capture(ids, mask).resid
    with shuffled_embeddings(model, seed=0) as order:
        during = model.capture(ids, mask).resid
        assert not torch.equal(order, torch.arange(len(order)))
    after = model.capture(ids, mask).resid
    assert not torch.allclose(before[0], during[0])
    torch.testing.assert_close(before, after)
