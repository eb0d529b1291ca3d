"""Chunking follows a memory budget and does not change the results: tiny budgets (many
chunks of heads, query rows and vocabulary rows) against the default (one chunk) on the tiny
models. Element-wise work per head is bit-identical; a matrix product over fewer rows may
round differently in its last bit (BLAS picks its blocking by shape), so float columns must
agree to 1e-6 and every integer column (vocabulary ranks, counts) exactly."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import residual_trace as rt
from residual_trace.errors import UserError
from residual_trace.tracer.chunking import budget_override, chunks, items_per_chunk, memory_budget

LONG = " ".join(
    [
        "The old river ran past the town where the baker sold bread to the teacher.",
        "A dog chased the cat across the road while rain fell on the hill.",
        "Later the doctor met the farmer near the bridge and they spoke of the storm.",
    ]
)
TEXTS = [LONG, "Rain fell.", "The cat sat on the mat."]

#: Columns whose definition amplifies float32 rounding (see the test).
LOOSE_COLUMNS = ("mix_alti", "mix_alti_lo", "mix_alti_hi", "alti")

#: Small enough that every chunked step splits: a few heads, query rows or tokens at a time.
TINY_BUDGET = 64 << 10


def _tables(result) -> dict[str, pd.DataFrame]:
    return {key: table.reset_index(drop=True) for key, table in result.tables.items()}


@pytest.mark.parametrize("kind", ["bert", "llama"])
@pytest.mark.parametrize(
    "verb",
    [
        lambda m: rt.layers(m, TEXTS, quiet=True),
        lambda m: rt.decompose(m, TEXTS, per_head=True, quiet=True),
        lambda m: rt.perturb(m, TEXTS, mode="shuffle", samples=2, quiet=True),
    ],
    ids=["layers", "decompose", "perturb"],
)
def test_chunked_results_equal_unchunked(kind, verb, tiny_models):
    model = tiny_models[kind]
    whole = _tables(verb(model))
    with budget_override(TINY_BUDGET):
        chunked = _tables(verb(model))
    assert whole.keys() == chunked.keys()
    for key in whole:
        a, b = whole[key], chunked[key]
        assert list(a.columns) == list(b.columns) and len(a) == len(b), key
        floats = a.select_dtypes("floating").columns
        pd.testing.assert_frame_equal(a.drop(columns=floats), b.drop(columns=floats), obj=key)
        # ALTI's max(0, |y|_1 - |y - T|_1) subtracts two sums of d_model absolute values, so
        # the last-bit rounding of T (1e-7) reaches about 1e-5 there; 1e-6 everywhere else
        loose = [c for c in floats if c in LOOSE_COLUMNS]
        tight = [c for c in floats if c not in LOOSE_COLUMNS]
        np.testing.assert_allclose(a[tight], b[tight], rtol=0, atol=1e-6, err_msg=key)
        np.testing.assert_allclose(a[loose], b[loose], rtol=0, atol=2e-5, err_msg=key)


def test_the_tiny_budget_really_splits():
    n, d, vocab = 40, 64, 30522
    with budget_override(TINY_BUDGET):
        assert items_per_chunk(n * n * 4, temporaries=24) < 8  # heads per chunk
        assert items_per_chunk(n * d * 4, temporaries=4) < n  # query rows per chunk
        assert items_per_chunk(4 * vocab, temporaries=3) == 1  # tokens per vocabulary chunk


def test_budget_from_the_environment(monkeypatch):
    monkeypatch.setenv("RESIDUAL_TRACE_MEMORY_MB", "64")
    assert memory_budget() == 64 << 20
    monkeypatch.setenv("RESIDUAL_TRACE_MEMORY_MB", "lots")
    with pytest.raises(UserError, match="RESIDUAL_TRACE_MEMORY_MB='lots': expected a whole"):
        memory_budget()
    assert [(s.start, s.stop) for s in chunks(5, 2)] == [(0, 2), (2, 4), (4, 5)]


def test_a_long_mixing_text_keeps_its_pair_map_at_the_drawn_block_only(tiny_models, monkeypatch):
    import residual_trace.experiments.decompose as decompose

    model = tiny_models["llama"]
    one = {"mixing_block": 1, "viewer_texts": 1, "quiet": True}  # text 0's map alone
    full = rt.decompose(model, TEXTS, **one).tables["mixing_pairs"]
    n = int(np.sqrt((full["block"] == 0).sum()))
    assert sorted(full["block"].unique()) == list(range(model.n_blocks))
    # a row budget below the map of every block, above the map of one
    monkeypatch.setattr(decompose, "MAX_PAIR_ROWS", n * n * model.n_blocks - 1)
    with pytest.warns(UserWarning, match=r"mixing_pairs: text 0 has \d+ tokens.*block 1 only"):
        result = rt.decompose(model, TEXTS, **one)
    kept = result.tables["mixing_pairs"]
    assert set(kept["block"]) == {1}
    expected = full[full["block"] == 1].reset_index(drop=True)
    pd.testing.assert_frame_equal(kept.reset_index(drop=True), expected, check_exact=True)
    assert "mixing_heatmap" in result.figures()
    # a viewer text whose map does not fit is left out, with a warning
    monkeypatch.setattr(decompose, "MAX_PAIR_ROWS", n * n)
    with pytest.warns(UserWarning, match=r"viewer: text\(s\) 1 left out"):
        result = rt.decompose(model, TEXTS, mixing_block=1, viewer_texts=2, quiet=True)
    assert set(result.tables["mixing_pairs"]["text_id"]) == {0}
