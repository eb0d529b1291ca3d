"""Probes: metrics against hand-computed values, norm loaders on small files in each
published layout, controls by construction, and cross-validation on data whose answer is
known (targets that are a function of the embeddings, and targets that are not)."""

from __future__ import annotations

import numpy as np
import pytest

from residual_trace.errors import UserError
from residual_trace.probes.controls import (
    random_features,
    structured_nonsense,
    within_category_permutation,
)
from residual_trace.probes.evaluate import applicable_metrics, evaluate, summarise, verdicts
from residual_trace.probes.mappers import fit_predict
from residual_trace.probes.metrics import (
    f1_at_k,
    neighbourhood_accuracy,
    spearman_per_concept,
    spearman_per_feature,
)
from residual_trace.probes.norms import Norms, load_norms

# -- metrics -----------------------------------------------------------------------------------


def test_f1_at_10_by_hand():
    gold = np.zeros((3, 30))
    gold[0, :13] = 1.0  # 13 gold features, predicted perfectly: P = 1, R = 10/13
    gold[1, [0, 1]] = [5.0, 2.0]  # 2 gold features, both in the top 10: P = 0.2, R = 1
    gold[2, 20:25] = 1.0  # 5 gold features, none predicted
    predicted = np.zeros((3, 30))
    predicted[0] = gold[0] + np.linspace(0, 0.1, 30)[::-1]
    predicted[1, :10] = np.arange(10, 0, -1)
    predicted[2, :10] = 1.0
    scores = f1_at_k(predicted, gold, k=10)
    assert scores[0] == pytest.approx(2 * 1.0 * (10 / 13) / (1.0 + 10 / 13))
    assert round(scores[0], 3) == 0.870
    assert scores[1] == pytest.approx(2 * 0.2 * 1.0 / 1.2)
    assert scores[2] == 0.0
    # a concept without gold features is undefined, not zero
    assert np.isnan(f1_at_k(predicted[:1], np.zeros((1, 30)))[0])


def test_top_features_are_the_highest_predicted_not_the_lowest():
    gold = np.zeros((1, 20))
    gold[0, 10:] = 1.0
    rising = np.arange(20.0)[None]  # highest values on the gold features
    assert f1_at_k(rising, gold)[0] == pytest.approx(1.0)
    assert f1_at_k(-rising, gold)[0] == 0.0


def test_neighbourhood_accuracy_by_hand():
    rng = np.random.default_rng(0)
    candidates = rng.normal(size=(30, 8))
    # predicting the concept's own gold vector is a hit
    assert neighbourhood_accuracy(candidates[:5], candidates[:5], candidates).tolist() == [1.0] * 5
    # a prediction whose 10 nearest gold vectors exclude the concept scores 0
    own = candidates[0]
    others = candidates[1:]
    prediction = others[:10].mean(axis=0) * 10.0 - own * 5.0
    sims = (
        candidates @ prediction / (np.linalg.norm(candidates, axis=1) * np.linalg.norm(prediction))
    )
    assert (sims[1:] > sims[0]).sum() >= 10  # the construction excludes it
    assert neighbourhood_accuracy(prediction[None], own[None], candidates)[0] == 0.0


def test_spearman_against_scipy():
    from scipy.stats import spearmanr

    rng = np.random.default_rng(1)
    predicted, gold = rng.normal(size=(6, 9)), rng.normal(size=(6, 9))
    gold[2, 3] = gold[2, 4]  # a tie
    ours = spearman_per_concept(predicted, gold)
    for i in range(6):
        assert ours[i] == pytest.approx(spearmanr(predicted[i], gold[i]).statistic)
    per_feature = spearman_per_feature(predicted, gold)
    assert per_feature[4] == pytest.approx(spearmanr(predicted[:, 4], gold[:, 4]).statistic)
    gold[0, 0] = np.nan  # Binder's "na": left out of that concept's correlation
    assert spearman_per_concept(predicted, gold)[0] == pytest.approx(
        spearmanr(predicted[0, 1:], gold[0, 1:]).statistic
    )
    assert np.isnan(spearman_per_concept(predicted[:1], np.ones((1, 9))))[0]


# -- loaders ------------------------------------------------------------------------------------


def test_mcrae_layout(tmp_path):
    path = tmp_path / "CONCS_FEATS_concstats_brm.txt"
    rows = [
        "Concept\tFeature\tWB_Label\tBR_Label\tProd_Freq",
        "bear_(animal)\ta_mammal\tsuperordinate\ttaxonomic\t12",
        "bear_(animal)\thas_fur\tsomething\tvisual-form_and_surface\t20",
        "bear_(animal)\tis_large\tsomething\tvisual-form_and_surface\t9",
        "bat_(animal)\ta_mammal\tsuperordinate\ttaxonomic\t15",
        "bat_(animal)\tflies\tsomething\tvisual-motion\t22",
        "bat_(baseball)\tmade_of_wood\tsomething\tvisual-form_and_surface\t18",
        "axe\tan_tool\tsuperordinate\ttaxonomic\t19",
        "axe\tis_sharp\tsomething\ttactile\t17",
    ]
    path.write_text("\n".join(rows) + "\n")
    norms = load_norms(f"mcrae:{path}")
    assert norms.sparse and norms.concepts == ("axe", "bat", "bear")
    bear = dict(zip(norms.features, norms.values[2], strict=True))
    assert bear["has_fur"] == 20 and bear["a_mammal"] == 12 and bear["flies"] == 0
    assert norms.categories == {"axe": "tool", "bat": "mammal", "bear": "mammal"}
    # the two senses of "bat" collide: reported, the first kept (it flies, no wood)
    assert any("bat_(animal) / bat_(baseball) -> bat" in note for note in norms.notes)
    bat = dict(zip(norms.features, norms.values[1], strict=True))
    assert bat["flies"] == 22 and "made_of_wood" not in norms.features


def test_buchanan_layout(tmp_path):
    path = tmp_path / "cue_feature_words.csv"
    path.write_text(
        "cue,feature,translated,frequency_feature,normalized_translated\n"
        "apple,red,red,20,0.4\napple,fruits,fruit,30,0.6\nzebra,stripe,stripe,25,0.8\n"
    )
    norms = load_norms(f"buchanan:{path}")
    assert norms.concepts == ("apple", "zebra") and norms.features == ("fruit", "red", "stripe")
    np.testing.assert_allclose(norms.values, [[0.6, 0.4, 0.0], [0.0, 0.0, 0.8]])


def test_binder_layout_with_missing_ratings(tmp_path):
    path = tmp_path / "WordSet1_Ratings.csv"
    path.write_text(
        "Word,Super Category,Category,No,Vision,Bright,Dark\n"
        "bee,Concrete,Insect,1,5.2,na,1.0\n"
        "dog,Concrete,Mammal,2,5.9,2.1,0.3\n"
        "idea,Abstract,Mental,3,0.4,0.2,na\n"
    )
    norms = load_norms(f"binder:{path}")
    assert norms.features == ("Vision", "Bright", "Dark") and not norms.sparse
    assert np.isnan(norms.values[0, 1]) and np.isnan(norms.values[2, 2])
    assert norms.values[1, 0] == pytest.approx(5.9)
    assert norms.categories == {"bee": "Insect", "dog": "Mammal", "idea": "Mental"}
    assert any("2 missing rating(s)" in note for note in norms.notes)


def test_generic_wide_and_long(tmp_path):
    wide = tmp_path / "wide.csv"
    wide.write_text("word,size,speed\ncat,2,5\nsnail,1,0.1\n")
    norms = load_norms(f"wide:{wide}")
    assert norms.concepts == ("cat", "snail") and norms.values.tolist() == [[2, 5], [1, 0.1]]
    long = tmp_path / "long.csv"
    long.write_text("concept,feature,value\ncat,purrs,3\ncat,has_fur,5\nsnail,slow,4\n")
    norms = load_norms(f"long:{long}")
    assert norms.sparse and norms.features == ("has_fur", "purrs", "slow")


@pytest.mark.parametrize(
    ("spec_of", "content", "fragment"),
    [
        (
            lambda p: f"mcrae:{p}",
            "Concept\tFeature\nbear\thas_fur\n",
            "missing column(s) BR_Label, Prod_Freq",
        ),
        (lambda p: f"buchanan:{p}", "cue,feature\napple,red\n", "missing column(s) translated"),
        (lambda p: f"binder:{p}", "word,Vision\nbee,3\n", "missing column(s) Word"),
        (lambda p: f"wide:{p}", "word,size,colour\ncat,2,grey\n", "colour is not numeric"),
        (lambda p: f"wide:{p}", "name,size\ncat,2\n", "no word column"),
        (lambda p: "mcrae:/no/such/file.txt", "", "no such file"),
        (lambda p: f"xml:{p}", "", "expected one of lancaster"),
    ],
)
def test_wrong_layouts_name_what_is_missing(tmp_path, spec_of, content, fragment):
    path = tmp_path / "norms.txt"
    path.write_text(content)
    with pytest.raises(UserError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        load_norms(spec_of(path))


def test_bundled_lancaster_norms():
    norms = load_norms("lancaster")
    assert norms.features[:2] == ("Visual", "Auditory") and len(norms.concepts) > 30_000
    assert not norms.sparse and np.nanmax(norms.values) <= 5.0
    both = load_norms("lancaster+concreteness")
    assert both.features[-1] == "Concreteness" and set(both.concepts) <= set(norms.concepts)
    metrics, notes = applicable_metrics(norms)
    assert metrics == ["spearman", "na_at_10"] and "F1@10 left out" in notes[0]


# -- controls -------------------------------------------------------------------------------------


def test_controls_keep_what_they_promise():
    rng = np.random.default_rng(0)
    values = np.maximum(rng.normal(size=(80, 12)) @ rng.normal(size=(12, 20)), 0)
    random = random_features(values, np.random.default_rng(1))
    np.testing.assert_array_equal((random == 0).sum(axis=0), (values == 0).sum(axis=0))
    nonsense = structured_nonsense(values, np.random.default_rng(2))
    assert np.linalg.matrix_rank(nonsense - nonsense.mean(0)) <= np.linalg.matrix_rank(values) + 1
    zero_share = (nonsense == 0).mean(axis=0)
    np.testing.assert_allclose(zero_share, (values == 0).mean(axis=0), atol=1.5 / 80)
    categories = ["a", "a", "b", "b", "b", None, "c"]
    order = within_category_permutation(categories, np.random.default_rng(3))
    for i, j in enumerate(order):
        assert categories[i] == categories[j]
    assert order[5] == 5 and order[6] == 6


# -- known answers -------------------------------------------------------------------------------


def _constructed(linear: bool, n: int = 240, d: int = 24, f: int = 16) -> tuple[np.ndarray, Norms]:
    rng = np.random.default_rng(7)
    embeddings = rng.normal(size=(n, d))
    if linear:
        targets = embeddings @ rng.normal(size=(d, f))
    else:
        targets = rng.normal(size=(n, 4)) @ rng.normal(size=(4, f))  # structured, independent
    norms = Norms(
        "wide", tuple(f"c{i}" for i in range(n)), tuple(f"f{j}" for j in range(f)), targets, False
    )
    return embeddings, norms


@pytest.mark.parametrize("mapper", ["plsr", "ridge", "ffnn"])
def test_linear_targets_score_near_perfect_and_their_shuffle_falls_to_chance(mapper):
    embeddings, norms = _constructed(linear=True)
    scores = evaluate(
        embeddings, norms, mappers=[mapper], conditions=["system", "shuffled", "upper"], folds=4
    )
    summary = summarise(scores).set_index(["condition", "metric"])["score"]
    assert summary["system", "spearman"] > 0.9
    assert summary["system", "na_at_10"] > 0.9
    assert abs(summary["shuffled", "spearman"]) < 0.1
    # chance for NA@10 among 240 concepts is 10/240
    assert summary["shuffled", "na_at_10"] < 3 * 10 / 240
    assert summary["upper", "spearman"] > 0.9


def test_independent_targets_score_at_chance_in_every_condition_but_upper():
    embeddings, norms = _constructed(linear=False)
    conditions = ["system", "shuffled", "random", "nonsense", "upper", "shuffled-upper"]
    scores = evaluate(embeddings, norms, mappers=["ridge"], conditions=conditions, folds=4)
    summary = summarise(scores)
    means = summary.set_index(["condition", "metric"])["score"]
    for condition in ("system", "shuffled", "random", "nonsense", "shuffled-upper"):
        assert abs(means[condition, "spearman"]) < 0.1, condition
        assert means[condition, "na_at_10"] < 3 * 10 / 240, condition
    assert means["upper", "spearman"] > 0.9
    verdict = verdicts(summary).set_index("metric")
    assert not verdict.loc["spearman", "beats_controls"]


def test_capacity_is_chosen_inside_the_training_fold():
    """The test rows cannot influence the choice: poisoning them changes no prediction
    of the other test rows and no chosen size."""
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(120, 10)), rng.normal(size=(120, 3))
    clean = fit_predict("plsr", x[:100], y[:100], x[100:], seed=0)
    poisoned_x = x[100:].copy()
    poisoned_x[0] = 1e6
    poisoned = fit_predict("plsr", x[:100], y[:100], poisoned_x, seed=0)
    assert clean.size == poisoned.size
    np.testing.assert_allclose(clean.predictions[1:], poisoned.predictions[1:])


def test_taxonomic_corruption_runs_only_with_categories():
    from dataclasses import replace

    embeddings, norms = _constructed(linear=True)
    conditions = ["system", "taxonomic"]
    without = evaluate(embeddings, norms, mappers=["ridge"], conditions=conditions, folds=3)
    assert set(without["condition"]) == {"system"}
    categories = {c: f"group{i % 4}" for i, c in enumerate(norms.concepts)}
    with_categories = replace(norms, categories=categories)
    scores = evaluate(
        embeddings, with_categories, mappers=["ridge"], conditions=conditions, folds=3
    )
    means = summarise(scores).set_index(["condition", "metric"])["score"]
    # vectors swapped within 4 large categories no longer match their concepts' norms
    assert means["taxonomic", "na_at_10"] < means["system", "na_at_10"] - 0.5
