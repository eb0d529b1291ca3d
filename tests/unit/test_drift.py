"""Token drift on tiny seeded models, against an independent Hugging Face + NumPy reference."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from residual_trace import drift_table
from residual_trace.tracer import encode_texts, iter_drift
from tests.reference import hidden_states, reference_drift

KINDS = ["bert", "gpt2", "llama"]
FLOAT_COLUMNS = [
    "cos_input",
    "cos_layer0",
    "baseline",
    "cos_input_normed",
    "baseline_normed",
    "emb_proj",
    "norm_ratio",
    "top_dim_share",
]


def _aligned(ours: pd.DataFrame, ref: pd.DataFrame) -> pd.DataFrame:
    keys = ["text_id", "position", "layer"]
    assert len(ours) == len(ref)
    merged = ours.merge(ref, on=keys, suffixes=("", "_ref"), validate="one_to_one")
    assert len(merged) == len(ref)
    return merged


@pytest.mark.parametrize("kind", KINDS)
def test_drift_matches_hugging_face(kind, tiny_models, tiny_dirs, sentences):
    model = tiny_models[kind]
    ours = drift_table(model, sentences, batch_size=4)
    ref = reference_drift(tiny_dirs[kind], kind, sentences, prepend_bos=kind != "bert")
    merged = _aligned(ours, ref)
    assert (merged["token_id"] == merged["token_id_ref"]).all()
    assert (merged["is_special"] == merged["is_special_ref"]).all()
    for column in FLOAT_COLUMNS:
        np.testing.assert_allclose(
            merged[column], merged[f"{column}_ref"], atol=1e-4, rtol=1e-4, err_msg=column
        )
    assert (merged["vocab_rank"] == merged["vocab_rank_ref"]).all()
    assert (merged["vocab_rank_normed"] == merged["vocab_rank_normed_ref"]).all()
    # the layer count is n_blocks + 1 and layer 0 is the embedding output
    assert sorted(ours["layer"].unique()) == list(range(model.n_blocks + 1))
    assert np.allclose(ours.loc[ours["layer"] == 0, "cos_layer0"], 1.0, atol=1e-5)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_normed_variant_differs_from_raw_for_pre_norm(kind, tiny_models, sentences):
    # the fixtures' norms have random gains, so the variant must not silently equal raw
    table = drift_table(tiny_models[kind], sentences)
    later = table[table["layer"] > 0]
    assert not np.allclose(later["cos_input"], later["cos_input_normed"], atol=1e-3)


def test_post_ln_normed_equals_raw(tiny_models, sentences):
    table = drift_table(tiny_models["bert"], sentences)
    assert np.array_equal(table["cos_input"], table["cos_input_normed"])
    assert np.array_equal(table["vocab_rank"], table["vocab_rank_normed"])


@pytest.mark.parametrize("kind", KINDS)
def test_batch_size_does_not_change_numbers(kind, tiny_models, sentences):
    model = tiny_models[kind]
    tables = [drift_table(model, sentences, batch_size=b) for b in (1, 3, 16)]
    for other in tables[1:]:
        assert other[["text_id", "position", "layer", "token_id"]].equals(
            tables[0][["text_id", "position", "layer", "token_id"]]
        )
        for column in FLOAT_COLUMNS:
            # float32 states: 1e-5 absolute, or float32 precision relative to the value
            # (norm_ratio reaches ~80, where one ulp is 7.6e-6)
            np.testing.assert_allclose(other[column], tables[0][column], atol=1e-5, rtol=1e-6)
        assert (other["vocab_rank"] == tables[0]["vocab_rank"]).all()


@pytest.mark.parametrize("kind", KINDS)
def test_padding_is_never_measured(kind, tiny_models, sentences):
    model = tiny_models[kind]
    lengths = [len(e.ids) for e in encode_texts(model, sentences, 64)]
    assert len(set(lengths)) > 1, "the texts must need padding for this test to mean anything"
    table = drift_table(model, sentences, batch_size=len(sentences))
    assert len(table) == sum(lengths) * (model.n_blocks + 1)
    for text_id, length in enumerate(lengths):
        positions = table.loc[table["text_id"] == text_id, "position"].unique()
        assert sorted(positions) == list(range(length))


def test_special_tokens_flagged(tiny_models):
    bert = drift_table(tiny_models["bert"], ["The dog chased the cat."])
    first = bert[bert["layer"] == 0].sort_values("position")
    assert first["token"].iloc[0] == "[CLS]" and first["token"].iloc[-1] == "[SEP]"
    assert first["is_special"].tolist() == [True] + [False] * (len(first) - 2) + [True]
    gpt2 = drift_table(tiny_models["gpt2"], ["The dog chased the cat."])
    first = gpt2[gpt2["layer"] == 0].sort_values("position")
    assert first["token"].iloc[0] == "<|endoftext|>"  # BOS prepended, TransformerLens-style
    assert first["is_special"].tolist() == [True] + [False] * (len(first) - 1)


def test_truncation_warns_and_keeps_special_tokens(tiny_models, sentences):
    warnings: list[str] = []
    long_text = sentences[-1]
    frames = list(
        iter_drift(
            tiny_models["bert"],
            [long_text, "Yes."],
            max_length=6,
            warn=warnings.append,
        )
    )
    table = pd.concat(frames)
    assert len(warnings) == 1 and "truncated" in warnings[0] and "text ids 0" in warnings[0]
    first = table[(table["text_id"] == 0) & (table["layer"] == 0)].sort_values("position")
    assert len(first) == 6 and first["token"].iloc[-1] == "[SEP]"


@pytest.mark.parametrize("kind", KINDS)
def test_capture_equals_hugging_face_states_and_patterns(kind, tiny_models, tiny_dirs):
    model = tiny_models[kind]
    ids = model.encode("The bank by the river was covered in reeds.")
    batch = torch.tensor([ids + [model.pad_id] * 3])
    mask = torch.tensor([[1] * len(ids) + [0] * 3])
    captured = model.capture(batch, mask, patterns=True)
    states, attentions = hidden_states(tiny_dirs[kind], kind, ids)
    assert captured.resid.shape[0] == len(states) == model.n_blocks + 1
    for layer, state in enumerate(states):
        np.testing.assert_allclose(
            captured.resid[layer, 0, : len(ids)].numpy(), state, atol=1e-5, rtol=1e-4
        )
    assert captured.patterns is not None
    for block, attention in enumerate(attentions):
        pattern = captured.patterns[block, 0, :, : len(ids), : len(ids)].numpy()
        np.testing.assert_allclose(pattern, attention, atol=1e-5)


def test_empty_text_is_refused(tiny_models):
    from residual_trace import UserError

    with pytest.raises(UserError, match="empty"):
        drift_table(tiny_models["bert"], ["fine", "   "])


def test_the_measures_refuse_a_bad_batch_size_or_length_in_the_options_words(tiny_models):
    """The tracer's keywords are the options of ``trace layers``: a bad value is refused
    with the option's name and flag, as the options class refuses it."""
    from residual_trace import UserError

    model = tiny_models["bert"]
    with pytest.raises(UserError, match=r"^batch_size \(--batch-size\): must be at least 1"):
        drift_table(model, ["A text."], batch_size=0)
    with pytest.raises(UserError, match=r"^max_length \(--max-length\): must be at least 2"):
        drift_table(model, ["A text."], max_length=1)
