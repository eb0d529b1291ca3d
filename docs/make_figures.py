"""Regenerate every figure the documentation shows (``make docs-figures``).

- ``docs/report-drift.png``: ``trace report`` on the two packaged models, ``layers`` only, on
  the first 60 bundled sentences (its ``figures/drift.png``);
- ``docs/train-lens-*.png``: ``trace train-lens`` on ``smollm2`` with its defaults, on the
  bundled sentences after the first 39; ``docs/lens-*.png``: ``trace lens`` with that tuned
  lens on one factual prompt and the first 39 sentences (its ``lens_curves`` and, for the
  prompt, ``lens_grid`` and ``lens_grid_tuned``);
- ``docs/patch-*``: ``trace patch`` on ``smollm2`` over the eight factual pairs of
  ``docs/patch-facts.tsv`` and on ``minilm`` over ``docs/patch-minilm.tsv`` (state-cos);
- ``docs/length-scaling.png``: ``benchmarks/bench_length.py`` on both packaged models (time and
  peak memory against input length, as multiples of the floor measured in the same run),
  drawn by ``benchmarks/plot_length.py``. This one runs the benchmark: minutes to tens of
  minutes on a laptop's CPU. ``--only report`` skips it.

Usage: ``python docs/make_figures.py [--only report|lens|patch|length]``.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

DOCS = Path(__file__).parent
ROOT = DOCS.parent


def _run(*argv: str) -> None:
    print("+", " ".join(argv), flush=True)
    subprocess.run(argv, check=True, cwd=ROOT)


def report_drift(work: Path) -> None:
    """``docs/report-drift.png`` from a report on minilm and smollm2."""
    out = work / "report"
    _run(
        sys.executable,
        "-m",
        "residual_trace",
        "report",
        "--experiment",
        "layers",
        "-o",
        str(out),
        "-q",
    )
    shutil.copyfile(out / "figures" / "drift.png", DOCS / "report-drift.png")


#: The prompt the lens grid shows (text 0 of the lens run).
LENS_PROMPT = "The Eiffel Tower is in the city of"


def lens_figures(work: Path) -> None:
    """The lens pages' figures: a tuned lens trained on smollm2, then both lenses read.

    ``trace train-lens`` with its defaults on the bundled sentences after the first 39
    (``docs/train-lens-*.png``), then ``trace lens --tuned-lens`` on the prompt and the
    first 39 sentences, which the lens never saw (``docs/lens-*.png``).
    """
    import time

    sys.path.insert(0, str(ROOT))
    from residual_trace.experiments import bundled_sentences

    sentences = bundled_sentences()
    corpus, texts = work / "lens-corpus.txt", work / "lens-texts.txt"
    corpus.write_text("\n".join(sentences[39:]) + "\n", encoding="utf-8")
    texts.write_text("\n".join([LENS_PROMPT, *sentences[:39]]) + "\n", encoding="utf-8")
    trained, read = work / "smollm2-lens", work / "lens"
    start = time.perf_counter()
    _run(sys.executable, "-m", "residual_trace", "train-lens", "--model", "smollm2", "--file",
         str(corpus), "-o", str(trained), "-q")  # fmt: skip
    print(f"train-lens took {time.perf_counter() - start:.0f} s", flush=True)
    _run(sys.executable, "-m", "residual_trace", "lens", "--model", "smollm2", "--file",
         str(texts), "--tuned-lens", str(trained), "-o", str(read), "-q")  # fmt: skip
    copies = {
        read / "lens_curves.png": "lens-curves.png",
        read / "lens_grid.png": "lens-grid.png",
        read / "lens_grid_tuned.png": "lens-grid-tuned.png",
        read / "summary.csv": "lens-summary.csv",
        trained / "training.png": "train-lens-training.png",
        trained / "heldout.png": "train-lens-heldout.png",
        trained / "heldout_summary.csv": "train-lens-heldout.csv",
    }
    for source, name in copies.items():
        shutil.copyfile(source, DOCS / name)


def patch_figures(work: Path) -> None:
    """The patch page's figures: SmolLM2 on eight factual pairs, minilm's state-cos trace.

    ``trace patch`` on ``docs/patch-facts.tsv`` (window 10 for attn and mlp, as Meng et al.)
    and on ``docs/patch-minilm.tsv`` (``--metric state-cos --at 0``).
    """
    import time

    facts, minilm = work / "patch-facts", work / "patch-minilm"
    start = time.perf_counter()
    _run(sys.executable, "-m", "residual_trace", "patch", "--model", "smollm2", "--pairs",
         str(DOCS / "patch-facts.tsv"), "--window", "10", "-o", str(facts), "-q")  # fmt: skip
    print(f"patch on smollm2 took {time.perf_counter() - start:.0f} s", flush=True)
    _run(sys.executable, "-m", "residual_trace", "patch", "--model", "minilm", "--pairs",
         str(DOCS / "patch-minilm.tsv"), "--metric", "state-cos", "--at", "0", "--site",
         "resid", "-o", str(minilm), "-q")  # fmt: skip
    copies = {
        facts / "patch_summary.png": "patch-facts-summary.png",
        facts / "patch_resid.png": "patch-facts-resid.png",
        facts / "summary.csv": "patch-facts-summary.csv",
        minilm / "patch_summary.png": "patch-minilm-summary.png",
        minilm / "summary.csv": "patch-minilm-summary.csv",
    }
    for source, name in copies.items():
        shutil.copyfile(source, DOCS / name)


def length_scaling(work: Path) -> None:
    """``docs/length-scaling.png`` from the length benchmark on both packaged models."""
    bench = str(ROOT / "benchmarks" / "bench_length.py")
    minilm, smollm2 = work / "minilm.json", work / "smollm2.json"
    _run(sys.executable, bench, "--json", str(minilm))
    _run(sys.executable, bench, "--model", "smollm2", "--lengths", "256", "1024", "2048",
         "--texts", "2", "--batch-size", "1", "--json", str(smollm2))  # fmt: skip
    plot = str(ROOT / "benchmarks" / "plot_length.py")
    _run(sys.executable, plot, str(minilm), str(smollm2), "--out", str(DOCS / "length-scaling.png"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("report", "lens", "patch", "length"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        if args.only in (None, "report"):
            report_drift(Path(folder))
        if args.only in (None, "lens"):
            lens_figures(Path(folder))
        if args.only in (None, "patch"):
            patch_figures(Path(folder))
        if args.only in (None, "length"):
            length_scaling(Path(folder))


if __name__ == "__main__":
    main()
