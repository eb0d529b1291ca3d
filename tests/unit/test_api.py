"""The Python API: every experiment in memory, ``save`` writing exactly what the CLI writes,
nothing written before it, and one vocabulary (``layer``, ``block``, ``L{block}H{head}``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

import residual_trace as rt
from residual_trace.cli import trace
from residual_trace.errors import UserError
from residual_trace.naming import head_name, parse_head_name

TEXTS = ["The dog chased the cat.", "A cat sat near the dog in the rain."]
WORDS = [  # probe concepts: single tokens in the tiny BERT vocabulary
    "dog", "cat", "horse", "cow", "bird", "fish", "apple", "bread", "stone", "river",
    "tree", "house", "car", "boat", "chair", "table", "knife", "cup", "shoe", "hat",
    "rain", "snow", "fire", "sun", "moon", "book", "door", "wall", "road", "hill",
]  # fmt: skip


@pytest.fixture
def norms_file(tmp_path: Path) -> Path:
    """A wide-layout norm file whose first two features are linear in nothing we know: the
    point here is plumbing, not a score."""
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(rng.uniform(0, 5, size=(len(WORDS), 4)), columns=list("ABCD"))
    frame.insert(0, "word", WORDS)
    path = tmp_path / "norms" / "norms.csv"
    path.parent.mkdir()
    frame.round(3).to_csv(path, index=False)
    return path


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _api_calls(model, norms: Path):
    return {
        "layers": lambda: rt.layers(model, TEXTS, seed=1),
        "decompose": lambda: rt.decompose(model, TEXTS, per_head=True, seed=1),
        "perturb": lambda: rt.perturb(model, TEXTS, mode="shuffle", samples=2, seed=1),
        "probe": lambda: rt.probe(
            model,
            norms=f"wide:{norms}",
            layers=(0, 2),
            mappers=("ridge",),
            folds=3,
            conditions=("system", "shuffled"),
            use_cache=False,
            seed=1,
        ),
    }


def test_no_api_call_writes_a_file(tiny_models, norms_file, tmp_path, monkeypatch):
    """Every experiment runs in memory: the working directory, the norms' directory and the
    cache directory stay as they were until ``save``."""
    work, cache = tmp_path / "work", tmp_path / "cache"
    work.mkdir()
    cache.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("RESIDUAL_TRACE_CACHE", str(cache))
    before = _files(tmp_path)
    for name, call in _api_calls(tiny_models["bert"], norms_file).items():
        result = call()
        assert result.tables, name
        assert _files(tmp_path) == before, f"{name} wrote {sorted(_files(tmp_path) - before)}"
        figures = result.figures()
        assert figures and _files(tmp_path) == before
        for figure in figures.values():
            assert figure.axes  # something was drawn


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_results_have_tables_figures_and_a_short_repr(kind, tiny_models, norms_file):
    model = tiny_models[kind]
    expected = {
        "layers": {"drift", "summary", "texts"},
        "decompose": {"decompose", "mixing", "summary", "cumulative", "mixing_pairs", "heads",
                      "head_summary", "attention_heads"},
        "perturb": {"perturbations", "resid", "heads", "summary", "resid_summary"},
        "probe": {"scores", "summary", "verdicts", "concepts"},
    }  # fmt: skip
    for name, call in _api_calls(model, norms_file).items():
        if name == "probe" and kind != "bert":
            continue  # the probe's words are single tokens of the BERT vocabulary
        result = call()
        assert set(result.tables) == expected[name], name
        for key, frame in result.tables.items():
            assert isinstance(frame, pd.DataFrame) and len(frame), (name, key)
        text = repr(result)
        assert len(text) < 400 and "\n" not in text
        assert model.name in text and name in text


def _cli(args: list[str]):
    return CliRunner().invoke(trace, args, catch_exceptions=False)


@pytest.mark.parametrize(
    ("command", "api", "extra"),
    [
        ("layers", "layers", ["--save-attention"]),
        ("decompose", "decompose", ["--per-head", "--mixing-block", "0"]),
        ("perturb", "perturb", ["--mode", "shuffle", "--samples", "2", "--show-head", "L1H2"]),
    ],
)
def test_cli_and_api_give_identical_tables_and_files(tiny_dirs, tiny_models, tmp_path, command,
                                                      api, extra):  # fmt: skip
    """The CLI is parse + options + API call + save: byte-identical tables, the same files."""
    out = tmp_path / "cli"
    args = [command, "-m", str(tiny_dirs["gpt2"]), "-o", str(out), "--seed", "5", "-q"]
    for text in TEXTS:
        args += ["--text", text]
    result = _cli(args + extra)
    assert result.exit_code == 0, result.output
    options = {
        "layers": {"save_attention": True},
        "decompose": {"per_head": True, "mixing_block": 0},
        "perturb": {"mode": "shuffle", "samples": 2, "show_heads": ("L1H2",)},
    }[api]
    from_api = getattr(rt, api)(tiny_models["gpt2"], TEXTS, seed=5, quiet=True, **options)
    for key, frame in from_api.tables.items():
        written = (out / f"{key}.csv").read_text(encoding="utf-8")
        assert frame.to_csv(index=False) == written, key
    saved = from_api.save(tmp_path / "api")
    assert {p.name for p in saved} == {p.name for p in out.iterdir()}
    assert _files(tmp_path / "api") == _files(out)
    cli_run = json.loads((out / "run.json").read_text())
    api_run = json.loads((tmp_path / "api" / "run.json").read_text())
    assert cli_run["options"] == api_run["options"] and cli_run["model"] == api_run["model"]


def test_probe_cli_and_api_give_identical_tables(tiny_dirs, tiny_models, norms_file, tmp_path):
    out = tmp_path / "cli"
    args = ["probe", "-m", str(tiny_dirs["bert"]), "-o", str(out), "-q", "--no-cache",
            "--norms", f"wide:{norms_file}", "--layers", "0,2", "--mapper", "ridge",
            "--folds", "3", "--condition", "system", "--condition", "shuffled"]  # fmt: skip
    result = _cli(args)
    assert result.exit_code == 0, result.output
    from_api = rt.probe(
        tiny_models["bert"],
        norms=f"wide:{norms_file}",
        layers=(0, 2),
        mappers=("ridge",),
        folds=3,
        conditions=("system", "shuffled"),
        use_cache=False,
        quiet=True,
    )
    for key, frame in from_api.tables.items():
        assert frame.to_csv(index=False) == (out / f"{key}.csv").read_text(), key


def test_save_writes_nothing_on_failure_and_refuses_a_bad_format(tiny_models, tmp_path):
    result = rt.layers(tiny_models["gpt2"], TEXTS)
    with pytest.raises(UserError, match="figure_format"):
        result.save(tmp_path / "x", figure_format="jpg")
    assert list(tmp_path.iterdir()) == []
    files = result.save(tmp_path / "x", figure_format="svg")
    assert all(p.exists() for p in files) and (tmp_path / "x" / "token_drift.svg").exists()


def test_options_are_checked_with_their_names(tiny_models):
    model = tiny_models["gpt2"]
    cases = [
        (lambda: rt.layers(model, TEXTS, batch_size=0), "batch_size (--batch-size)"),
        (lambda: rt.layers(model, TEXTS, batch_size="4"), "expected an integer"),
        (lambda: rt.perturb(model, TEXTS, mode="scramble"), "one of swap, shuffle"),
        (lambda: rt.perturb(model, TEXTS, mode="shuffle", swap=("a", "b")), "swap (--swap)"),
        (lambda: rt.perturb(model, TEXTS, show_heads=("3.7",)), "L<block>H<head>"),
        (lambda: rt.perturb(model, TEXTS, show_heads=("L7H0",)), "blocks 0..1"),
        (lambda: rt.decompose(model, TEXTS, mixing_block=2), "blocks 0..1"),
        (lambda: rt.layers(model, TEXTS, heatmap_text=2), "only 2 text(s)"),
        (lambda: rt.probe(model, folds=1), "folds (--folds)"),
        (lambda: rt.report(max_texts="5"), "max_texts (--max-texts): expected an integer"),
        (lambda: rt.report(models=()), "at least one model"),
        (lambda: rt.report(perturb_samples=0), "perturb_samples: must be between 1 and"),
        (lambda: rt.layers(model, TEXTS, seed=-3), "seed (--seed): must be between 0"),
        (lambda: rt.probe(model, embedding="static", layers=(0, 1)), "layers (--layers)"),
    ]
    for call, fragment in cases:
        with pytest.raises(UserError) as error:
            call()
        assert fragment in str(error.value) and "\n" not in str(error.value)


def test_texts_can_be_a_list_one_string_a_file_or_the_bundled_sentences(tiny_models, tmp_path):
    model = tiny_models["gpt2"]
    path = tmp_path / "texts.txt"
    path.write_text("\n".join(TEXTS) + "\n\n", encoding="utf-8")
    from_list = rt.layers(model, TEXTS).tables["drift"]
    from_file = rt.layers(model, path)
    assert from_file.tables["drift"].equals(from_list) and from_file.source == str(path)
    one = rt.layers(model, TEXTS[0]).tables["texts"]
    assert one["text"].tolist() == [TEXTS[0]]
    bundled = rt.layers(model, None, batch_size=64).tables["texts"]
    assert bundled["text"].tolist() == rt.bundled_sentences()


def test_a_model_name_or_a_loader_is_accepted(tiny_dirs, tiny_models):
    by_name = rt.layers(str(tiny_dirs["gpt2"]), TEXTS).tables["drift"]
    by_loader = rt.layers(lambda: tiny_models["gpt2"], TEXTS).tables["drift"]
    assert by_name.equals(by_loader)


def test_one_vocabulary_blocks_heads_and_layers(tiny_models):
    """Residual-state tables count ``layer`` 0..L; block and head tables count ``block``
    0..L-1 and name heads ``L{block}H{head}``."""
    model = tiny_models["bert"]
    n = model.n_blocks
    drift = rt.layers(model, TEXTS).tables
    assert sorted(drift["drift"]["layer"].unique()) == list(range(n + 1))
    decomposed = rt.decompose(model, TEXTS, per_head=True).tables
    perturbed = rt.perturb(model, TEXTS, mode="shuffle", samples=2).tables
    for table in (
        decomposed["decompose"],
        decomposed["mixing"],
        decomposed["summary"],
        decomposed["heads"],
        decomposed["head_summary"],
        perturbed["perturbations"],
        perturbed["heads"],
        perturbed["summary"],
    ):
        assert "layer" not in table and sorted(table["block"].unique()) == list(range(n))
    for table in (decomposed["heads"], perturbed["heads"], perturbed["perturbations"]):
        pairs = zip(table["block"], table["head"], strict=True)
        expected = [head_name(int(b), int(h)) for b, h in pairs]
        assert table["head_name"].tolist() == expected
    assert sorted(perturbed["resid_summary"]["layer"].unique()) == list(range(n + 1))
    cumulative = decomposed["cumulative"]
    sources = set(cumulative["source"])
    assert {"embed", "bias", "L0_attn", "L0_mlp", f"L{n - 1}_mlp"} <= sources
    blocks = cumulative.dropna(subset=["source_block"])
    assert (blocks["source_block"] < blocks["layer"]).all()  # only earlier blocks feed a layer
    for frame in [*drift.values(), *decomposed.values(), *perturbed.values()]:
        assert "index" not in frame.columns and "n" not in frame.columns
        for column in frame.columns:
            if column.endswith("_lo"):
                assert column[:-3] + "_hi" in frame.columns


def test_head_names_round_trip():
    assert parse_head_name("L2H7") == (2, 7) and parse_head_name(" l0h11 ") == (0, 11)
    for bad in ("2.7", "L2", "H7", "L-1H2", "layer2head7"):
        with pytest.raises(UserError, match="L<block>H<head>"):
            parse_head_name(bad)
    with pytest.raises(UserError, match=r"blocks 0\.\.5"):
        parse_head_name("L6H0", n_blocks=6, n_heads=12)


def test_readme_documents_every_column_of_every_table(tiny_models, norms_file):
    """Every column of every table an experiment returns (and so writes) is on that verb's
    documentation page."""
    from tests.helpers import docs_page

    tables: dict[str, pd.DataFrame] = {}
    for name, call in _api_calls(tiny_models["bert"], norms_file).items():
        tables.update({f"{name}/{k}": v for k, v in call().tables.items()})
    missing = sorted(
        {f"{key}: {column}" for key, frame in tables.items() for column in frame.columns
         if f"`{column}`" not in docs_page(key.split("/")[0])}
    )  # fmt: skip
    assert not missing, missing


def test_public_api_is_lazy_and_complete():
    """``import residual_trace`` loads no torch; every name in ``__all__`` resolves."""
    import subprocess
    import sys

    code = (
        "import sys, residual_trace as rt; assert 'torch' not in sys.modules; "
        "assert 'layers' in dir(rt); print(len(rt.__all__))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ}, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    for name in rt.__all__:
        assert getattr(rt, name) is not None
