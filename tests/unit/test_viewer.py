"""viewer.html's data: quantisation, the size budget, equality with the CSVs, Result.show()."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest

import residual_trace as rt
from residual_trace.errors import UserError
from residual_trace.viewer import pack, unpack
from residual_trace.viewer.page import fit

TEXTS = ["The dog chased the cat.", "Rain fell on the old town.", "Yes."]


def _views(page: str) -> list[dict]:
    found = re.findall(r'<script type="application/json" class="rt-data">(.*?)</script>', page)
    return [json.loads(text.replace("<\\/", "</")) for text in found]


@pytest.mark.parametrize("bits", [8, 16])
def test_quantised_values_are_within_half_a_step(bits):
    rng = np.random.default_rng(0)
    values = rng.normal(size=(7, 9))
    values[2, 3] = np.nan
    packed = pack(values, bits)
    back = unpack(packed)
    step = (packed["hi"] - packed["lo"]) / (2**bits - 2)
    assert np.isnan(back[2, 3]) and np.isfinite(np.delete(back.ravel(), 2 * 9 + 3)).all()
    assert np.nanmax(np.abs(back - values)) <= step / 2 + 1e-12
    # a fixed range clips what lies outside it
    assert unpack(pack(np.array([-1.0, 0.5, 2.0]), bits, 0.0, 1.0))[[0, 2]].tolist() == [0.0, 1.0]


def test_the_budget_drops_to_8_bits_then_leaves_units_out():
    grids = [np.random.default_rng(k).random((40, 40)) for k in range(6)]
    units = [lambda bits, g=g: {"arr": pack(g, bits)} for g in grids]
    everything = fit(units, 10**9)
    assert everything.bits == 16 and everything.left_out == 0 and len(everything.payloads) == 6
    one_16 = len(json.dumps(units[0](16)))
    one_8 = len(json.dumps(units[0](8)))
    assert one_8 < one_16
    tight = fit(units, 3 * one_8 + 10)
    assert tight.bits == 8 and len(tight.payloads) == 3 and tight.left_out == 3
    assert "3 " in tight.note("map") and "not drawn" in tight.note("map")


def test_decompose_page_holds_the_csv_values_and_nothing_remote(tiny_models):
    model = tiny_models["bert"]
    result = rt.decompose(model, TEXTS, per_head=True, viewer_texts=2, quiet=True)
    page = result.viewer_html()
    assert page is not None and not re.search(r"https?:", page)
    assert "default-src 'none'" in page  # the browser refuses any request the page might make
    (view,) = _views(page)
    pairs, heads = result.tables["mixing_pairs"], result.tables["attention_heads"]
    assert sorted(t["id"] for t in view["texts"]) == [0, 1]
    assert len(view["maps"]) == 2 * model.n_blocks * (5 + model.n_heads)
    for item in view["maps"]:
        t, b, measure = item["text"], item["block"], item["measure"]
        got = unpack(item["arr"])
        step = (item["arr"]["hi"] - item["arr"]["lo"]) / (2 ** item["arr"]["bits"] - 2)
        if measure.startswith("head"):
            rows = heads[(heads["text_id"] == t) & (heads["block"] == b)
                         & (heads["head"] == int(measure[4:]))]  # fmt: skip
            column = "attention"
        else:
            rows = pairs[(pairs["text_id"] == t) & (pairs["block"] == b)]
            column = measure
        want = rows[column].to_numpy()
        assert np.nanmax(np.abs(got[rows["target"], rows["source"]] - want)) <= step / 2 + 1e-9


def test_lens_and_patch_pages_hold_their_tables(tiny_models):
    model = tiny_models["gpt2"]
    lens = rt.lens(model, TEXTS, quiet=True)
    (view,) = _views(lens.viewer_html())
    table = lens.lens[lens.lens["site"] == "post"]
    grid = next(g for g in view["grids"] if g["text"] == 1)
    rows = table[table["text_id"] == 1].sort_values(["position", "layer"])
    assert [view["vocab"][k] for k in grid["top"]] == [
        rt.figures.tokens.clean_token(str(t)) for t in rows["top_token"]
    ]
    prob = unpack(next(a for a in grid["arrs"] if a["colour"] == "top_prob")["arr"]).ravel()
    assert np.abs(prob - rows["top_prob"].to_numpy()).max() <= 1 / 65534
    clean, corrupt = "The dog chased the cat.", "The cat chased the cat."
    patch = rt.patch(model, clean=[clean], corrupt=[corrupt], answer="the", wrong="a",
                     sites=("resid",), quiet=True)  # fmt: skip
    (view,) = _views(patch.viewer_html())
    (item,) = view["maps"]
    cells = patch.patch[patch.patch["condition"] == "patch"]
    effect = cells.pivot_table(index="position", columns="layer", values="effect").to_numpy()
    step = (item["arr"]["hi"] - item["arr"]["lo"]) / 65534
    assert np.nanmax(np.abs(unpack(item["arr"]) - effect)) <= step / 2 + 1e-9


def test_show_puts_the_page_in_a_sandboxed_iframe(tiny_models, monkeypatch):
    import html

    import IPython.display

    shown = []
    monkeypatch.setattr(IPython.display, "display", lambda obj: shown.append(obj))
    result = rt.perturb(tiny_models["bert"], TEXTS, quiet=True)
    result.show()
    (frame,) = shown
    assert isinstance(frame, IPython.display.HTML)
    srcdoc = re.search(r'srcdoc="([^"]*)"', frame.data)
    assert srcdoc and html.unescape(srcdoc.group(1)) == result.viewer_html()
    assert 'sandbox="allow-scripts"' in frame.data
    with pytest.raises(UserError, match="no viewer"):
        rt.layers(tiny_models["bert"], TEXTS, quiet=True).show()


def test_a_verb_without_texts_for_the_viewer_writes_no_page(tiny_models, tmp_path):
    result = rt.decompose(tiny_models["bert"], TEXTS, viewer_texts=0, quiet=True)
    assert result.viewer_html() is None
    written = result.save(tmp_path / "out")
    assert "viewer.html" not in {p.name for p in written}
    assert isinstance(result.tables["mixing_pairs"], pd.DataFrame)
