"""Benchmark: tracing the bundled sentences on minilm, as ratios against baselines in one run.

Baselines, on the same batches (same batch size, same padding), each followed by the *same*
metric computation so that every variant produces the same drift table:

- floor: a Hugging Face eager forward (``BertModel``) with ``output_hidden_states`` and
  ``output_attentions``: the table with no hooks at all;
- run_with_cache: TransformerLens ``run_with_cache`` with every hook (the default way).

Then peak memory (max RSS of a fresh process running ``trace layers``) for 1x and 10x the
input. Usage: ``python benchmarks/bench_layers.py [--repeats 3] [--skip-memory]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from residual_trace import load_model
from residual_trace.experiments import bundled_sentences
from residual_trace.models import TracedModel
from residual_trace.tracer import encode_texts, iter_batches, iter_drift
from residual_trace.tracer.drift import _batch_frame, _scorers

BATCH_SIZE = 16


def _ours(model: TracedModel, texts: list[str], patterns: bool) -> int:
    sink = (lambda text_id, tokens, pattern: None) if patterns else None
    frames = iter_drift(model, texts, batch_size=BATCH_SIZE, patterns=sink)
    return sum(len(frame) for frame in frames)


def _with_forward(
    model: TracedModel,
    texts: list[str],
    forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> int:
    """Same batches and the same metric code, with the residual stream from ``forward``."""
    encoded = encode_texts(model, texts, 512)
    scorers = _scorers(model, normed=True)
    rows = 0
    with torch.inference_mode():
        for batch in iter_batches(encoded, BATCH_SIZE, model.pad_id):
            resid = forward(batch.ids, batch.mask)
            rows += len(_batch_frame(model, batch, resid, scorers))
    return rows


def _hf_forward(directory: Path) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    from transformers import AutoModel

    hf = AutoModel.from_pretrained(directory, attn_implementation="eager").eval()

    def forward(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = hf(
            input_ids=ids, attention_mask=mask, output_hidden_states=True, output_attentions=True
        )
        return torch.stack(out.hidden_states)

    return forward


def _run_with_cache(model: TracedModel) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    names = [model.spec.resid_hook(k) for k in range(model.n_blocks + 1)]

    def forward(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        _, cache = model.bridge.run_with_cache(ids, attention_mask=mask)
        return torch.stack([cache[name] for name in names])

    return forward


def _time(fn: Callable[[], int], repeats: int) -> tuple[float, int]:
    fn()  # warm-up
    best, rows = float("inf"), 0
    for _ in range(repeats):
        start = time.perf_counter()
        rows = fn()
        best = min(best, time.perf_counter() - start)
    return best, rows


def _peak_rss_mib(texts_file: Path) -> float:
    """Max RSS (MiB) of a fresh process running `trace layers` on ``texts_file``."""
    code = (
        "import resource, sys, tempfile\n"
        "from residual_trace.cli import main\n"
        "out = tempfile.mkdtemp()\n"
        "try:\n"
        f"    main(['layers', '-q', '-f', {str(texts_file)!r}, '-o', out + '/run'])\n"
        "except SystemExit as e:\n"
        "    assert not e.code, e.code\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(done.stdout.strip().splitlines()[-1]) / 1024.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    args = parser.parse_args()

    texts = bundled_sentences()
    model = load_model("minilm", device="cpu")
    floor = _hf_forward(model.resolved.directory)
    cache = _run_with_cache(model)
    variants: dict[str, Callable[[], int]] = {
        "floor: HF eager forward (hidden states + attentions) + metrics": lambda: _with_forward(
            model, texts, floor
        ),
        "TransformerLens run_with_cache (every hook) + metrics": lambda: _with_forward(
            model, texts, cache
        ),
        "residual-trace (resid stream only)": lambda: _ours(model, texts, patterns=False),
        "residual-trace (resid stream + attention patterns)": lambda: _ours(
            model, texts, patterns=True
        ),
    }
    results: dict[str, float] = {}
    rows: set[int] = set()
    print(
        f"minilm, {len(texts)} bundled sentences, batch size {BATCH_SIZE}, "
        f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}"
    )
    for name, fn in variants.items():
        seconds, n = _time(fn, args.repeats)
        results[name] = seconds
        rows.add(n)
    assert len(rows) == 1, f"variants produced different tables: {rows}"
    base = next(iter(results.values()))
    print(f"{'variant':<66} {'seconds':>8} {'x floor':>8}")
    for name, seconds in results.items():
        print(f"{name:<66} {seconds:>8.2f} {seconds / base:>8.2f}")
    record: dict[str, object] = {"seconds": results, "rows": rows.pop(), "texts": len(texts)}
    if not args.skip_memory:
        with tempfile.TemporaryDirectory() as folder:
            one, ten = Path(folder) / "x1.txt", Path(folder) / "x10.txt"
            one.write_text("\n".join(texts) + "\n", encoding="utf-8")
            ten.write_text("\n".join(texts * 10) + "\n", encoding="utf-8")
            peak_one, peak_ten = _peak_rss_mib(one), _peak_rss_mib(ten)
        print(
            f"peak RSS of `trace layers`: 1x input {peak_one:.0f} MiB, 10x input "
            f"{peak_ten:.0f} MiB (+{peak_ten - peak_one:.0f} MiB, x{peak_ten / peak_one:.2f})"
        )
        record["peak_rss_mib"] = {"x1": peak_one, "x10": peak_ten}
    record["self_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
