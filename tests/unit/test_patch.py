"""``trace patch`` against plain Hugging Face hooks on every family, constructed cases whose
answer is known, batching that changes nothing, and one-line errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

import residual_trace as rt
from residual_trace.cli import trace
from residual_trace.errors import UserError
from tests.families import FAMILIES, save_family
from tests.patching_reference import patched_outputs, plain_outputs
from tests.unit.test_families import _hf

NAMES = list(FAMILIES)
#: Candidate pairs differing in one word; the first that tokenises to equal lengths is used.
CANDIDATES = [
    ("The cat sat on the mat and", "The dog sat on the mat and"),
    ("Rain fell on the old town and", "Snow fell on the old town and"),
    ("She walked to the river and", "He walked to the river and"),
]


@pytest.fixture(scope="module")
def patch_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("patch-families")
    return {name: save_family(root, name) for name in NAMES}


def _pair(model) -> tuple[str, str]:
    for clean, corrupt in CANDIDATES:
        if len(model.encode(clean)) == len(model.encode(corrupt)):
            return clean, corrupt
    raise AssertionError("no candidate pair tokenises to equal lengths")


def _tokens_that_move(model, hf, family, clean: str, corrupt: str) -> tuple[str, str]:
    """An answer and a wrong token the corruption moves most, in opposite directions.

    Random tiny models barely prefer any token, so fixed words leave clean - corrupt near
    1e-4 and the normalised effect at the mercy of float error; the tokens whose logit the
    corruption lowers and raises most give a span of order 0.1. Only tokens that read back
    as themselves are taken (their text encodes to the same single id).
    """
    clean_logits = plain_outputs(hf, family, model.encode(clean))[0][-1]
    corrupt_logits = plain_outputs(hf, family, model.encode(corrupt))[0][-1]
    order = torch.argsort(clean_logits - corrupt_logits, descending=True).tolist()

    def first(ids):
        for i in ids:
            text = model.tokenizer.decode([i])
            if text.strip() and model.tokenizer.encode(text, add_special_tokens=False) == [i]:
                return text
        raise AssertionError("no token reads back as itself")

    return first(order), first(reversed(order))


def _effect(value: float, clean: float, corrupt: float) -> float:
    return (value - corrupt) / (clean - corrupt)


def _hf_metric(logits: torch.Tensor, answer: int, wrong: int) -> float:
    return float(logits[-1, answer] - logits[-1, wrong])


@pytest.mark.parametrize("name", NAMES)
def test_every_site_equals_hugging_face_hooks(name, patch_dirs):
    """Each cell's metric and normalised effect (resid, attn, mlp, and every head at every
    position, per query head under grouped-query attention) equal a patched Hugging Face
    forward pass with plain PyTorch hooks (metric to 2e-6, effect to 1e-4 where the pair's
    span allows it)."""
    family = FAMILIES[name]
    model = rt.load_model(str(patch_dirs[name]), device="cpu")
    clean, corrupt = _pair(model)
    hf = _hf(patch_dirs[name], family)
    up, down = _tokens_that_move(model, hf, family, clean, corrupt)
    result = rt.patch(model, clean=[clean], corrupt=[corrupt], answer=up, wrong=down,
                      sites=("resid", "attn", "mlp", "head"), head_positions="each",
                      quiet=True)  # fmt: skip
    pair = result.tables["pairs"].iloc[0]
    answer, wrong = int(pair["answer_id"]), int(pair["wrong_id"])
    clean_ids, corrupt_ids = model.encode(clean), model.encode(corrupt)
    m_clean = _hf_metric(plain_outputs(hf, family, clean_ids)[0], answer, wrong)
    m_corrupt = _hf_metric(plain_outputs(hf, family, corrupt_ids)[0], answer, wrong)
    assert pair["metric_clean"] == pytest.approx(m_clean, abs=2e-6)
    assert pair["metric_corrupt"] == pytest.approx(m_corrupt, abs=2e-6)
    # the metric agrees to float32 error (2e-6); the normalised effect divides it by the span,
    # which a random tiny model keeps small (5e-3 for the tiny BERT): 1e-4, or what 4e-6 of
    # metric error becomes at that span
    tolerance = max(1e-4, 4e-6 / abs(m_clean - m_corrupt))
    d_head = model.d_model // model.n_heads
    rows = result.patch[result.patch["condition"] == "patch"]
    assert set(rows["site"]) == {"resid", "attn", "mlp", "head"}
    assert len(rows) == len(clean_ids) * model.n_blocks * (3 + model.n_heads)
    for row in rows.itertuples(index=False):
        index = row.layer if row.site == "resid" else row.block
        logits, _ = patched_outputs(hf, family, row.site, [int(index)], [int(row.position)],
                                    int(row.head), d_head, clean_ids, corrupt_ids)  # fmt: skip
        value = _hf_metric(logits, answer, wrong)
        assert row.metric_patched == pytest.approx(value, abs=2e-6), (row.site, index)
        expected = _effect(value, m_clean, m_corrupt)
        assert row.effect == pytest.approx(expected, abs=tolerance), (row.site, index, row.position)


def test_noising_and_windows_equal_hugging_face_hooks(patch_dirs):
    """Noising (corrupt states into the clean run) and a window of two MLP blocks, on a
    grouped-query model."""
    family = FAMILIES["llama"]
    model = rt.load_model(str(patch_dirs["llama"]), device="cpu")
    clean, corrupt = _pair(model)
    clean_ids, corrupt_ids = model.encode(clean), model.encode(corrupt)
    hf = _hf(patch_dirs["llama"], family)
    up, down = _tokens_that_move(model, hf, family, clean, corrupt)
    base = {"clean": [clean], "corrupt": [corrupt], "answer": up, "wrong": down, "quiet": True}
    noised = rt.patch(model, **base, sites=("resid",), direction="noising")
    windowed = rt.patch(model, **base, sites=("mlp",), window=2)
    pair = noised.tables["pairs"].iloc[0]
    answer, wrong = int(pair["answer_id"]), int(pair["wrong_id"])
    m_clean = _hf_metric(plain_outputs(hf, family, clean_ids)[0], answer, wrong)
    m_corrupt = _hf_metric(plain_outputs(hf, family, corrupt_ids)[0], answer, wrong)
    for row in noised.patch[noised.patch["condition"] == "patch"].itertuples(index=False):
        logits, _ = patched_outputs(hf, family, "resid", [int(row.layer)], [int(row.position)],
                                    -1, 0, corrupt_ids, clean_ids)  # fmt: skip
        expected = _effect(_hf_metric(logits, answer, wrong), m_clean, m_corrupt)
        assert row.effect == pytest.approx(expected, abs=1e-4)
    rows = windowed.patch[windowed.patch["condition"] == "patch"]
    assert (rows["window"] == 2).all()
    for row in rows.itertuples(index=False):
        blocks = [b for b in (row.block - 1, row.block) if b >= 0]  # window 2: b - 1 and b
        logits, _ = patched_outputs(hf, family, "mlp", blocks, [int(row.position)], -1, 0,
                                    clean_ids, corrupt_ids)  # fmt: skip
        expected = _effect(_hf_metric(logits, answer, wrong), m_clean, m_corrupt)
        assert row.effect == pytest.approx(expected, abs=1e-4)


def test_state_cos_on_an_encoder_without_a_head(tiny_dirs, tiny_models):
    """state-cos needs no head: the cosine of the final state (here at the patched position
    itself) to the clean run's, against Hugging Face's last hidden state."""
    from transformers import AutoModel

    model = tiny_models["bert"]
    clean, corrupt = _pair(model)
    result = rt.patch(model, clean=[clean], corrupt=[corrupt], metric="state-cos", at="same",
                      sites=("resid",), quiet=True)  # fmt: skip
    hf = AutoModel.from_pretrained(tiny_dirs["bert"], attn_implementation="eager").eval()
    clean_ids, corrupt_ids = model.encode(clean), model.encode(corrupt)
    with torch.no_grad():
        reference = hf(torch.tensor([clean_ids])).last_hidden_state[0].double()
        plain = hf(torch.tensor([corrupt_ids])).last_hidden_state[0].double()
    layer = hf.encoder.layer

    for row in result.patch[result.patch["condition"] == "patch"].itertuples(index=False):
        p = int(row.position)
        source: dict = {}

        def keep(m, a, k, source=source):
            source["h"] = (a[0] if a else k["hidden_states"]).clone()

        handle = layer[int(row.layer)].register_forward_pre_hook(keep, with_kwargs=True)
        with torch.no_grad():
            hf(torch.tensor([clean_ids]))
        handle.remove()

        def restore(m, a, k, p=p, source=source):
            h = (a[0] if a else k["hidden_states"]).clone()
            h[0, p] = source["h"][0, p]
            return ((h, *a[1:]), k) if a else (a, {**k, "hidden_states": h})

        handle = layer[int(row.layer)].register_forward_pre_hook(restore, with_kwargs=True)
        with torch.no_grad():
            patched = hf(torch.tensor([corrupt_ids])).last_hidden_state[0].double()
        handle.remove()
        cos = torch.nn.functional.cosine_similarity
        value = float(cos(patched[p], reference[p], dim=0))
        low = float(cos(plain[p], reference[p], dim=0))
        if 1.0 - low < 1e-6:  # nothing to restore at this position: no effect
            assert np.isnan(row.effect)
            continue
        assert row.metric_patched == pytest.approx(value, abs=1e-5)
        assert row.effect == pytest.approx(_effect(value, 1.0, low), abs=1e-4)


def test_constructed_cases(patch_dirs):
    """Restoring every position of one residual layer restores the clean run exactly (1);
    in a decoder, positions before the first differing token restore nothing (0) at every
    layer; the floor (the target patched with its own states) is 0 up to float error."""
    from residual_trace.tracer.patching import EVERY, Cell, MetricSpec, run_cells, source_states

    model = rt.load_model(str(patch_dirs["qwen2"]), device="cpu")
    clean, corrupt = _pair(model)
    result = rt.patch(model, clean=[clean], corrupt=[corrupt], answer="the", wrong="a",
                      quiet=True)  # fmt: skip
    table = result.patch
    patched = table[table["condition"] == "patch"]
    before = patched[patched["position_kind"] == "before"]
    assert len(before) and (before["effect"].abs() < 1e-6).all()
    assert (table[table["condition"] == "floor"]["effect"].abs() < 1e-4).all()
    # every position of one layer, through the tracer directly
    clean_ids, corrupt_ids = model.encode(clean), model.encode(corrupt)
    hooks = [model.spec.resid_hook(k) for k in range(model.n_blocks)]
    states, final = source_states(model, clean_ids, hooks)
    pair = result.tables["pairs"].iloc[0]
    answer, wrong = int(pair["answer_id"]), int(pair["wrong_id"])
    spec = MetricSpec("logit-diff", len(clean_ids) - 1, answer, wrong, final)
    from residual_trace.models.readout import readout

    head = readout(model, "logit")
    cells = [Cell("resid", k, EVERY, -1, (k,)) for k in range(model.n_blocks)]
    values = run_cells(model, corrupt_ids, cells, states, spec, head, per_pass=4)
    np.testing.assert_allclose(values, pair["metric_clean"], atol=1e-5)


def test_batching_changes_nothing(patch_dirs):
    """One cell per pass or many: the same effects (float error only)."""
    model = rt.load_model(str(patch_dirs["gpt2"]), device="cpu")
    clean, corrupt = _pair(model)
    base = {"clean": [clean], "corrupt": [corrupt], "answer": "the", "wrong": "a",
            "sites": ("resid", "head"), "quiet": True}  # fmt: skip
    one = rt.patch(model, **base, cells_per_pass=1).patch
    many = rt.patch(model, **base, cells_per_pass=64).patch
    pd.testing.assert_frame_equal(one.drop(columns=["effect", "metric_patched"]),
                                  many.drop(columns=["effect", "metric_patched"]))  # fmt: skip
    np.testing.assert_allclose(one["effect"], many["effect"], atol=1e-5)


def test_summary_over_pairs_and_position_kinds(patch_dirs, tmp_path):
    """Two pairs from a TSV file: the summary is each cell's mean over pairs with a bootstrap
    interval, by absolute position (equal lengths) and by position kind; the CLI writes the
    tables and figures."""
    model = rt.load_model(str(patch_dirs["gpt2"]), device="cpu")
    pairs = [p for p in CANDIDATES if len(model.encode(p[0])) == len(model.encode(p[1]))]
    assert len(pairs) >= 2
    lengths = {len(model.encode(p[0])) for p in pairs[:2]}
    file = tmp_path / "pairs.tsv"
    file.write_text("clean\tcorrupt\tanswer\twrong\n"
                    + "".join(f"{c}\t{x}\tthe\ta\n" for c, x in pairs[:2]))  # fmt: skip
    result = rt.patch(model, pairs=file, sites=("resid",), quiet=True)
    table, summary = result.patch, result.summary
    assert sorted(set(table["pair_id"])) == [0, 1]
    patched = table[table["condition"] == "patch"]
    by_kind = summary[(summary["condition"] == "patch") & (summary["position_kind"] != "")]
    for row in by_kind.itertuples(index=False):
        cells = patched[
            (patched["layer"] == row.layer) & (patched["position_kind"] == row.position_kind)
        ]
        per_pair = cells.groupby("pair_id")["effect"].mean()
        assert row.effect == pytest.approx(per_pair.mean(), nan_ok=True)
        assert row.n_pairs == per_pair.notna().sum()
        if row.n_pairs == 2:
            assert row.effect_lo <= row.effect + 1e-12 and row.effect <= row.effect_hi + 1e-12
    by_position = summary[(summary["condition"] == "patch") & summary["position"].notna()]
    if len(lengths) == 1:  # equal lengths: also one row per layer x absolute position
        assert len(by_position) == model.n_blocks * lengths.pop()
    else:
        assert by_position.empty
    out = tmp_path / "out"
    args = ["patch", "--model", str(patch_dirs["gpt2"]), "--pairs", str(file), "--site", "resid"]
    run = CliRunner().invoke(trace, [*args, "--out", str(out), "--quiet"])
    assert run.exit_code == 0, run.output
    for name in ("patch.csv", "summary.csv", "pairs.csv", "run.json", "patch_resid.png",
                 "patch_summary.png"):  # fmt: skip
        assert (out / name).is_file(), name
    written = pd.read_csv(out / "patch.csv")
    np.testing.assert_allclose(written["effect"], table["effect"], atol=1e-9)


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"clean": ["a b c"], "corrupt": []}, "1 --clean and 0 --corrupt texts"),
        ({"metric": "logit-diff", "wrong": ""}, "logit-diff needs a wrong token"),
        ({"at": "same"}, "same reads the patched position itself: state-cos only"),
        ({"at": "middle"}, "expected last, same or a position number"),
        ({"window": 0}, r"window \(--window\): must be at least 1, got 0"),
        ({"pairs": Path("/no/such/pairs.tsv"), "clean": [], "corrupt": []}, "no such file"),
        ({"corrupt_noise": True, "subject": ["cat"]}, "--corrupt-noise corrupts the --clean"),
        ({"corrupt_noise": True, "corrupt": [], "subject": ["a", "b"]}, "2 --subject for 1"),
        (
            {"corrupt_noise": True, "corrupt": [], "subject": ["cat"], "samples": 0},
            "samples \\(--samples\\): must be between 1 and 1,000",
        ),
        ({"subject": ["cat"]}, "--subject names the words --corrupt-noise corrupts"),
    ],
)
def test_bad_options_are_one_line_errors(changes, fragment):
    given = {"clean": ["The cat sat."], "corrupt": ["The dog sat."], "answer": "the",
             "wrong": "a", **changes}  # fmt: skip
    with pytest.raises(UserError, match=fragment) as error:
        rt.patch("minilm", **given)
    assert "\n" not in str(error.value)


def test_bad_pairs_are_refused_before_any_pass(tiny_dirs, tiny_models, tmp_path):
    """Unequal lengths name the pair and both lengths; an answer of several tokens lists
    them; a model without a head is refused for logit metrics with the way out; a malformed
    pairs file names its line. On the command line each is one line and exit 1."""
    gpt2 = tiny_models["gpt2"]
    with pytest.raises(UserError, match=r"pair 0: the clean text is \d+ tokens and the corrupt"):
        rt.patch(gpt2, clean=["The cat sat."], corrupt=["The enormous dog sat down."],
                 answer="the", wrong="a")  # fmt: skip
    with pytest.raises(UserError, match=r"--answer 'xqzvbnmwk' \(pair 0\) is \d+ tokens"):
        rt.patch(gpt2, clean=["The cat sat."], corrupt=["The dog sat."], answer="xqzvbnmwk",
                 wrong="a")  # fmt: skip
    with pytest.raises(UserError, match="--metric state-cos needs no output head"):
        rt.patch(tiny_models["bert"], clean=["The cat sat."], corrupt=["The dog sat."],
                 answer="the", wrong="a")  # fmt: skip
    with pytest.raises(UserError, match=r"--subject 'horse' \(text 0\) does not occur"):
        rt.patch(gpt2, clean=["The cat sat."], corrupt_noise=True, subject=["horse"], answer="the")
    bad = tmp_path / "bad.tsv"
    bad.write_text("only one field\n")
    with pytest.raises(UserError, match="line 1 has 1 tab-separated field"):
        rt.patch(gpt2, pairs=bad, answer="the", wrong="a")
    out = tmp_path / "out"
    args = ["patch", "--model", str(tiny_dirs["gpt2"]), "--clean", "The cat sat."]
    args += ["--corrupt", "The enormous dog sat down.", "--answer", "the", "--wrong", "a"]
    run = CliRunner().invoke(trace, [*args, "--out", str(out)])
    assert run.exit_code == 1 and run.output.startswith("Error: pair 0")
    assert run.output.count("\n") == 1 and "Traceback" not in run.output
    assert not out.exists()


def test_noise_corruption_equals_hugging_face_hooks(patch_dirs):
    """--corrupt-noise, as Meng et al.: Gaussian noise of 3 x the standard deviation of the
    subjects' embedding states (computed here from Hugging Face's block-0 input) added to the
    subject's tokens; each sample a corrupt run, each cell restored from the clean run (over
    the noise, at layer 0) against the same computation with Hugging Face hooks."""
    from residual_trace.experiments.patch import _noise_seed
    from residual_trace.tracer.patching import gaussian_noise
    from tests.patching_reference import record

    family = FAMILIES["llama"]
    model = rt.load_model(str(patch_dirs["llama"]), device="cpu")
    text = "The cat sat on the mat and"
    hf = _hf(patch_dirs["llama"], family)
    ids = model.encode(text)
    result = rt.patch(model, clean=[text], corrupt_noise=True, subject=["cat sat"], answer="the",
                      samples=2, sites=("resid", "mlp"), seed=5, quiet=True)  # fmt: skip
    table = result.patch
    subject = sorted(set(table[table["position_kind"].str.startswith("subject")]["position"]))
    spans = model.token_offsets(text, ids)
    assert subject == [i for i, s in enumerate(spans) if s and s[0] < 11 and s[1] > 4]
    answer = int(result.tables["pairs"]["answer_id"].iloc[0])
    blocks = hf.model.layers
    kept: dict = {}

    def keep(m, a, k):
        kept["h"] = (a[0] if a else k["hidden_states"]).detach().clone()

    handle = blocks[0].register_forward_pre_hook(keep, with_kwargs=True)
    with torch.no_grad():
        clean_logits = hf(torch.tensor([ids])).logits[0, -1].double()
    handle.remove()
    sigma = float(kept["h"][0, subject].float().std())
    rows = table[table["condition"] == "patch"]
    sources = {  # what the plain clean run holds at each cell's site, before any noise
        (site, index): record(hf, family, site, [index], ids)
        for site in ("resid", "mlp")
        for index in range(model.n_blocks)
    }

    def logprob(logits):
        return float(torch.log_softmax(logits, -1)[answer])

    for sample in (0, 1):
        noise = gaussian_noise(
            len(subject), model.d_model, 3.0 * sigma, _noise_seed(5, 0, sample, 0)
        )

        def noisy(m, a, k, noise=noise):
            h = (a[0] if a else k["hidden_states"]).clone()
            h[0, subject] += noise
            return ((h, *a[1:]), k) if a else (a, {**k, "hidden_states": h})

        handle = blocks[0].register_forward_pre_hook(noisy, with_kwargs=True)
        try:
            with torch.no_grad():
                corrupt_logits = hf(torch.tensor([ids])).logits[0, -1].double()
            for row in rows[rows["sample"] == sample].itertuples(index=False):
                index = int(row.layer if row.site == "resid" else row.block)
                # the noise hook runs first (registered first), then the restoring one
                where, source = [int(row.position)], sources[(row.site, index)]
                logits, _ = patched_outputs(hf, family, row.site, [index], where, -1, 0, ids, ids,
                                            source)  # fmt: skip
                expected = (logprob(logits[-1]) - logprob(corrupt_logits)) / (
                    logprob(clean_logits) - logprob(corrupt_logits)
                )
                assert row.effect == pytest.approx(expected, abs=1e-4), (sample, row.site, index)
        finally:
            handle.remove()
    floor = table[table["condition"] == "floor"]
    assert len(floor) and floor["effect"].abs().max() > 1e-3  # a second draw is not the first
    assert result.tables["pairs"]["n_samples"].iloc[0] == 2
