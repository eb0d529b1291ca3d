"""``trace patch`` on the packaged SmolLM2, against plain Hugging Face hooks and against
TransformerLens's own patching on the same cells."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

import residual_trace as rt
from tests.families import FAMILIES
from tests.patching_reference import patched_outputs, plain_outputs

pytestmark = pytest.mark.slow

CLEAN, CORRUPT = "The Eiffel Tower is in the city of", "The Colosseum is in the city of"


@pytest.fixture(scope="module")
def traced():
    model = rt.load_model("smollm2", device="cpu")
    # every site; heads (grouped-query: 9 query heads share 3 key/value heads) at every
    # position at once
    result = rt.patch(model, clean=[CLEAN], corrupt=[CORRUPT], answer=" Paris", wrong=" Rome",
                      sites=("resid", "attn", "mlp", "head"), quiet=True)  # fmt: skip
    return model, result


def _metric(logits: torch.Tensor, answer: int, wrong: int) -> float:
    return float(logits[-1, answer] - logits[-1, wrong])


def test_cells_equal_hugging_face_hooks(traced):
    """A sample of cells of every site, to 1e-4 in the normalised effect."""
    from transformers import AutoModelForCausalLM

    model, result = traced
    hf = AutoModelForCausalLM.from_pretrained(model.resolved.directory).eval()
    family = FAMILIES["llama"]  # SmolLM2 is a Llama: the same module paths
    pair = result.tables["pairs"].iloc[0]
    answer, wrong = int(pair["answer_id"]), int(pair["wrong_id"])
    clean, corrupt = model.encode(CLEAN), model.encode(CORRUPT)
    m_clean = _metric(plain_outputs(hf, family, clean)[0], answer, wrong)
    m_corrupt = _metric(plain_outputs(hf, family, corrupt)[0], answer, wrong)
    assert pair["metric_clean"] == pytest.approx(m_clean, abs=1e-4)
    assert pair["metric_corrupt"] == pytest.approx(m_corrupt, abs=1e-4)
    rows = result.patch[result.patch["condition"] == "patch"]
    last, subject = len(clean) - 1, 3
    sample = pd.concat(
        [
            rows[(rows["site"] == "resid") & rows["layer"].isin([0, 4, 12, 23, 24, 29])
                 & rows["position"].isin([subject, last])],
            rows[rows["site"].isin(["attn", "mlp"]) & rows["block"].isin([0, 23, 28])
                 & (rows["position"] == last)],
            rows[(rows["site"] == "head") & rows["block"].isin([23, 24])],
        ]
    )  # fmt: skip
    assert len(sample) == 12 + 6 + 18
    for row in sample.itertuples(index=False):
        index = row.layer if row.site == "resid" else row.block
        where = list(range(len(clean))) if pd.isna(row.position) else [int(row.position)]
        logits, _ = patched_outputs(hf, family, row.site, [int(index)], where, int(row.head), 64,
                                    clean, corrupt)  # fmt: skip
        expected = (_metric(logits, answer, wrong) - m_corrupt) / (m_clean - m_corrupt)
        assert row.effect == pytest.approx(expected, abs=1e-4), (row.site, index, row.head)


def test_resid_equals_transformer_lens_patching(traced):
    """TransformerLens 4.3's own patching on the same cells, the same metric: ``resid_pre``
    (every layer at the last subject token and the last token) and every head's output at
    every position (``z``, two blocks)."""
    from transformer_lens.patching import get_act_patch_resid_pre

    model, result = traced
    pair = result.tables["pairs"].iloc[0]
    answer, wrong = int(pair["answer_id"]), int(pair["wrong_id"])
    clean, corrupt = model.encode(CLEAN), model.encode(CORRUPT)
    cells = pd.DataFrame(
        [(layer, p) for layer in range(model.n_blocks) for p in (3, len(clean) - 1)],
        columns=["layer", "pos"],
    )
    with torch.inference_mode():
        _, cache = model.bridge.run_with_cache(torch.tensor([clean]))
        values = get_act_patch_resid_pre(
            model.bridge,
            torch.tensor([corrupt]),
            cache,
            lambda logits: logits[0, -1, answer].double() - logits[0, -1, wrong].double(),
            index_axis_names=None,
            index_df=cells,
        )
    ours = result.patch[(result.patch["condition"] == "patch") & (result.patch["site"] == "resid")]
    ours = ours.set_index(["layer", "position"])["metric_patched"]
    for (layer, p), value in zip(cells.itertuples(index=False), values.tolist(), strict=True):
        assert ours.loc[(layer, p)] == pytest.approx(value, abs=1e-4), (layer, p)
    # every head of two blocks at every position, grouped-query (9 query heads, 3 key/value
    # heads): TransformerLens's get_act_patch_attn_head_out_all_pos agrees
    from transformer_lens.patching import get_act_patch_attn_head_out_all_pos

    heads = pd.DataFrame([(b, h) for b in (23, 24) for h in range(model.n_heads)],
                         columns=["layer", "head"])  # fmt: skip
    with torch.inference_mode():
        values = get_act_patch_attn_head_out_all_pos(
            model.bridge,
            torch.tensor([corrupt]),
            cache,
            lambda logits: logits[0, -1, answer].double() - logits[0, -1, wrong].double(),
            index_axis_names=None,
            index_df=heads,
        )
    ours = result.patch[(result.patch["condition"] == "patch") & (result.patch["site"] == "head")]
    ours = ours.set_index(["block", "head"])["metric_patched"]
    for (block, h), value in zip(heads.itertuples(index=False), values.tolist(), strict=True):
        assert ours.loc[(block, h)] == pytest.approx(value, abs=1e-4), (block, h)
    # the summary and the figures of the whole run
    assert set(result.figures()) == {"patch_resid", "patch_attn", "patch_mlp", "patch_head",
                                     "patch_summary"}  # fmt: skip
