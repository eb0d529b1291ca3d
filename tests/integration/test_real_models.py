"""The packaged real models, offline: MiniLM (post-LN BERT) and SmolLM2 (Llama, from GGUF)."""

from __future__ import annotations

import json
import os
import tempfile

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

import residual_trace as rt
from residual_trace import drift_table, load_model
from residual_trace.cli import trace
from residual_trace.experiments import bundled_sentences
from residual_trace.experiments.perturb import PerturbOptions
from residual_trace.experiments.probe import ProbeOptions
from residual_trace.experiments.report import ReportOptions, run_report
from tests.reference import reference_drift

pytestmark = pytest.mark.slow

COLUMNS = ["cos_input", "cos_layer0", "baseline", "cos_input_normed", "emb_proj", "norm_ratio"]


@pytest.fixture(scope="module")
def texts() -> list[str]:
    sentences = bundled_sentences()
    return [sentences[0], sentences[55], "Yes.", sentences[190]]


@pytest.fixture(scope="module")
def minilm():
    return load_model("minilm", device="cpu")


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """Converted from the GGUF into an empty cache once, then loaded again from the cache."""
    cache = tmp_path_factory.mktemp("cache")
    patch = pytest.MonkeyPatch()
    patch.setenv("RESIDUAL_TRACE_CACHE", str(cache))
    notes: list[str] = []
    first = load_model("smollm2", device="cpu", on_convert=notes.append)
    assert len(notes) == 1 and "converting" in notes[0]
    second = load_model("smollm2", device="cpu", on_convert=notes.append)
    assert len(notes) == 1, "the second load must come from the safetensors cache"
    assert second.resolved.directory == first.resolved.directory
    assert (first.resolved.directory / "model.safetensors").is_file()
    yield second
    patch.undo()


def _compare(ours: pd.DataFrame, ref: pd.DataFrame) -> None:
    merged = ours.merge(ref, on=["text_id", "position", "layer"], suffixes=("", "_ref"))
    assert len(merged) == len(ref) == len(ours)
    for column in COLUMNS:
        np.testing.assert_allclose(
            merged[column], merged[f"{column}_ref"], atol=1e-4, rtol=1e-4, err_msg=column
        )
    # vocab ranks: inside the band a float32 computation may reach (ties within 1e-5)
    for column in ("vocab_rank", "vocab_rank_normed"):
        assert (merged[column] >= merged[f"{column}_lo"]).all(), column
        assert (merged[column] <= merged[f"{column}_hi"]).all(), column


def test_minilm_matches_hugging_face(minilm, texts):
    ours = drift_table(minilm, texts, batch_size=3)
    ref = reference_drift(minilm.resolved.directory, "bert", texts, prepend_bos=False)
    _compare(ours, ref)
    # MiniLM is a 6-block BERT with the bert-base-uncased vocabulary
    assert minilm.n_blocks == 6 and minilm.d_model == 384 and minilm.d_vocab == 30522


def test_smollm2_matches_hugging_face(smollm2, texts):
    ours = drift_table(smollm2, texts, batch_size=3)
    ref = reference_drift(smollm2.resolved.directory, "llama", texts, prepend_bos=True)
    _compare(ours, ref)
    assert smollm2.n_blocks == 30 and smollm2.d_model == 576


def test_smollm2_is_the_real_model(smollm2):
    """The dequantised weights predict ' Paris' (guards against a silently random model)."""
    import torch

    ids = torch.tensor([smollm2.encode("The capital of France is")])
    with torch.inference_mode():
        logits = smollm2.bridge(ids)
    assert smollm2.tokenizer.decode(int(logits[0, -1].argmax())).strip() == "Paris"


def test_trace_layers_default_model_end_to_end(tmp_path):
    """`trace layers` with no options: minilm on the bundled sentences."""
    out = tmp_path / "run"
    result = CliRunner().invoke(trace, ["layers", "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    summary = pd.read_csv(out / "summary.csv")
    record = json.loads((out / "run.json").read_text())
    assert record["model"]["name"] == "minilm" and record["inputs"]["n_texts"] >= 200
    assert len(summary) == 7
    # literature sanity (Brunner et al. 2020), not constants: identity fades with depth but
    # stays far above the anisotropy baseline, and most tokens stay identifiable
    assert summary["cos_input"].iloc[0] > summary["cos_input"].iloc[-1]
    assert (summary["cos_input_lo"] > summary["baseline"]).all()
    assert summary["identifiable"].iloc[0] > 0.95
    # the written drift.csv itself matches the independent reference (first three texts)
    drift = pd.read_csv(out / "drift.csv")
    texts = pd.read_csv(out / "texts.csv")["text"].tolist()[:3]
    ref = reference_drift(record["model"]["directory"], "bert", texts, prepend_bos=False)
    _compare(drift[drift["text_id"] < 3], ref)


def test_trace_layers_smollm2_cli(tmp_path, smollm2):
    out = tmp_path / "smol"
    result = CliRunner().invoke(
        trace,
        ["layers", "--model", "smollm2", "--text", "The dog chased the cat.", "--out", str(out)],
        env={"RESIDUAL_TRACE_CACHE": str(smollm2.resolved.directory.parent)},
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    drift = pd.read_csv(out / "drift.csv")
    assert drift["layer"].max() == 30
    ref = reference_drift(
        smollm2.resolved.directory, "llama", ["The dog chased the cat."], prepend_bos=True
    )
    _compare(drift, ref)
    assert "normed" in result.output  # pre-norm decoder: the normalised variant is shown


def test_python_api_on_minilm_returns_tables_and_writes_nothing(minilm, tmp_path, monkeypatch):
    """`rt.layers/decompose/perturb/probe` hand back their tables in memory; no file is
    written anywhere a run could leave one (the working directory, the temp directory)."""
    from residual_trace.tracer.decompose import RECONSTRUCTION_TOLERANCE

    cwd, scratch, cache = tmp_path / "cwd", tmp_path / "tmp", tmp_path / "cache"
    for folder in (cwd, scratch, cache):
        folder.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.setenv("RESIDUAL_TRACE_CACHE", str(cache))  # the probe's embedding cache
    sentences = bundled_sentences()
    texts = [s for s in sentences if {"dog", "cat"} <= set(s.lower().strip(".").split())][:4]
    assert len(texts) == 4 and all(t in sentences for t in texts)

    layers = rt.layers(minilm, texts, batch_size=3, quiet=True)
    assert set(layers.tables) == {"drift", "summary", "texts"}
    ref = reference_drift(minilm.resolved.directory, "bert", texts, prepend_bos=False)
    _compare(layers.tables["drift"], ref)  # cos_input and the rest, against HF
    assert layers.tables["texts"]["text"].tolist() == texts

    decomposed = rt.decompose(minilm, texts, quiet=True)
    assert set(decomposed.tables) == {
        "decompose",
        "mixing",
        "summary",
        "cumulative",
        "mixing_pairs",
    }
    assert decomposed.tables["decompose"]["recon_error"].max() < RECONSTRUCTION_TOLERANCE
    assert decomposed.tables["summary"]["block"].tolist() == list(range(minilm.n_blocks))

    swapped = rt.perturb(minilm, texts, mode="swap", swap=("dog", "cat"), quiet=True)
    assert set(swapped.tables) == {"perturbations", "resid", "heads", "summary", "resid_summary"}
    assert swapped.n_perturbations == len(texts) and swapped.skipped == []
    rows = swapped.tables["perturbations"]
    moved = rows[rows["perturbation"] == "swap"]
    assert set(moved["label"]) == {"swap dog<->cat"}
    assert len(moved) == len(texts) * minilm.n_blocks * minilm.n_heads
    heads = swapped.tables["heads"]
    heads = heads[heads["perturbation"] == "swap"].set_index(["block", "head"])
    assert (heads["n_texts"] == len(texts)).all()
    # one observation per text where the swap gave the head evidence (a finite index)
    evidence = moved.assign(ok=np.isfinite(moved["follow_index"])).groupby(["block", "head"])
    assert (heads["n_obs"] == evidence["ok"].sum().reindex(heads.index)).all()

    probed = rt.probe(
        minilm,
        norms="lancaster",
        layers=(0, 6),
        mappers=("ridge",),
        folds=3,
        max_concepts=40,
        conditions=("system", "shuffled"),
        quiet=True,
    )
    assert set(probed.tables) == {"scores", "summary", "verdicts", "concepts"}
    summary = probed.tables["summary"]
    assert set(summary["layer"]) == {0, 6} and set(summary["mapper"]) == {"ridge"}
    assert set(summary["condition"]) == {"system", "shuffled"}
    assert (summary["n_folds"] == 3).all()
    assert probed.tables["concepts"]["used"].sum() == 40

    assert os.listdir(cwd) == [] and os.listdir(scratch) == []
    # the one thing on disk: the probe's documented embedding cache, nothing else
    assert os.listdir(cache) in ([], ["embeddings"])


@pytest.mark.parametrize("name", ["minilm", "smollm2"])
def test_decomposition_reconstructs_real_models(name, minilm, smollm2, texts):
    from residual_trace.tracer.decompose import RECONSTRUCTION_TOLERANCE, decompose_table
    from tests.reference import hidden_states

    model = {"minilm": minilm, "smollm2": smollm2}[name]
    local, cumulative = decompose_table(model, texts[:2], batch_size=2)
    assert local["recon_error"].max() < RECONSTRUCTION_TOLERANCE
    np.testing.assert_allclose(cumulative.groupby("layer")["share"].sum(), 1.0, atol=1e-3)
    ids = model.encode(texts[0])
    states, _ = hidden_states(model.resolved.directory, model.model_type, ids)
    W_E = model.W_E.numpy()
    unit = W_E[ids] / np.linalg.norm(W_E[ids], axis=1, keepdims=True)
    # rows are per block (0..L-1); the last block's output is the last layer's state
    assert sorted(local["block"].unique()) == list(range(model.n_blocks))
    last = local[(local["text_id"] == 0) & (local["block"] == model.n_blocks - 1)]
    np.testing.assert_allclose(
        last.sort_values("position")["proj_post"], (states[-1] * unit).sum(1), rtol=1e-4, atol=1e-3
    )


@pytest.mark.parametrize("name", ["minilm", "smollm2"])
def test_mixing_on_real_models(name, minilm, smollm2, texts):
    """Literature sanity, not constants: with the residual and LayerNorm accounted for,
    far less of a token's update comes from other tokens than raw attention suggests
    (Kobayashi et al. 2021)."""
    from residual_trace.tracer.mixing import mixing_table

    model = {"minilm": minilm, "smollm2": smollm2}[name]
    table, pairs = mixing_table(model, texts, pair_text=0)
    content = table[~table["is_special"]]
    assert content["mix_attnres_n"].mean() < content["mix_raw"].mean() - 0.2
    columns = ["mix_raw", "mix_attn_n", "mix_attnres_n", "mix_rollout"]
    assert content[columns].stack().between(0, 1).all()
    if name == "minilm":  # post-LN: the ratio through LN1 is defined, and smaller again
        assert content["mix_attnresln_n"].mean() <= content["mix_attnres_n"].mean()
    else:
        assert content["mix_attnresln_n"].isna().all()
    assert pairs is not None
    np.testing.assert_allclose(pairs.groupby(["block", "target"])["share"].sum(), 1.0, atol=1e-4)


def _hf_structure(model, texts: list[str]) -> pd.DataFrame:
    """Previous- and next-token attention per head from Hugging Face ``output_attentions``:
    per text the mean over non-special query rows, then the mean over texts."""
    from tests.reference import hidden_states

    rows = []
    for text_id, text in enumerate(texts):
        ids = model.encode(text)
        _, attentions = hidden_states(model.resolved.directory, model.model_type, ids)
        content = np.array([i not in model.special_ids for i in ids])
        with_prev = content.copy()
        with_prev[0] = False
        with_next = content.copy()
        with_next[-1] = False
        n = len(ids)
        for block, att in enumerate(attentions):
            for head in range(att.shape[0]):
                a = att[head]
                rows.append(
                    {
                        "text_id": text_id,
                        "block": block,
                        "head": head,
                        "prev": a[np.arange(1, n), np.arange(n - 1)][with_prev[1:]].mean(),
                        "next": a[np.arange(n - 1), np.arange(1, n)][with_next[:-1]].mean(),
                    }
                )
    return pd.DataFrame(rows).groupby(["block", "head"])[["prev", "next"]].mean()


@pytest.mark.parametrize("name", ["minilm", "smollm2"])
def test_perturb_previous_and_next_token_heads_come_out_positional(name, minilm, smollm2):
    """Clark et al. (2019): heads with >50% attention on the previous or next token are
    positional heads; shuffling the tokens must leave them where they were."""
    model = {"minilm": minilm, "smollm2": smollm2}[name]
    texts = bundled_sentences()[:24] if name == "minilm" else bundled_sentences()[:16]
    options = PerturbOptions(mode="shuffle", samples=4, quiet=True, batch_size=8)
    result = options.run(model, texts, warn=lambda m: None)
    table = result.tables["heads"]
    heads = table[table["perturbation"] == "shuffle"].set_index(["block", "head"])
    assert len(heads) == model.n_blocks * model.n_heads
    assert (heads["head_name"] == [f"L{b}H{h}" for b, h in heads.index]).all()
    # the structure measures equal an independent computation from HF attentions
    reference = _hf_structure(model, texts)
    np.testing.assert_allclose(heads["prev_mass"], reference["prev"], atol=1e-4)
    if name == "minilm":
        np.testing.assert_allclose(heads["next_mass"], reference["next"], atol=1e-4)
    clark = heads[(heads["prev_mass"] > 0.5) | (heads["next_mass"].fillna(0) > 0.5)]
    assert len(clark) >= 1, "both models have previous-token heads"
    assert (clark["verdict"] == "position").all(), clark[
        ["head_name", "follow_index", "follow_index_lo", "follow_index_hi"]
    ]
    assert (heads["noise_floor"] < 1e-3).all()
    resid = result.tables["resid"]
    states = resid[resid["perturbation"] == "shuffle"]
    # deeper down, a state still resembles its own token's original state more than the
    # state that now sits at its position
    assert (
        states.groupby("layer")["cos_token"].mean() > states.groupby("layer")["cos_position"].mean()
    ).all()


def test_perturb_cli_embed_shuffle_on_smollm2(tmp_path, smollm2):
    out = tmp_path / "embed"
    args = ["perturb", "-m", "smollm2", "--mode", "embed-shuffle", "--samples", "2", "-o", str(out)]
    for text in bundled_sentences()[:3]:
        args += ["-t", text]
    result = CliRunner().invoke(
        trace,
        args,
        env={"RESIDUAL_TRACE_CACHE": str(smollm2.resolved.directory.parent)},
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    assert "pattern kept" in result.output
    heads = pd.read_csv(out / "heads.csv")
    shuffled = heads[heads["perturbation"] == "embed-shuffle"]
    assert len(shuffled) == 30 * 9 and (shuffled["n_obs"] == 3 * 2).all()
    assert shuffled["sim_position"].between(0, 1).all()
    assert (out / "structure.png").is_file() and (out / "attention.png").is_file()


def test_probe_minilm_with_the_bundled_norms(minilm):
    """The paper's pattern, not its constants: the upper bound is far above the system, and
    the shuffled control stays at chance on Neighbourhood Accuracy@10."""
    options = ProbeOptions(
        mappers=("plsr",),
        folds=5,
        layers=(0, 6),
        max_concepts=150,
        quiet=True,
        use_cache=False,
    )
    result = options.run(minilm, warn=lambda m: None)
    summary = result.tables["summary"]
    means = summary.set_index(["layer", "condition", "metric"])["score"]
    for layer in (0, 6):
        assert means[layer, "upper", "spearman"] > means[layer, "system", "spearman"]
        assert means[layer, "upper", "na_at_10"] > 0.5
        assert means[layer, "shuffled", "na_at_10"] < 3 * 10 / 150
    assert set(summary["condition"]) >= {"system", "random-init", "nonsense"}
    assert any("F1@10 left out" in note for note in result.notes)


def test_report_on_minilm_and_smollm2(minilm, smollm2, tmp_path):
    """The packaged encoder and decoder side by side (small settings to stay fast).

    The parts this test asserts on; the probe and lens parts of the same two models, and the
    report's figures over all five, are checked in ``test_figures_real``.
    """
    options = ReportOptions(
        max_texts=8,
        perturb_samples=3,
        experiments=("layers", "decompose", "perturb"),
        device="cpu",
    )
    assert tuple(options.models) == ("minilm", "smollm2")  # the default pair
    result = run_report(options, warn=lambda m: None, models={"minilm": minilm, "smollm2": smollm2})
    result.save(tmp_path / "report")
    depth = pd.read_csv(tmp_path / "report" / "tables" / "depth.csv")
    assert depth.groupby("model")["layer"].max().to_dict() == {"minilm": 6, "smollm2": 30}
    assert (depth.groupby("model")["depth"].max() == 1.0).all()
    top = depth[depth["depth"] == 1.0].set_index("model")
    # literature sanity, not constants: the causal LM has lost far more token identity at the
    # top than the encoder (the encoder-vs-decoder contrast the report is about)
    assert top.loc["smollm2", "cos_input"] < top.loc["minilm", "cos_input"] - 0.1
    text = " ".join(result.verdicts)
    assert "minilm (encoder)" in text and "smollm2 (decoder)" in text
    # every head of both models gets a verdict: 6 blocks x 12 heads and 30 blocks x 9 heads
    heads = result.tables["heads"].set_index("model")
    assert heads["n_heads"].to_dict() == {"minilm": 6 * 12, "smollm2": 30 * 9}
    verdicts = heads[["n_heads_position", "n_heads_token", "n_heads_undecided"]].sum(axis=1)
    assert (verdicts == heads["n_heads"]).all()
    assert (tmp_path / "report" / "report.html").stat().st_size > 100_000


def test_report_on_full_size_bert_and_gpt2_architectures(tmp_path):
    """bert-base-uncased and gpt2 by shape (12 layers, d_model 768) with seeded random weights,
    as the report runs them by name where the hub is reachable."""
    from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

    from tests.helpers import minilm_dir, tiny_bpe_tokenizer

    bert_dir, gpt2_dir = tmp_path / "bert-base-random", tmp_path / "gpt2-random"
    torch.manual_seed(5)
    BertModel(BertConfig()).save_pretrained(bert_dir)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (bert_dir / name).write_bytes((minilm_dir() / name).read_bytes())
    gpt2_dir.mkdir()
    vocab = tiny_bpe_tokenizer(gpt2_dir)
    torch.manual_seed(5)
    GPT2LMHeadModel(GPT2Config(vocab_size=vocab, bos_token_id=0, eos_token_id=0)).save_pretrained(
        gpt2_dir
    )
    options = ReportOptions(
        models=[str(bert_dir), str(gpt2_dir)],
        max_texts=3,
        perturb_samples=2,
        probe_max_concepts=40,
        probe_folds=3,
        probe_mappers=["ridge"],
        device="cpu",
    )
    result = run_report(options, warn=lambda m: None)
    result.save(tmp_path / "report")
    depth = pd.read_csv(tmp_path / "report" / "tables" / "depth.csv")
    assert depth.groupby("model")["layer"].max().tolist() == [12, 12]
    assert set(depth["family"]) == {"encoder", "decoder"}
    assert len(result.verdicts) >= 6


@pytest.mark.parametrize("name", ["minilm", "smollm2"])
def test_bfloat16_against_float32_on_real_models(name, minilm, smollm2, texts):
    """The README's bfloat16 figures: half the weight bytes, cosines within 0.05 (measured
    0.004 on minilm and 0.03 on smollm2 over 40 sentences), the same identifiable tokens
    but for a rounding tie or two."""
    full = {"minilm": minilm, "smollm2": smollm2}[name]
    half = load_model(str(full.resolved.directory), device="cpu", dtype="bfloat16")

    def weight_bytes(model) -> int:
        return sum(p.numel() * p.element_size() for p in model.bridge.original_model.parameters())

    assert 2 * weight_bytes(half) == weight_bytes(full)
    a = rt.layers(full, texts, quiet=True).tables["drift"]
    b = rt.layers(half, texts, quiet=True).tables["drift"]
    for column in ("cos_input", "cos_input_normed", "baseline"):
        assert 0 < float(np.nanmax(np.abs(a[column] - b[column]))) < 0.05, column
    agree = ((a["vocab_rank"] == 1) == (b["vocab_rank"] == 1)).mean()
    assert agree > 0.99
    decomposed = rt.decompose(half, texts, quiet=True).tables["decompose"]
    assert float(decomposed["recon_error"].max()) < 4 * 2**-7
