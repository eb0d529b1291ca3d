"""Benchmark: ``trace patch --site resid`` against TransformerLens's ``get_act_patch_resid_pre``.

The same work on ``smollm2``: one clean/corrupt pair ("The Eiffel Tower is in the city of" /
"The Colosseum is in the city of", 10 tokens with BOS), every residual layer 0..29 (the input
of each block, ``resid_pre``) x every position restored from the clean run into the corrupt
one (300 cells), each scored by the logit difference " Paris" - " Rome" at the last position:

- ``tl``: ``transformer_lens.patching.get_act_patch_resid_pre(bridge, corrupt_tokens,
  clean_cache, metric)`` (TransformerLens 4.3: one forward pass of the whole model, head
  included, per cell), the clean cache from ``bridge.run_with_cache``;
- ``ours``: :func:`residual_trace.tracer.patching.run_cells` on the same cells (``trace
  patch`` without the floor, the summary, figures and files): the cells batched into
  forward passes as the memory budget allows, each stopped at the last block, the head run
  on the last position only.

Both grids are normalised the same way, ``(patched - corrupt) / (clean - corrupt)``, and
compared (the largest difference is printed). Each variant runs in a fresh process (its peak
RSS is its own); the parent prints seconds and peak MiB and their ratios to ``tl``. Usage:
``python benchmarks/bench_patch.py [--repeats 2]``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from typing import Any

import numpy as np
import torch

CLEAN = "The Eiffel Tower is in the city of"
CORRUPT = "The Colosseum is in the city of"
ANSWER, WRONG = " Paris", " Rome"


def _ours(model: Any, clean: list[int], corrupt: list[int], answer: int, wrong: int) -> np.ndarray:
    from residual_trace.models.readout import readout
    from residual_trace.tracer.patching import (
        MetricSpec,
        cells_per_pass,
        grid_cells,
        needed_hooks,
        run_cells,
        source_states,
    )

    states, final = source_states(model, clean, needed_hooks(model, ["resid"]))
    spec = MetricSpec("logit-diff", len(clean) - 1, answer, wrong, final)
    cells = grid_cells("resid", model.n_blocks, model.n_heads, len(clean))
    head = readout(model, "logit")
    per_pass = cells_per_pass(model, len(clean))
    values = run_cells(model, corrupt, cells, states, spec, head, per_pass)
    return values.reshape(model.n_blocks, len(clean))


def _tl(model: Any, clean: list[int], corrupt: list[int], answer: int, wrong: int) -> np.ndarray:
    from transformer_lens.patching import get_act_patch_resid_pre

    bridge = model.bridge
    with torch.inference_mode():
        _, cache = bridge.run_with_cache(torch.tensor([clean]))

        def metric(logits: torch.Tensor) -> torch.Tensor:
            last = logits[0, -1].double()
            return last[answer] - last[wrong]

        grid = get_act_patch_resid_pre(bridge, torch.tensor([corrupt]), cache, metric)
    return grid.double().cpu().numpy()


def _child(variant: str, repeats: int) -> None:
    from residual_trace import load_model

    model = load_model("smollm2", device="cpu")
    clean, corrupt = model.encode(CLEAN), model.encode(CORRUPT)
    assert len(clean) == len(corrupt), (len(clean), len(corrupt))
    answer = model.tokenizer.encode(ANSWER, add_special_tokens=False)[0]
    wrong = model.tokenizer.encode(WRONG, add_special_tokens=False)[0]
    run = _ours if variant == "ours" else _tl
    times, grid = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        grid = run(model, clean, corrupt, answer, wrong)
        times.append(time.perf_counter() - start)
    assert grid is not None
    with torch.inference_mode():  # the unpatched metrics, for normalising (same for both)
        logits = [model.bridge(torch.tensor([ids]))[0, -1].double() for ids in (clean, corrupt)]
    clean_m, corrupt_m = (float(x[answer] - x[wrong]) for x in logits)
    effect = (grid - corrupt_m) / (clean_m - corrupt_m)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"variant": variant, "seconds": min(times), "peak_mib": peak,
                      "cells": int(grid.size), "effect": effect.tolist()}))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--variant", choices=("ours", "tl"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        _child(args.variant, args.repeats)
        return
    results = {}
    for variant in ("tl", "ours"):
        argv = [sys.executable, __file__, "--variant", variant, "--repeats", str(args.repeats)]
        done = subprocess.run(argv, check=True, capture_output=True, text=True)
        results[variant] = json.loads(done.stdout.strip().splitlines()[-1])
    base = results["tl"]
    gap = np.nanmax(np.abs(np.array(results["ours"]["effect"]) - np.array(base["effect"])))
    print(f"smollm2, one pair, {base['cells']} resid cells (30 layers x 10 positions), "
          f"{torch.get_num_threads()} threads, best of {args.repeats}")  # fmt: skip
    print(f"{'variant':<8} {'seconds':>8} {'x tl':>6} {'peak MiB':>9} {'x tl':>6}")
    for variant, r in results.items():
        print(
            f"{variant:<8} {r['seconds']:>8.2f} {r['seconds'] / base['seconds']:>6.2f} "
            f"{r['peak_mib']:>9.0f} {r['peak_mib'] / base['peak_mib']:>6.2f}"
        )
    print(f"largest |effect difference| between the two grids: {gap:.1e}")


if __name__ == "__main__":
    main()
