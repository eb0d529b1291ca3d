"""The `trace layers` command in-process: outputs, run.json, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from residual_trace.cli import trace
from tests.helpers import docs_page


def _run(args: list[str], **env: str):
    return CliRunner().invoke(trace, args, env=env or None, catch_exceptions=False)


def _assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code != 0
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("Error:"), result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_layers_writes_every_output(tiny_dirs, tmp_path):
    out = tmp_path / "run"
    texts = ["The dog chased the cat.", "Rain fell."]
    result = _run(
        [
            "layers",
            "--model",
            str(tiny_dirs["llama"]),
            "--out",
            str(out),
            "--seed",
            "3",
            "--text",
            texts[0],
            "--text",
            texts[1],
            "--batch-size",
            "1",
            "--save-attention",
        ]
    )
    assert result.exit_code == 0, result.output
    assert "identifiable" in result.output and "layer" in result.output
    for name in (
        "drift.csv",
        "summary.csv",
        "texts.csv",
        "run.json",
        "token_drift.png",
        "drift_heatmap.png",
        "identifiable_share.png",
    ):
        assert (out / name).is_file(), name
    drift = pd.read_csv(out / "drift.csv")
    record = json.loads((out / "run.json").read_text())
    n_layers = record["model"]["n_blocks"] + 1
    tokens = pd.read_csv(out / "texts.csv")["n_tokens"].sum()
    assert len(drift) == tokens * n_layers == record["rows"]["drift"]
    assert record["rows"]["summary"] == n_layers and record["rows"]["texts"] == 2
    assert record["seed"] == 3 and record["options"]["batch_size"] == 1
    assert record["model"]["architecture"] == "llama"
    assert len(record["model"]["weights_sha256"]) == 64
    assert record["inputs"]["n_texts"] == 2
    assert {"torch", "transformer-lens", "transformers"} <= set(record["versions"])
    pattern = np.load(out / "attention" / "text_00001.npz")
    n = int(pd.read_csv(out / "texts.csv")["n_tokens"][1])
    assert pattern["pattern"].shape == (
        record["model"]["n_blocks"],
        record["model"]["n_heads"],
        n,
        n,
    )
    np.testing.assert_allclose(pattern["pattern"].astype(np.float32).sum(-1), 1.0, atol=5e-3)
    assert next(iter(pattern["tokens"])) == "<|endoftext|>"


@pytest.mark.parametrize("fmt", ["svg", "pdf"])
def test_figure_formats(tiny_dirs, tmp_path, fmt):
    out = tmp_path / fmt
    result = _run(
        [
            "layers",
            "-m",
            str(tiny_dirs["bert"]),
            "-t",
            "A short text.",
            "-o",
            str(out),
            "--format",
            fmt,
            "--quiet",
        ]
    )
    assert result.exit_code == 0, result.output
    assert result.output == ""  # --quiet prints nothing on success
    assert (out / f"token_drift.{fmt}").stat().st_size > 1000


def test_file_input_and_same_numbers_twice(tiny_dirs, tmp_path):
    source = tmp_path / "texts.txt"
    source.write_text("The dog chased the cat.\n\nThe cat chased the dog.\n", encoding="utf-8")
    runs = []
    for name in ("a", "b"):
        result = _run(
            [
                "layers",
                "-m",
                str(tiny_dirs["gpt2"]),
                "-f",
                str(source),
                "-o",
                str(tmp_path / name),
                "-q",
            ]
        )
        assert result.exit_code == 0, result.output
        runs.append(pd.read_csv(tmp_path / name / "drift.csv"))
    assert runs[0]["text_id"].nunique() == 2  # blank line skipped
    pd.testing.assert_frame_equal(runs[0], runs[1])


@pytest.mark.parametrize("fmt", ["svg", "pdf"])
def test_the_same_command_writes_the_same_figure_bytes(tiny_dirs, tmp_path, fmt):
    """Vector figures carry no creation date and no random element ids: two runs of one
    command write byte-identical files (as the PNGs and tables always were)."""
    for name in ("a", "b"):
        args = ["layers", "-m", str(tiny_dirs["bert"]), "-t", "The dog ran.", "--format", fmt]
        result = _run([*args, "-o", str(tmp_path / name), "-q"])
        assert result.exit_code == 0, result.output
    for path in sorted((tmp_path / "a").glob(f"*.{fmt}")):
        assert path.read_bytes() == (tmp_path / "b" / path.name).read_bytes(), path.name
    assert len(list((tmp_path / "a").glob(f"*.{fmt}"))) == 3


def test_unknown_model_offline(tmp_path):
    result = _run(
        ["layers", "--model", "no-such-org/no-such-model", "-o", str(tmp_path / "x")],
        HF_HUB_OFFLINE="1",
        HF_HOME=str(tmp_path / "hf"),
    )
    _assert_one_line_error(result, "no-such-org/no-such-model", "minilm", "smollm2", "--model PATH")
    assert not (tmp_path / "x").exists()


def test_hub_name_offline_without_cache(tmp_path):
    result = _run(
        ["layers", "--model", "bert-base-uncased", "-o", str(tmp_path / "x")],
        HF_HUB_OFFLINE="1",
        HF_HOME=str(tmp_path / "hf"),
    )
    _assert_one_line_error(result, "bert-base-uncased", "hub is unreachable", "minilm")


def test_missing_local_directory(tmp_path):
    result = _run(["layers", "--model", "./does/not/exist", "-o", str(tmp_path / "x")])
    _assert_one_line_error(result, "no such directory")


@pytest.mark.parametrize("text", ["", "   "])
def test_empty_text(tiny_dirs, tmp_path, text):
    result = _run(["layers", "-m", str(tiny_dirs["bert"]), "-t", text, "-o", str(tmp_path / "x")])
    _assert_one_line_error(result, "empty")
    assert not (tmp_path / "x").exists()


def test_missing_file(tmp_path):
    result = _run(["layers", "-f", str(tmp_path / "nope.txt"), "-o", str(tmp_path / "x")])
    _assert_one_line_error(result, "no such file")


def test_empty_file(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n", encoding="utf-8")
    result = _run(["layers", "-f", str(empty), "-o", str(tmp_path / "x")])
    _assert_one_line_error(result, "holds no text")


def test_unwritable_out(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    result = _run(["layers", "-t", "Hello.", "-o", str(blocker / "run")])
    _assert_one_line_error(result, "cannot write to --out")


def test_out_is_a_file(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    result = _run(["layers", "-t", "Hello.", "-o", str(blocker)])
    _assert_one_line_error(result, "not a directory")


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--batch-size", "0"], "--batch-size"),
        (["--max-length", "1"], "--max-length"),
        (["-t", "x", "-f", "y.txt"], "not both"),
        (["--heatmap-text", "-1"], "--heatmap-text"),
    ],
)
def test_bad_options(tmp_path, args, fragment):
    _assert_one_line_error(_run(["layers", "-o", str(tmp_path / "x"), *args]), fragment)


def test_cuda_requested_without_cuda(monkeypatch, tmp_path):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = _run(["layers", "--device", "cuda", "-t", "Hi.", "-o", str(tmp_path / "x")])
    _assert_one_line_error(result, "no CUDA device")


def test_heatmap_text_out_of_range(tiny_dirs, tmp_path):
    result = _run(
        [
            "layers",
            "-m",
            str(tiny_dirs["bert"]),
            "-t",
            "One text.",
            "--heatmap-text",
            "5",
            "-o",
            str(tmp_path / "x"),
        ]
    )
    _assert_one_line_error(result, "(--heatmap-text) 5", "only 1 text")
    assert not (tmp_path / "x").exists()


def _crash_while_measuring(monkeypatch):
    """The drift stream yields its first batch, then fails (nothing saved yet)."""
    import residual_trace.tracer.drift as drift

    real = drift.iter_drift_encoded

    def failing(*args, **kwargs):
        frames = real(*args, **kwargs)
        yield next(frames)
        raise RuntimeError("disk full while measuring")

    monkeypatch.setattr(drift, "iter_drift_encoded", failing)
    return "disk full while measuring"


def _crash_while_writing_tables(monkeypatch):
    """The first table is written in full, then writing the second one fails."""
    import residual_trace.experiments.result as result

    real = result.write_table
    calls = []

    def failing(frame, path):
        calls.append(path)
        if len(calls) > 1:
            path.write_text("half a table")
            raise RuntimeError("disk full while writing")
        return real(frame, path)

    monkeypatch.setattr(result, "write_table", failing)
    return "disk full while writing"


def _crash_while_drawing(monkeypatch):
    """Every table is written, then the last figure fails."""
    import residual_trace.figures as figures

    def explode(*args, **kwargs):
        raise RuntimeError("disk full while drawing")

    monkeypatch.setattr(figures, "identifiable_share_figure", explode)
    return "disk full while drawing"


@pytest.mark.parametrize(
    "crash", [_crash_while_measuring, _crash_while_writing_tables, _crash_while_drawing]
)
def test_crash_leaves_no_half_written_output(tiny_dirs, tmp_path, monkeypatch, crash):
    message = crash(monkeypatch)
    out = tmp_path / "run"
    texts = ["Some text.", "Another text.", "A third one."]
    result = _run(
        [
            "layers",
            "-m",
            str(tiny_dirs["bert"]),
            *[arg for text in texts for arg in ("-t", text)],
            "--batch-size",
            "1",
            "-o",
            str(out),
        ]
    )
    _assert_one_line_error(result, "internal error", message)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # the temporary directory is gone too


def test_help_has_examples_and_module_entry_point():
    result = _run(["layers", "--help"])
    assert (
        result.exit_code == 0
        and "Examples:" in result.output
        and "--save-attention" in result.output
    )
    completed = subprocess.run(
        [sys.executable, "-m", "residual_trace", "--help"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert completed.returncode == 0 and "layers" in completed.stdout


def test_readme_documents_every_output_column(tiny_models):
    from residual_trace.experiments.decompose import DecomposeOptions
    from residual_trace.experiments.layers import LayersOptions
    from residual_trace.tracer import DRIFT_COLUMNS, SUMMARY_COLUMNS
    from residual_trace.tracer.decompose import DECOMPOSE_COLUMNS, HEAD_COLUMNS
    from residual_trace.tracer.mixing import MIXING_COLUMNS

    texts = ["A short text."]
    layers = LayersOptions(quiet=True).run(tiny_models["bert"], texts, warn=lambda m: None)
    decompose = DecomposeOptions(per_head=True, quiet=True).run(
        tiny_models["bert"], texts, warn=lambda m: None
    )
    assert set(decompose.tables) == {
        "decompose",
        "mixing",
        "summary",
        "cumulative",
        "mixing_pairs",
        "heads",
        "head_summary",
        "attention_heads",
    }
    readme = docs_page("layers") + docs_page("decompose")
    columns = [
        *DRIFT_COLUMNS,
        *SUMMARY_COLUMNS,
        *DECOMPOSE_COLUMNS,
        *MIXING_COLUMNS,
        *HEAD_COLUMNS,
        *(c for table in layers.tables.values() for c in table.columns),
        *(c for table in decompose.tables.values() for c in table.columns),
    ]
    for column in columns:
        assert f"`{column}`" in readme, column


def test_decompose_writes_every_output(tiny_dirs, tmp_path):
    out = tmp_path / "dec"
    result = _run(
        [
            "decompose",
            "-m",
            str(tiny_dirs["bert"]),
            "-o",
            str(out),
            "-t",
            "The dog chased the cat.",
            "-t",
            "Rain fell.",
            "--batch-size",
            "1",
            "--per-head",
        ]
    )
    assert result.exit_code == 0, result.output
    assert "reconstruct every block output" in result.output
    for name in (
        "decompose.csv",
        "summary.csv",
        "cumulative.csv",
        "run.json",
        "sublayers.png",
        "cumulative.png",
        "mixing.csv",
        "mixing_pairs.csv",
        "mixing.png",
        "mixing_heatmap.png",
        "heads.csv",
        "head_summary.csv",
        "heads.png",
        "attention_heads.csv",
        "viewer.html",
    ):
        assert (out / name).is_file(), name
    table = pd.read_csv(out / "decompose.csv")
    record = json.loads((out / "run.json").read_text())
    assert record["command"] == "decompose" and record["max_recon_error"] < 1e-4
    n_blocks = record["model"]["n_blocks"]
    assert sorted(table["block"].unique()) == list(range(n_blocks))  # blocks count from 0
    n_tokens = table[table["block"] == 0].shape[0]
    assert len(table) == n_tokens * n_blocks == record["rows"]["decompose"]
    parts = table[["proj_resid", "proj_attn", "proj_mlp", "proj_bias"]].sum(axis=1)
    np.testing.assert_allclose(parts, table["proj_post"], atol=1e-4)
    heads = pd.read_csv(out / "heads.csv")
    assert len(heads) == len(table) * (record["model"]["n_heads"] + 1)  # + the output bias
    head_summary = pd.read_csv(out / "head_summary.csv")
    assert len(head_summary) == n_blocks * (record["model"]["n_heads"] + 1)
    assert set(head_summary["head_name"]) == {
        f"L{b}H{h}" for b in range(n_blocks) for h in range(record["model"]["n_heads"])
    } | {f"L{b}b_O" for b in range(n_blocks)}
    mixing = pd.read_csv(out / "mixing.csv")
    assert len(mixing) == len(table)  # one row per text x position x block, like decompose
    columns = ["mix_raw", "mix_attn_n", "mix_attnres_n", "mix_attnresln_n", "mix_rollout"]
    columns += ["mix_globenc", "mix_alti", "mix_vz", "mix_vz_rollout"]
    assert mixing[columns].notna().all().all()
    assert mixing[columns].stack().between(0, 1).all()
    pairs = pd.read_csv(out / "mixing_pairs.csv")
    assert set(pairs["text_id"]) == {0, 1}  # mixing_text 0 and the viewer's two texts
    weights = pd.read_csv(out / "attention_heads.csv")  # each head's weights; mean = attention
    mean = weights.groupby(["text_id", "block", "target", "source"])["attention"].mean()
    merged = pairs.set_index(["text_id", "block", "target", "source"])["attention"]
    np.testing.assert_allclose(mean.sort_index(), merged.sort_index(), atol=1e-6)
    summary = pd.read_csv(out / "summary.csv")
    assert summary["block"].tolist() == list(range(n_blocks))
    for column in columns:
        means = mixing[~mixing["is_special"]].groupby("block")[column].mean()
        np.testing.assert_allclose(summary[column], means.to_numpy(), atol=1e-6)
    np.testing.assert_allclose(
        summary["proj_change"],
        summary[["proj_attn", "proj_mlp", "proj_carried_change", "proj_bias"]].sum(axis=1),
        atol=1e-4,
    )


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["-t", "  "], "empty"),
        (["--batch-size", "0"], "--batch-size"),
        (["-f", "nope.txt"], "no such file"),
        (["-t", "One text.", "--mixing-text", "3"], "(--mixing-text) 3"),
        (["-t", "One text.", "--mixing-block", "9"], "(--mixing-block): 9"),
        (["-t", "One text.", "--mixing-block", "2"], "has blocks 0..1"),  # 2 blocks: 0 and 1
        (["-t", "One text.", "--mixing-block", "-1"], "(--mixing-block): blocks count from 0"),
        (["-t", "One text.", "--vz-max-tokens", "-1"], "(--vz-max-tokens): must be 0 or more"),
    ],
)
def test_decompose_errors(tiny_dirs, tmp_path, args, fragment):
    out = tmp_path / "x"
    result = _run(["decompose", "-m", str(tiny_dirs["gpt2"]), "-o", str(out), *args])
    _assert_one_line_error(result, fragment)
    assert not out.exists()


@pytest.mark.parametrize("block", ["0", "1"])
def test_decompose_mixing_block_counts_from_zero(tiny_dirs, tmp_path, block):
    out = tmp_path / "dec"
    result = _run(
        [
            "decompose",
            "-m",
            str(tiny_dirs["gpt2"]),
            "-t",
            "One text.",
            "--mixing-block",
            block,
            "-o",
            str(out),
            "-q",
        ]
    )
    assert result.exit_code == 0, result.output
    assert (out / "mixing_heatmap.png").is_file()
    record = json.loads((out / "run.json").read_text())
    assert record["options"]["mixing_block"] == int(block)


def test_decompose_value_zeroing_length_limit(tiny_dirs, tmp_path):
    """Texts beyond --vz-max-tokens get NaN Value Zeroing and one counted warning; the
    default limit is the library's."""
    from residual_trace.experiments.decompose import DecomposeOptions
    from residual_trace.tracer.mixing import VZ_MAX_TOKENS

    assert DecomposeOptions().vz_max_tokens == VZ_MAX_TOKENS
    out = tmp_path / "dec"
    texts = ["Rain fell.", "The old dog chased the grey cat across the wide field."]
    args = ["decompose", "-m", str(tiny_dirs["bert"]), "-o", str(out), "--vz-max-tokens", "6"]
    result = _run([*args, "-t", texts[0], "-t", texts[1]])
    assert result.exit_code == 0, result.output
    assert "value zeroing: 1 of 2 texts have more than 6 tokens" in result.output
    mixing = pd.read_csv(out / "mixing.csv")
    assert mixing.loc[mixing["text_id"] == 0, "mix_vz"].notna().all()
    assert mixing.loc[mixing["text_id"] == 1, "mix_vz"].isna().all()
    summary = pd.read_csv(out / "summary.csv")  # the mean over the texts that have it
    kept = mixing[(mixing["text_id"] == 0) & ~mixing["is_special"]]
    np.testing.assert_allclose(summary["mix_vz"], kept.groupby("block")["mix_vz"].mean())


def test_readme_documents_every_perturb_column(tiny_models):
    from residual_trace.experiments.perturb import PerturbOptions
    from residual_trace.tracer.alignment_summary import HEAD_COLUMNS
    from residual_trace.tracer.perturb import PERTURBATION_COLUMNS, RESID_COLUMNS

    result = PerturbOptions(quiet=True).run(
        tiny_models["bert"], ["The dog chased the cat."], warn=lambda m: None
    )
    assert {"perturbations", "heads", "summary", "resid", "resid_summary"} <= set(result.tables)
    readme = docs_page("perturb")
    columns = [
        *PERTURBATION_COLUMNS,
        *RESID_COLUMNS,
        *HEAD_COLUMNS,
        *(c for table in result.tables.values() for c in table.columns),
    ]
    for column in columns:
        assert f"`{column}`" in readme, column
