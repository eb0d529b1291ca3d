"""Half precision and device maps against float32, on the tiny seeded models.

Tolerances: bfloat16 keeps 8 significant bits (machine epsilon 2^-7), so each hook tensor is
rounded by up to 0.4% relative; a cosine between a rounded state and a float32 embedding
row moves by at most about that relative error, compounded over the blocks. Two blocks and
a handful of roundings per block stay well inside 0.05 (the real models: see the integration
tests and the README). float16 has 11 bits (epsilon 2^-10), eight times finer.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import residual_trace as rt
from residual_trace.errors import UserError
from residual_trace.tracer.decompose import reconstruction_tolerance

TEXTS = ["The cat sat on the mat.", "Rain fell on the old town and the river rose."]
TOLERANCE = {"bfloat16": 0.05, "float16": 0.05 / 8}


def _weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.bridge.original_model.parameters())


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_half_precision_is_close_to_float32(kind, dtype, tiny_dirs, tiny_models):
    full = tiny_models[kind]
    half = rt.load_model(str(tiny_dirs[kind]), device="cpu", dtype=dtype)
    assert half.dtype == getattr(torch, dtype)
    assert 2 * _weight_bytes(half) == _weight_bytes(full)
    assert {p.dtype for p in half.bridge.original_model.parameters()} == {half.dtype}
    a = rt.layers(full, TEXTS, quiet=True).tables["drift"]
    b = rt.layers(half, TEXTS, quiet=True).tables["drift"]
    assert b["cos_input"].dtype == np.float32  # measures stay float32
    for column in ("cos_input", "cos_input_normed", "cos_layer0", "baseline"):
        difference = float(np.nanmax(np.abs(a[column] - b[column])))
        assert difference < TOLERANCE[dtype], f"{column}: {difference:.4f}"
        assert difference > 0, "the half-precision run must really run in half precision"
    decomposed = rt.decompose(half, TEXTS, per_head=True, quiet=True)
    error = float(decomposed.tables["decompose"]["recon_error"].max())
    assert error < reconstruction_tolerance(half.dtype)
    record = decomposed.run_record([], "png")["model"]
    assert (record["dtype"], record["device_map"]) == (dtype, None)


def test_reconstruction_tolerance_follows_the_dtype():
    assert reconstruction_tolerance(torch.float32) == 1e-4
    assert reconstruction_tolerance(torch.bfloat16) == pytest.approx(4 * 2**-7)
    assert reconstruction_tolerance(torch.float16) == pytest.approx(4 * 2**-10)


def test_a_device_map_gives_the_same_numbers(tiny_dirs, tiny_models):
    """On a machine with one device every strategy places the whole model there, so the
    tables must equal the plain load's exactly; on several GPUs the same code path spreads
    the blocks (the measures then gather every hook on the first device)."""
    split = rt.load_model(str(tiny_dirs["gpt2"]), device="cpu", device_map="sequential")
    a = rt.decompose(tiny_models["gpt2"], TEXTS, quiet=True)
    b = rt.decompose(split, TEXTS, quiet=True)
    for key in ("decompose", "mixing"):
        np.testing.assert_array_equal(
            a.tables[key].select_dtypes("number"), b.tables[key].select_dtypes("number")
        )
    assert b.run_record([], "png")["model"]["device_map"] == "sequential"
    # the lens too: states and head placed by the map, every state (and mid) decoded alike
    plain = rt.lens(tiny_models["gpt2"], TEXTS, mid=True, quiet=True).tables["lens"]
    mapped = rt.lens(split, TEXTS, mid=True, quiet=True).tables["lens"]
    pd.testing.assert_frame_equal(plain, mapped)


def test_bad_precision_options_are_one_line_errors(tiny_dirs):
    with pytest.raises(UserError, match=r"--dtype float8: expected one of float32"):
        rt.load_model(str(tiny_dirs["gpt2"]), dtype="float8")
    with pytest.raises(UserError, match=r"--device-map everywhere: expected one of auto"):
        rt.load_model(str(tiny_dirs["gpt2"]), device_map="everywhere")


def test_cli_records_dtype_and_device_map(tiny_dirs, tmp_path):
    import json

    from click.testing import CliRunner

    from residual_trace.cli import trace

    out = tmp_path / "run"
    args = ["layers", "-m", str(tiny_dirs["llama"]), "-t", TEXTS[0], "-o", str(out)]
    result = CliRunner().invoke(trace, [*args, "--dtype", "bfloat16", "--quiet"])
    assert result.exit_code == 0, result.output
    model = json.loads((out / "run.json").read_text())["model"]
    assert (model["dtype"], model["device_map"]) == ("bfloat16", None)
    bad = CliRunner().invoke(trace, ["layers", "--dtype", "float8"])
    assert bad.exit_code == 2 and "float8" in bad.output and "Traceback" not in bad.output
