"""``trace probe`` end to end on tiny models: embeddings against Hugging Face, the cache, the
random-initialised control model, and the command line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from residual_trace.cli import trace
from residual_trace.models import random_init_copy
from residual_trace.probes.embeddings import embed_words
from tests.helpers import docs_page

WORDS = [
    "cat", "dog", "horse", "apple", "banana", "river", "mountain", "table", "chair", "music",
    "bread", "cheese", "window", "garden", "flower", "tree", "stone", "water", "fire", "cloud",
    "rain", "snow", "sun", "moon", "star", "car", "train", "boat", "ship", "plane",
    "house", "door", "road", "city", "village", "forest", "ocean", "lake", "bird", "fish",
]  # fmt: skip


@pytest.fixture
def norms_file(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    values = rng.uniform(0, 5, size=(len(WORDS), 5)).round(2)
    frame = pd.DataFrame(values, columns=["Visual", "Auditory", "Haptic", "Size", "Speed"])
    frame.insert(0, "word", WORDS)
    path = tmp_path / "norms.csv"
    frame.to_csv(path, index=False)
    return path


def _hf(directory: Path, kind: str):
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    loader = AutoModel if kind == "bert" else AutoModelForCausalLM
    return loader.from_pretrained(directory).eval(), AutoTokenizer.from_pretrained(directory)


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_static_and_isolated_vectors_match_hugging_face(kind, tiny_dirs, tiny_models):
    model = tiny_models[kind]
    words = ["garden", "cat", "skateboarding"]
    static = embed_words(model, words, "static")
    isolated = embed_words(model, words, "isolated", use_cache=False)
    hf, tokenizer = _hf(tiny_dirs[kind], kind)
    table = hf.get_input_embeddings().weight.detach().double()
    for i, word in enumerate(words):
        form = word if kind == "bert" else " " + word  # inside a text, decoders see " word"
        pieces = tokenizer(form, add_special_tokens=False)["input_ids"]
        np.testing.assert_allclose(static.at(0)[i], table[pieces].mean(0).numpy(), atol=1e-6)
        prefix = [tokenizer.cls_token_id] if kind == "bert" else [tokenizer.bos_token_id]
        suffix = [tokenizer.sep_token_id] if kind == "bert" else []
        ids = torch.tensor([[*prefix, *pieces, *suffix]])
        with torch.no_grad():
            states = hf(ids, output_hidden_states=True).hidden_states
        last = len(states) - (1 if kind == "bert" else 2)  # decoders: HF's last is after ln_f
        for layer in range(last + 1):
            expected = states[layer][0, 1 : 1 + len(pieces)].double().mean(0).numpy()
            np.testing.assert_allclose(isolated.at(layer)[i], expected, atol=1e-4)


def test_contextual_vectors_average_the_occurrences(tiny_dirs, tiny_models):
    model = tiny_models["bert"]
    # "doghouse" holds the pieces of "dog" but is not an occurrence of the word
    corpus = ["The cat sat.", "A dog and a cat.", "Nothing here.", "The doghouse stood."]
    vectors = embed_words(model, ["cat", "dog", "horse"], "contextual", corpus, use_cache=False)
    assert model.token_strings(model.encode(corpus[3]))[2:4] == ["dog", "##house"]
    assert vectors.words == ["cat", "dog"] and vectors.occurrences == [2, 1]
    assert vectors.dropped == {"horse": "does not occur in the corpus"}
    hf, tokenizer = _hf(tiny_dirs["bert"], "bert")
    found = []
    for text in corpus[:2]:
        encoded = tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            states = hf(**encoded, output_hidden_states=True).hidden_states
        tokens = tokenizer.convert_ids_to_tokens(encoded["input_ids"][0])
        found += [states[2][0, tokens.index("cat")].double().numpy()]
    np.testing.assert_allclose(vectors.at(2)[0], np.mean(found, axis=0), atol=1e-4)


def test_second_embedding_run_reads_the_cache(tiny_models, tmp_path, monkeypatch):
    monkeypatch.setenv("RESIDUAL_TRACE_CACHE", str(tmp_path / "cache"))
    model = tiny_models["bert"]
    first = embed_words(model, WORDS[:6], "isolated")
    calls = []
    monkeypatch.setattr(model, "run_hooks", lambda *a, **k: calls.append(1))
    second = embed_words(model, WORDS[:6], "isolated")
    assert calls == [] and np.array_equal(first.vectors, second.vectors)
    assert len(list((tmp_path / "cache" / "embeddings").glob("*.npz"))) == 1


def test_random_init_copy_is_seeded_and_differs(tiny_models):
    model = tiny_models["gpt2"]
    state = torch.get_rng_state()
    first, again = random_init_copy(model, seed=3), random_init_copy(model, seed=3)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is untouched
    torch.testing.assert_close(first.W_E, again.W_E)
    assert first.W_E.shape == model.W_E.shape and not torch.allclose(first.W_E, model.W_E)
    assert first.n_blocks == model.n_blocks and "random init" in first.name


def _probe(args: list[str]):
    return CliRunner().invoke(trace, ["probe", *args], catch_exceptions=False)


def test_probe_cli_writes_every_output(tiny_dirs, norms_file, tmp_path, monkeypatch):
    monkeypatch.setenv("RESIDUAL_TRACE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "probe"
    result = _probe(
        [
            "-m", str(tiny_dirs["bert"]), "--norms", f"wide:{norms_file}", "--layers", "0,2",
            "--mapper", "ridge", "--mapper", "plsr", "--folds", "4", "--max-concepts", "30",
            "--out", str(out),
        ]
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "verdicts" in result.output and "wide" in result.output
    scores = pd.read_csv(out / "scores.csv")
    conditions = set(scores["condition"])
    # no categories in a wide file: no taxonomic control, every other one present
    assert conditions == {
        "system", "upper", "shuffled", "shuffled-upper", "random", "nonsense", "random-init"
    }  # fmt: skip
    assert set(scores["layer"]) == {0, 2} and set(scores["fold"]) == {0, 1, 2, 3}
    assert set(scores["metric"]) == {"spearman", "na_at_10"}
    summary = pd.read_csv(out / "summary.csv")
    assert (summary["score_lo"] <= summary["score"] + 1e-12).all()
    assert (summary["score"] <= summary["score_hi"] + 1e-12).all()
    verdicts = pd.read_csv(out / "verdicts.csv")
    assert len(verdicts) == 2 * 2 * 2  # layers x mappers x metrics
    concepts = pd.read_csv(out / "concepts.csv")
    assert (
        concepts["used"].sum() == 30
        and (concepts[~concepts["used"]]["reason"] == "not sampled").all()
    )
    record = json.loads((out / "run.json").read_text())
    assert record["command"] == "probe" and record["concepts"] == {"wide": 30}
    assert (out / "conditions.png").is_file() and (out / "layers.png").is_file()
    # the same command gives the same numbers
    again = tmp_path / "again"
    _probe(
        [
            "-m", str(tiny_dirs["bert"]), "--norms", f"wide:{norms_file}", "--layers", "0,2",
            "--mapper", "ridge", "--mapper", "plsr", "--folds", "4", "--max-concepts", "30",
            "--out", str(again), "--quiet",
        ]
    )  # fmt: skip
    pd.testing.assert_frame_equal(scores, pd.read_csv(again / "scores.csv"))


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--norms", "xml:file"], "expected one of lancaster"),
        (["--norms", "mcrae:/no/such/file"], "no such file"),
        (["--layers", "0,9"], "has layers 0..2"),
        (["--layers", "a,b"], "comma-separated layer numbers"),
        (["--folds", "1"], "folds (--folds): must be at least 2, got 1"),
        (["--max-concepts", "5"], "max_concepts (--max-concepts): must be at least 20, got 5"),
        (["--condition", "upper"], "system condition cannot be left out"),
    ],
)
def test_probe_errors(tiny_dirs, norms_file, tmp_path, args, fragment):
    out = tmp_path / "bad"
    base = ["probe", "-m", str(tiny_dirs["bert"]), "--norms", f"wide:{norms_file}", "-o", str(out)]
    if args[0] == "--norms":
        base = base[:3] + base[5:]
    result = CliRunner().invoke(trace, [*base, *args])
    assert result.exit_code != 0 and fragment in result.output, result.output
    assert "Traceback" not in result.output and not out.exists()


def test_readme_documents_every_probe_column(tiny_models, norms_file, tmp_path):
    from residual_trace.experiments.probe import ProbeOptions

    options = ProbeOptions(
        norms=(f"wide:{norms_file}",),
        mappers=("ridge",),
        folds=3,
        layers=(1,),
        conditions=("system", "shuffled", "upper"),
        quiet=True,
        use_cache=False,
    )
    result = options.run(tiny_models["bert"], warn=lambda m: None)
    result.save(tmp_path / "p")
    readme = docs_page("probe")
    assert set(result.tables) == {"scores", "summary", "verdicts", "concepts"}
    concepts = pd.read_csv(tmp_path / "p" / "concepts.csv")
    assert list(concepts.columns) == list(result.tables["concepts"].columns)
    for frame in result.tables.values():
        for column in frame.columns:
            assert f"`{column}`" in readme, column
