"""The Ray engine: the same tables as one process, bit for bit, even when a worker dies.

A local Ray instance with 2 CPUs is started once for the module; the workers load the
tiny seeded checkpoints from disk, as they would load a checkpoint on a cluster node.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd
import pytest
import ray
from click.testing import CliRunner

import residual_trace as rt
from residual_trace.cli import trace
from residual_trace.errors import UserError
from residual_trace.experiments.engine import KILL_SHARD_ENV, plan_shards

TEXTS = [
    "The dog chased the cat.",
    "Rain fell on the old roof.",
    "A small bird sang at dawn.",
    "a",
    "The river ran past the mill and into the sea.",
    "She read the letter twice.",
    "Cold wind, bright sun.",
]


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield
    ray.shutdown()


def _assert_same_tables(local: rt.Result, sharded: rt.Result) -> None:
    assert list(local.tables) == list(sharded.tables)
    for key, frame in local.tables.items():
        pd.testing.assert_frame_equal(frame, sharded.tables[key], check_exact=True, obj=key)


@pytest.mark.parametrize(
    ("n_texts", "batch_size", "workers"), [(1, 1, 1), (7, 2, 2), (7, 16, 2), (100, 3, 5)]
)
def test_shards_are_whole_batches_covering_every_text_once(n_texts, batch_size, workers):
    shards = plan_shards(n_texts, batch_size, workers)
    assert [i for shard in shards for i in shard] == list(range(n_texts))
    assert all(shard.start % batch_size == 0 for shard in shards)
    assert len(shards) <= max(1, workers * 4)


def test_layers_on_ray_equals_one_process(local_ray, tiny_dirs, tiny_models):
    model = tiny_models["bert"]
    local = rt.layers(model, TEXTS, batch_size=2, save_attention=True)
    sharded = rt.layers(model, TEXTS, batch_size=2, save_attention=True, engine="ray", workers=2)
    _assert_same_tables(local, sharded)
    assert sorted(sharded.attention) == list(range(len(TEXTS)))
    for text_id, (tokens, pattern) in local.attention.items():
        assert sharded.attention[text_id][0] == tokens
        assert (sharded.attention[text_id][1] == pattern).all()


def _one_thread(run):
    """``run()`` with torch on one thread, like each of two workers on 2 CPUs: some matrix
    products round their last bit differently with another thread count."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run()
    finally:
        torch.set_num_threads(threads)


def test_decompose_on_ray_equals_one_process(local_ray, tiny_models):
    model = tiny_models["gpt2"]
    options = {"batch_size": 2, "per_head": True, "mixing_text": 4}
    local = _one_thread(lambda: rt.decompose(model, TEXTS, **options))
    sharded = rt.decompose(model, TEXTS, **options, engine="ray", workers=2)
    _assert_same_tables(local, sharded)
    # mixing_text 4 and the viewer's texts 0 and 1, per head too, from the shards that hold them
    assert set(sharded.tables["mixing_pairs"]["text_id"]) == {0, 1, 4}
    assert set(sharded.tables["attention_heads"]["text_id"]) == {0, 1, 4}


def test_lens_on_ray_equals_one_process(local_ray, tiny_models):
    model = tiny_models["llama"]
    options = {"batch_size": 2, "mid": True}
    local = _one_thread(lambda: rt.lens(model, TEXTS, **options))
    sharded = rt.lens(model, TEXTS, **options, engine="ray", workers=2)
    _assert_same_tables(local, sharded)
    assert sharded.summary["kl_unigram"].notna().all()  # the texts' counts reached the shards


def test_patch_on_ray_equals_one_process(local_ray, tiny_models):
    """Pairs are patch's items: shards of whole pairs, the same tables (noise mode too, whose
    noise scale, computed over every text, reaches the shards)."""
    model = tiny_models["llama"]
    texts = ["The cat sat on the mat.", "Rain fell on the old town.", "She walked to the shop."]
    base = {"answer": "the", "sites": ("resid",), "batch_size": 1, "quiet": True}
    clean = [t for t in texts for _ in range(2)]
    corrupt = [t.replace(t.split()[1], w) for t in texts for w in ("dog", "snow")]
    same = [
        len(model.encode(c)) == len(model.encode(x)) for c, x in zip(clean, corrupt, strict=True)
    ]
    pairs = [p for p, keep in zip(zip(clean, corrupt, strict=True), same, strict=True) if keep][:3]
    assert len(pairs) >= 2
    options = {**base, "clean": [c for c, _ in pairs], "corrupt": [x for _, x in pairs]}
    local = _one_thread(lambda: rt.patch(model, **options))
    sharded = rt.patch(model, **options, engine="ray", workers=2)
    _assert_same_tables(local, sharded)
    assert sharded.run_record([], "png")["engine"]["shards"] >= 2
    noisy = {**base, "clean": texts, "corrupt_noise": True, "subject": ["the"], "samples": 2}
    local = _one_thread(lambda: rt.patch(model, **noisy))
    sharded = rt.patch(model, **noisy, engine="ray", workers=2)
    _assert_same_tables(local, sharded)


def test_perturb_on_ray_equals_one_process(local_ray, tiny_models):
    model = tiny_models["llama"]
    options = {"batch_size": 2, "mode": "shuffle", "samples": 2, "show_text": 5}
    local = _one_thread(lambda: rt.perturb(model, TEXTS, **options))
    sharded = rt.perturb(model, TEXTS, **options, engine="ray", workers=2)
    _assert_same_tables(local, sharded)
    assert sharded.skipped == local.skipped == [3]  # "a" has one content token
    assert sharded.example is not None and local.example is not None
    assert sharded.example.label == local.example.label
    assert list(sharded.example.perturbed) == list(local.example.perturbed)
    for head, pattern in local.example.perturbed.items():
        assert (sharded.example.perturbed[head] == pattern).all()


def test_a_worker_killed_mid_shard_loses_and_duplicates_nothing(
    local_ray, tiny_models, tmp_path, monkeypatch
):
    model = tiny_models["bert"]
    local = rt.layers(model, TEXTS, batch_size=2)
    marker = tmp_path / "killed"
    monkeypatch.setenv(KILL_SHARD_ENV, f"1:{marker}")
    sharded = rt.layers(model, TEXTS, batch_size=2, engine="ray", workers=2)
    assert marker.exists()  # the worker running shard 1 did die (SIGKILL)
    drift = sharded.tables["drift"]
    assert not drift.duplicated(["text_id", "position", "layer"]).any()
    _assert_same_tables(local, sharded)


def test_cli_engine_ray_writes_what_the_local_run_writes(local_ray, tiny_dirs, tmp_path):
    runner = CliRunner()
    outs = {}
    for engine in ("local", "ray"):
        out = tmp_path / engine
        extra = ["--engine", "ray", "--workers", "2"] if engine == "ray" else []
        texts = [arg for text in TEXTS for arg in ("-t", text)]
        args = ["decompose", "-m", str(tiny_dirs["bert"]), *texts, "--batch-size", "2", "-q"]
        command = [*args, "--out", str(out), *extra]
        result = _one_thread(lambda command=command: runner.invoke(trace, command))
        assert result.exit_code == 0, result.output
        outs[engine] = out
    record = json.loads((outs["ray"] / "run.json").read_text())
    assert record["engine"]["engine"] == "ray" and record["engine"]["workers"] == 2
    assert record["engine"]["shards"] >= 2
    assert json.loads((outs["local"] / "run.json").read_text())["engine"] == {"engine": "local"}
    local_files = sorted(p.name for p in outs["local"].iterdir())
    assert local_files == sorted(p.name for p in outs["ray"].iterdir())
    for name in local_files:
        if name.endswith(".csv"):
            assert (outs["local"] / name).read_bytes() == (outs["ray"] / name).read_bytes(), name


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--workers", "2"], "workers (--workers): goes with engine ray, not engine local"),
        (["--ray-address", "auto"], "ray_address (--ray-address): goes with engine ray"),
        (["--engine", "ray", "--workers", "0"], "workers (--workers): must be at least 1"),
        (["--engine", "ray", "--workers", "9"], "workers (--workers) 9: the Ray cluster has 2"),
        (["--engine", "spark"], "'spark' is not one of 'local', 'ray'"),
    ],
)
def test_engine_options_fail_in_one_line(local_ray, tiny_dirs, tmp_path, args, message):
    out = tmp_path / "run"
    cmd = ["layers", "-m", str(tiny_dirs["bert"]), "-t", "A dog.", "--out", str(out), *args]
    result = CliRunner().invoke(trace, cmd)
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output
    assert not out.exists()


def test_engine_ray_without_ray_installed_says_how_to_install(tiny_models, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(UserError, match=r"pip install 'residual-trace\[ray\]'"):
        rt.layers(tiny_models["bert"], TEXTS[:2], engine="ray")


def test_a_worker_that_cannot_load_the_model_fails_in_one_line(local_ray, tiny_dirs, tmp_path):
    import shutil

    from residual_trace import load_model

    copy = Path(shutil.copytree(tiny_dirs["bert"], tmp_path / "bert"))
    model = load_model(str(copy), device="cpu")
    for weights in copy.glob("*.safetensors"):
        weights.unlink()  # the workers find no weights where the driver found them
    with pytest.raises(UserError, match=r"^on a Ray worker: no weight file"):
        rt.layers(model, TEXTS[:2], engine="ray", workers=1)
