"""Figures on synthetic tables, run directories, model-name resolution and architecture data."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from residual_trace.errors import UserError
from residual_trace.figures import (
    drift_heatmap_figure,
    identifiable_share_figure,
    token_drift_figure,
)
from residual_trace.models import HUB_RENAMES
from residual_trace.models.resolve import cache_dir, resolve
from residual_trace.runs import RunDir
from residual_trace.stats import bootstrap_ci
from residual_trace.tracer import layer_summary


def synthetic_table(n_texts: int = 3, n_tokens: int = 5, n_layers: int = 4) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for text in range(n_texts):
        for position in range(n_tokens):
            for layer in range(n_layers):
                cos = 1.0 - 0.2 * layer + rng.normal(0, 0.01)
                rows.append(
                    {
                        "model": "synthetic",
                        "text_id": text,
                        "position": position,
                        "layer": layer,
                        "token": f"t{position}",
                        "is_special": position == 0,
                        "cos_input": cos,
                        "baseline": 0.05,
                        "vocab_rank": 1 if layer < 2 else 7,
                        "cos_input_normed": cos,
                        "baseline_normed": 0.05,
                        "vocab_rank_normed": 1,
                        "norm_ratio": 1.0,
                        "top_dim_share": 0.1,
                    }
                )
    return pd.DataFrame(rows)


def test_token_drift_figure_draws_a_line_per_token_mean_and_baseline():
    table = synthetic_table()
    fig = token_drift_figure(table, layer_summary(table), variants=("", "_normed"))
    assert len(fig.axes) == 2
    lines = fig.axes[0].get_lines()
    non_special_tokens = 3 * 4
    assert len(lines) == non_special_tokens + 3  # token lines + mean + baseline + zero line
    mean_line = next(line for line in lines if line.get_label() == "mean cos_input")
    np.testing.assert_allclose(mean_line.get_ydata(), [1.0, 0.8, 0.6, 0.4], atol=0.02)
    baseline = next(line for line in lines if line.get_label() == "baseline (other tokens)")
    np.testing.assert_allclose(baseline.get_ydata(), [0.05] * 4)
    assert "synthetic" in fig.axes[0].get_title()
    assert "layer" in fig.axes[0].get_xlabel()


def test_token_drift_figure_refuses_only_special_tokens():
    table = synthetic_table()
    special = table[table["is_special"]]
    with pytest.raises(ValueError, match="no tokens"):
        token_drift_figure(special, layer_summary(special))


def test_heatmap_has_one_row_per_token():
    fig = drift_heatmap_figure(synthetic_table(), text_id=1)
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert labels == [f"{p}: t{p}" for p in range(5)]


def test_identifiable_share_follows_the_ranks():
    fig = identifiable_share_figure(layer_summary(synthetic_table()))
    (line,) = [line for line in fig.axes[0].get_lines() if line.get_label() == "raw"]
    assert list(line.get_ydata()) == [1.0, 1.0, 0.0, 0.0]
    # every token agrees within a layer, so the 95% band has no width: it lies on the line
    (band,) = fig.axes[0].collections
    band_y = band.get_paths()[0].vertices[:, 1]
    assert set(np.round(band_y, 12)) <= {0.0, 1.0}


def test_summary_leaves_special_tokens_out_and_brackets_the_mean():
    summary = layer_summary(synthetic_table())
    assert (summary["n_tokens"] == 3 * 4).all()
    assert (summary["cos_input_lo"] <= summary["cos_input"]).all()
    assert (summary["cos_input"] <= summary["cos_input_hi"]).all()
    assert summary["identifiable"].tolist() == [1.0, 1.0, 0.0, 0.0]


def test_bootstrap_interval_covers_a_known_mean():
    values = np.random.default_rng(1).normal(5.0, 1.0, size=2000)
    low, high = bootstrap_ci(values, seed=0)
    assert low < 5.0 < high and high - low < 0.2
    assert bootstrap_ci(values, seed=0) == (low, high)  # seeded: same interval


def test_an_interval_from_fewer_than_two_units_is_not_available():
    """One value (or none) has no spread: the interval is NaN and printed n/a, never
    [x, x]; two values already give one."""
    from residual_trace.stats import format_interval, mean_with_ci
    from residual_trace.tracer import format_summary

    for values in ([0.7], [np.nan, 0.7], []):
        low, high = bootstrap_ci(values, seed=0)
        assert np.isnan(low) and np.isnan(high), values
        assert format_interval(low, high) == "[n/a]"
    assert mean_with_ci([0.7], "x")["x"] == 0.7
    assert np.isnan(mean_with_ci([0.7], "x")["x_lo"])
    low, high = bootstrap_ci([0.0, 1.0], seed=0)
    assert 0.0 <= low < high <= 1.0
    table = synthetic_table()
    one_token = table[(table["text_id"] == 0) & (table["position"] == 1)]
    summary = layer_summary(one_token)
    assert summary["cos_input_lo"].isna().all() and summary["identifiable_hi"].isna().all()
    assert "[n/a]" in format_summary(summary, show_normed=False)


def test_identifiable_share_axes_run_from_zero_to_one():
    """A 5-point drop must look like one: the share's axis is 0 to 1 in the layers figure
    and in the report's comparison."""
    from residual_trace.figures.report import depth_figure

    summary = layer_summary(synthetic_table())
    summary["identifiable"] = np.linspace(0.97, 0.92, len(summary))
    ax = identifiable_share_figure(summary).axes[0]
    assert ax.get_ylim() == pytest.approx((-0.02, 1.02))
    depth = summary.assign(model="m", family="encoder", depth=np.linspace(0, 1, len(summary)))
    ax = depth_figure(depth, "identifiable").axes[0]
    assert ax.get_ylim() == pytest.approx((-0.02, 1.02))


def test_run_dir_publishes_on_success_and_cleans_up_on_error(tmp_path):
    with RunDir(tmp_path / "ok") as run:
        (run.tmp / "a.csv").write_text("1")
    assert (tmp_path / "ok" / "a.csv").read_text() == "1"
    with pytest.raises(RuntimeError), RunDir(tmp_path / "bad") as run:
        (run.tmp / "a.csv").write_text("half")
        raise RuntimeError("crash")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok"]


def test_hub_renames_point_to_official_ids():
    assert HUB_RENAMES["bert-base-uncased"] == "google-bert/bert-base-uncased"
    assert HUB_RENAMES["gpt2"] == "openai-community/gpt2"


def test_local_directory_without_config(tmp_path):
    with pytest.raises(UserError, match=r"no config\.json"):
        resolve(str(tmp_path))


def test_cached_hub_copy_is_used_offline(tmp_path, tiny_dirs, monkeypatch):
    """A hub name whose snapshot sits in the HF cache loads with the hub unreachable."""
    import shutil

    snapshot = tmp_path / "hf" / "hub" / "models--acme--tiny-bert" / "snapshots" / "abc123"
    shutil.copytree(tiny_dirs["bert"], snapshot)
    refs = snapshot.parents[1] / "refs"
    refs.mkdir()
    (refs / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    resolved = resolve("acme/tiny-bert")
    assert resolved.directory == snapshot and resolved.revision == "abc123"


def test_cache_dir_honours_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("RESIDUAL_TRACE_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path


def test_structure_is_derived_for_the_tiny_models(tiny_models):
    bert, gpt2, llama = (tiny_models[k] for k in ("bert", "gpt2", "llama"))
    assert (bert.spec.family, bert.spec.norm_placement) == ("encoder", "post")
    assert bert.spec.reader_norm(0, n_blocks=2) is None
    assert bert.spec.attn_delta == "blocks.{block}.attn.o.hook_out"
    for model, kind in ((gpt2, "layernorm"), (llama, "rmsnorm")):
        assert (model.spec.family, model.spec.norm_placement) == ("decoder", "pre")
        assert model.spec.norm_kind == kind
        assert model.spec.reader_norm(0, n_blocks=2) == "blocks.0.ln1"
        assert model.spec.reader_norm(2, n_blocks=2) == "ln_final"
        assert not model.spec.parallel


def _fake_bridge(model_type: str, **config: object):
    from types import SimpleNamespace

    from residual_trace.models.architectures import REQUIRED_HOOKS

    block = torch.nn.Module()
    block.ln1 = torch.nn.LayerNorm(4)
    return SimpleNamespace(
        original_model=SimpleNamespace(config=SimpleNamespace(model_type=model_type, **config)),
        cfg=SimpleNamespace(n_layers=1),
        hook_dict=dict.fromkeys(REQUIRED_HOOKS),
        blocks=[block],
    )


def test_a_block_that_is_not_additive_is_refused():
    from residual_trace.models import derive_spec

    def probe(names):
        ones = torch.ones(1, 3, 4)
        # output = 2 * (input + attention + mlp): neither additive nor post-LN
        return {name: ones * (6.0 if name.endswith("resid_post") else 1.0) for name in names}

    with pytest.raises(UserError, match=r"architecture 'weird' is not supported: its block"):
        derive_spec(_fake_bridge("weird"), probe, torch.float32)


def test_encoder_decoder_and_missing_hooks_are_refused():
    from residual_trace.models import derive_spec

    with pytest.raises(UserError, match=r"'t5' is not supported: encoder-decoder"):
        derive_spec(_fake_bridge("t5", is_encoder_decoder=True), dict, torch.float32)
    bridge = _fake_bridge("mamba")
    del bridge.hook_dict["blocks.0.attn.hook_pattern"]
    with pytest.raises(UserError, match=r"'mamba' is not supported: .* no attention pattern"):
        derive_spec(bridge, dict, torch.float32)
