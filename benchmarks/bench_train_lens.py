"""Benchmark: ``trace train-lens``'s step time and peak memory against tuned-lens's own loop.

Both train a tuned lens for ``smollm2`` (the packaged SmolLM2-135M, its float32 checkpoint
folder from :func:`residual_trace.models.resolve.resolve`) on CPU in float32, from zero
translators, with the same optimiser (SGD, Nesterov 0.9, lr 0.1, weight decay 1e-3, clip 1,
linear decay), the same loss (KL(final || lens) per layer, one backward per layer), for the
same ``--steps`` of ``--tokens-per-step`` tokens, on the same texts: the bundled sentences
``trace train-lens`` trains on (all but the last 10%, its held-out share).

- ``tuned-lens`` (the named baseline): ``benchmarks/peers/tuned_lens_train.py`` run by the
  peer's own virtual environment (``.venv-peers/tuned-lens``: tuned-lens 0.2.0 and its
  dependencies; see ``PEER_PINS``), which drives their ``Train.execute()`` (their model and
  data loading, ``chunk_and_tokenize``, ``DataLoader2``, optimiser, scheduler and loop).
  Their loop runs the lens under ``torch.autocast(bfloat16)``; here it is disabled
  (``--autocast off``) so that both sides compute in float32. Their data: the texts joined
  with EOS and cut into sequences of ``--tokens-per-step`` tokens (one sequence per step,
  batch size 1), exactly ``--tokens-per-step`` tokens a step.
- ``tuned-lens-bf16`` (only when named in ``--variants``): the same with their bfloat16
  autocast left on, as their loop ships. On a CPU without native bfloat16 this is far slower.
- ``ours``: :func:`residual_trace.tracer.lens_training.train_tuned_lens` (the training of
  ``trace train-lens`` without the held-out measure and the files) with the same plan: one
  text per sequence, texts drawn in a seeded order until the step has at least
  ``--tokens-per-step`` tokens (so a few more, printed), in batches of 16 texts.

Work that differs: the peer reads fixed-length chunks of the joined texts (one 128-token
sequence), we read whole sentences (about a dozen 11-token sequences, padded per batch):
the lens, which is nearly all of a step (30 layers x a vocabulary-sized head, forward and
backward), sees the same number of tokens; the model's own forward differs in padding and
context length only. Their model is Hugging Face's ``LlamaForCausalLM``, ours
TransformerLens's bridge over the same weights; the peer computes the final logits for all
positions, we for the valid ones.

Each variant runs in a fresh process, so its peak RSS is its own. Step time excludes the
model load: the median over the steps after the first. The parent prints seconds per step,
milliseconds per token (ours reads a few more tokens a step), peak MiB, each as a ratio to
``tuned-lens``, the last step's mean KL over layers, and the
load average before and after. A peer that cannot be installed or run is reported as such.
The peer's environment is created when missing (``python3 -m venv``, ``torch==2.13.0``
first, then ``PEER_PINS``). Usage: ``python benchmarks/bench_train_lens.py [--steps 30]
[--tokens-per-step 128]`` (``make bench-train-lens``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PEER_VENV = ROOT / ".venv-peers" / "tuned-lens"
PEER_SCRIPT = ROOT / "benchmarks" / "peers" / "tuned_lens_train.py"
#: installed first and alone: any other torch requirement pulls a multi-GB CUDA build
TORCH_PIN = "torch==2.13.0"
#: tuned-lens 0.2.0 needs torchdata < 0.10 (its ``dataloader2``); transformers pinned to
#: the project's (5.x: one patch in the peer script, see its ``_compat_transformers5``)
PEER_PINS = ("tuned-lens==0.2.0", "torchdata==0.8.0", "transformers==5.25.0")
PEER_STAMP = PEER_VENV / ".installed"
BATCH_SIZE = 16  # trace train-lens's default --batch-size
SEED = 0


def _peer_python() -> Path:
    return PEER_VENV / "bin" / "python"


def ensure_peer() -> str | None:
    """Create the peer's environment when missing; ``None``, or why it cannot be had."""
    wanted = "\n".join((TORCH_PIN, *PEER_PINS))
    if PEER_STAMP.is_file() and PEER_STAMP.read_text() == wanted:
        return None
    print(f"creating {PEER_VENV.relative_to(ROOT)} ({', '.join(PEER_PINS)}) ...", flush=True)
    python = str(_peer_python())
    pip = [python, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    steps = {
        "python3 -m venv": ["python3", "-m", "venv", str(PEER_VENV)],
        f"pip install {TORCH_PIN}": [*pip, TORCH_PIN],
        f"pip install {' '.join(PEER_PINS)}": [*pip, TORCH_PIN, *PEER_PINS],
    }
    for label, argv in steps.items():
        done = subprocess.run(argv, capture_output=True, text=True)
        if done.returncode != 0:
            lines = [x for x in done.stderr.splitlines() if "is ignored" not in x] or [""]
            return f"cannot create the peer's environment ({label}): {lines[-1]}"
    PEER_STAMP.write_text(wanted)
    return None


def _child_ours(steps: int, tokens: int, threads: int | None) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)
    from residual_trace import load_model
    from residual_trace.models.readout import logit_readout, unembedding_weight
    from residual_trace.tracer.batching import prepare_texts
    from residual_trace.tracer.lens_training import (
        TrainingPlan,
        _step_texts,
        train_tuned_lens,
    )
    from residual_trace.tracer.tuned_lens import TunedLens, lens_config

    model = load_model("smollm2", device="cpu")
    encoded = prepare_texts(model, _texts(), None, None)
    head = logit_readout(model)
    config = lens_config(model.name, model.n_blocks, model.d_model, unembedding_weight(model), None)
    lens = TunedLens.identity(model.n_blocks, model.d_model, config)
    plan = TrainingPlan(steps, tokens, BATCH_SIZE, SEED)
    per_step = [sum(len(t.ids) for t in items) for items in _step_texts(encoded, plan)]
    marks, losses = [time.perf_counter()], []

    def on_step(step: int, lr: float, kl: list[float]) -> None:
        marks.append(time.perf_counter())
        losses.append(statistics.fmean(kl))

    train_tuned_lens(model, head, encoded, lens, plan, on_step=on_step)
    times = [b - a for a, b in itertools.pairwise(marks)]
    print(
        json.dumps(
            {
                "variant": "ours",
                "seconds_per_step": statistics.median(times[1:] or times),
                "step_seconds": times,
                "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "final_loss": losses[-1],
                "first_loss": losses[0],
                "tokens_per_step": statistics.fmean(per_step),
                "threads": torch.get_num_threads(),
            }
        )
    )


def _texts() -> list[str]:
    """The texts ``trace train-lens`` trains on by default: the bundled sentences, less 10%."""
    from residual_trace.experiments import bundled_sentences
    from residual_trace.experiments.train_lens import TrainLensOptions

    texts = bundled_sentences()
    return texts[: TrainLensOptions().split(len(texts))]


def _run(argv: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    done = subprocess.run(argv, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        lines = [x for x in done.stderr.splitlines() if x.strip()] or ["(no output)"]
        return {"error": f"exit {done.returncode}: {lines[-1]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _peer(variant: str, args: argparse.Namespace, texts_file: Path) -> dict[str, Any]:
    from residual_trace.models.resolve import resolve

    argv = [
        str(_peer_python()), str(PEER_SCRIPT), "--model", str(resolve("smollm2").directory),
        "--texts", str(texts_file), "--steps", str(args.steps),
        "--tokens-per-step", str(args.tokens_per_step),
        "--autocast", "bf16" if variant == "tuned-lens-bf16" else "off",
    ]  # fmt: skip
    if args.threads:
        argv += ["--threads", str(args.threads)]
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    return _run(argv, env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--tokens-per-step", type=int, default=128)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument(
        "--variants", nargs="+", default=["tuned-lens", "ours"],
        choices=("tuned-lens", "tuned-lens-bf16", "ours"),
    )  # fmt: skip
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be at least 2 (the first step is a warm-up)")
    if args.child:
        _child_ours(args.steps, args.tokens_per_step, args.threads)
        return

    texts = _texts()
    load_before = os.getloadavg()
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        texts_file = Path(tmp) / "texts.json"
        texts_file.write_text(json.dumps(texts))
        for variant in args.variants:
            print(f"running {variant} ...", flush=True)
            if variant == "ours":
                argv = [sys.executable, __file__, "--child", "--steps", str(args.steps),
                        "--tokens-per-step", str(args.tokens_per_step)]  # fmt: skip
                if args.threads:
                    argv += ["--threads", str(args.threads)]
                results[variant] = _run(argv)
                continue
            problem = ensure_peer()
            results[variant] = {"error": problem} if problem else _peer(variant, args, texts_file)
    load_after = os.getloadavg()

    print(
        f"smollm2, CPU float32, {args.steps} steps x {args.tokens_per_step} tokens, "
        f"{len(texts)} bundled sentences; s/step = median after the first step"
    )
    print(f"load average (1/5/15 min): before {load_before}, after {load_after}")
    for r in results.values():
        if "error" not in r:
            r["ms_per_token"] = 1000 * r["seconds_per_step"] / r["tokens_per_step"]
    base = results.get("tuned-lens", {})
    print(
        f"{'variant':<16} {'s/step':>7} {'x tuned-lens':>12} {'ms/token':>8} {'x tuned-lens':>12} "
        f"{'peak MiB':>8} {'x tuned-lens':>12} {'last KL':>7} {'tokens/step':>11}"
    )
    for variant, r in results.items():
        if "error" in r:
            print(f"{variant:<16} did not run: {r['error']}")
            continue
        cells = []
        for key, width, digits in (("seconds_per_step", 7, 2), ("ms_per_token", 8, 1),
                                   ("peak_mib", 8, 0)):  # fmt: skip
            cells.append(f"{r[key]:>{width}.{digits}f}")
            ratio = f"{r[key] / base[key]:.2f}" if base and "error" not in base else "n/a"
            cells.append(f"{ratio:>12}")
        print(
            f"{variant:<16} {' '.join(cells)} {r['final_loss']:>7.3f} {r['tokens_per_step']:>11.1f}"
        )
    for variant, r in results.items():
        if "error" not in r:
            timed = r["step_seconds"][1:]
            print(
                f"{variant}: steps after the first, s: min {min(timed):.2f}, median "
                f"{statistics.median(timed):.2f}, max {max(timed):.2f} (min: least disturbed)"
            )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        record = {"load_before": load_before, "load_after": load_after, "results": results}
        args.json.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
