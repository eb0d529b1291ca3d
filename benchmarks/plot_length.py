"""Draw ``bench_length.py --json`` results: time and peak memory against length, as ratios
to the floor measured in the same run, one column per model.

Usage: ``python benchmarks/plot_length.py minilm.json smollm2.json --out docs/length.png``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from matplotlib.figure import Figure

#: The issue's target: every verb within this many times the floor's peak memory.
TARGET = 1.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    runs = [json.loads(path.read_text()) for path in args.results]
    fig = Figure(figsize=(4.2 * len(runs), 6.0), layout="constrained")
    axes = fig.subplots(2, len(runs), squeeze=False)
    for column, run in enumerate(runs):
        rows = [r for r in run["rows"] if "error" not in r and r["variant"] != "floor"]
        for row_index, (key, label) in enumerate(
            (("time_ratio", "time × floor"), ("memory_ratio", "peak memory × floor"))
        ):
            ax = axes[row_index, column]
            for variant in dict.fromkeys(r["variant"] for r in rows):
                points = sorted((r["length"], r[key]) for r in rows if r["variant"] == variant)
                ax.plot(*zip(*points, strict=True), marker="o", label=variant)
            ax.axhline(1.0, color="0.5", lw=0.8)
            ax.axhline(TARGET, color="0.5", lw=0.8, ls="--")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("tokens per text")
            ax.set_ylabel(label)
            ax.set_ylim(bottom=0)
            ax.set_title(
                f"{run['model']}: {run['texts']} texts, batch {run['batch_size']}", fontsize=9
            )
        axes[0, column].legend(fontsize=8, frameon=False)
    fig.suptitle("against the floor (HF forward + the same drift table), dashed: 1.5×", fontsize=9)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)


if __name__ == "__main__":
    main()
