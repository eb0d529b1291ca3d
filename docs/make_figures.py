"""Regenerate every figure the documentation shows (``make docs-figures``).

- ``docs/report-drift.png``: ``trace report`` on the two packaged models, ``layers`` only, on
  the first 60 bundled sentences (its ``figures/drift.png``);
- ``docs/lens-curves.png`` and ``docs/lens-grid.png``: ``trace lens`` on ``smollm2`` (one
  factual prompt, then 39 bundled sentences: its ``lens_curves`` and, for the prompt,
  ``lens_grid``);
- ``docs/length-scaling.png``: ``benchmarks/bench_length.py`` on both packaged models (time and
  peak memory against input length, as multiples of the floor measured in the same run),
  drawn by ``benchmarks/plot_length.py``. This one runs the benchmark: minutes to tens of
  minutes on a laptop's CPU. ``--only report`` skips it.

Usage: ``python docs/make_figures.py [--only report|lens|length]``.
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
    """``docs/lens-curves.png`` and ``docs/lens-grid.png`` from ``trace lens`` on smollm2."""
    sys.path.insert(0, str(ROOT))
    from residual_trace.experiments import bundled_sentences

    texts = work / "lens-texts.txt"
    texts.write_text("\n".join([LENS_PROMPT, *bundled_sentences()[:39]]) + "\n", encoding="utf-8")
    out = work / "lens"
    _run(sys.executable, "-m", "residual_trace", "lens", "--model", "smollm2", "--file",
         str(texts), "-o", str(out), "-q")  # fmt: skip
    shutil.copyfile(out / "lens_curves.png", DOCS / "lens-curves.png")
    shutil.copyfile(out / "lens_grid.png", DOCS / "lens-grid.png")
    shutil.copyfile(out / "summary.csv", DOCS / "lens-summary.csv")


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
    parser.add_argument("--only", choices=("report", "lens", "length"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        if args.only in (None, "report"):
            report_drift(Path(folder))
        if args.only in (None, "lens"):
            lens_figures(Path(folder))
        if args.only in (None, "length"):
            length_scaling(Path(folder))


if __name__ == "__main__":
    main()
