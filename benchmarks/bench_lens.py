"""Benchmark: ``trace lens --lens logit`` against TransformerLens's ``logit_lens``, same work.

Both read every residual state of every position of the same texts on ``smollm2`` (the
bundled sentences, in batches of 8), through the final norm and the unembedding, and both end
with the same per-row columns (top token, input and next-token ranks and probabilities, KL
to the output, entropy) from the same code (:func:`residual_trace.tracer.lens._stats`), so
that the work is equal:

- ``tl``: ``transformer_lens.tools.analysis.logit_lens.logit_lens(bridge, tokens,
  positions=None)`` per batch (TransformerLens 4.3's logit lens, every layer's logits at once),
  then the columns;
- ``ours``: :func:`residual_trace.tracer.lens.iter_lens_encoded` (``trace lens`` without the
  summary, figures and files).

Each variant runs in a fresh process (its peak RSS is its own); the parent prints the
seconds and peak MiB of each and their ratios to ``tl``. Usage: ``python
benchmarks/bench_lens.py [--texts 40] [--repeats 2]``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from typing import Any

import torch

BATCH_SIZE = 8


def _texts(n: int) -> list[str]:
    from residual_trace.experiments import bundled_sentences

    return bundled_sentences()[:n]


def _ours(model: Any, encoded: Any) -> int:
    from residual_trace.experiments.lens import LensOptions, _lens_functions
    from residual_trace.tracer.lens import iter_lens_encoded

    lenses, own = _lens_functions(model, LensOptions(lenses=("logit",)))
    rows = 0
    for table, _, _ in iter_lens_encoded(model, encoded, lenses, own, batch_size=BATCH_SIZE):
        rows += len(table)
    return rows


def _tl(model: Any, encoded: Any) -> int:
    from transformer_lens.tools.analysis.logit_lens import logit_lens

    from residual_trace.tracer.batching import iter_batches
    from residual_trace.tracer.lens import _Chunk, _next_ids, _stats

    rows = 0
    with torch.inference_mode():
        for batch in iter_batches(encoded, BATCH_SIZE, model.pad_id):
            result = logit_lens(model.bridge, batch.ids, positions=None)
            logits = result.values.float()  # [layer, batch, pos, vocab]
            valid = batch.mask.bool()
            final = torch.log_softmax(logits[-1][valid], -1)
            chunk = _Chunk(
                batch.ids[valid], _next_ids(batch, valid.device, True), final, final.exp()
            )
            for layer in range(logits.shape[0]):
                stats = _stats(logits[layer][valid], chunk)
                rows += int(stats["kl_final"].shape[0])
    return rows


def _child(variant: str, n_texts: int, repeats: int) -> None:
    torch.set_num_threads(torch.get_num_threads())
    from residual_trace import load_model
    from residual_trace.tracer.batching import prepare_texts

    model = load_model("smollm2", device="cpu")
    encoded = prepare_texts(model, _texts(n_texts), None, None)
    run = _ours if variant == "ours" else _tl
    run(model, encoded[:BATCH_SIZE])  # warm-up
    times, rows = [], 0
    for _ in range(repeats):
        start = time.perf_counter()
        rows = run(model, encoded)
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"variant": variant, "seconds": min(times), "rows": rows, "peak_mib": peak}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--variant", choices=("ours", "tl"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        _child(args.variant, args.texts, args.repeats)
        return
    results = {}
    for variant in ("tl", "ours"):
        argv = [sys.executable, __file__, "--variant", variant, "--texts", str(args.texts),
                "--repeats", str(args.repeats)]  # fmt: skip
        done = subprocess.run(argv, check=True, capture_output=True, text=True)
        results[variant] = json.loads(done.stdout.strip().splitlines()[-1])
    base = results["tl"]
    print(f"smollm2, {args.texts} bundled sentences, batch size {BATCH_SIZE}, "
          f"{torch.get_num_threads()} threads, best of {args.repeats}")  # fmt: skip
    print(f"{'variant':<8} {'seconds':>8} {'x tl':>6} {'peak MiB':>9} {'x tl':>6} {'rows':>8}")
    for variant, r in results.items():
        print(
            f"{variant:<8} {r['seconds']:>8.2f} {r['seconds'] / base['seconds']:>6.2f} "
            f"{r['peak_mib']:>9.0f} {r['peak_mib'] / base['peak_mib']:>6.2f} {r['rows']:>8}"
        )


if __name__ == "__main__":
    main()
