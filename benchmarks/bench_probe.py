"""Benchmark: the default ``trace probe --model minilm`` (bundled Lancaster norms, 500
concepts, every condition, PLSR and FFNN, 10 folds, layers 0, 3, 6), wall time and peak
memory, against a named baseline measured in the same run:

- baseline: the same command with ``--mapper ridge`` (closed form, the cheapest mapper), so
  the ratio is the price of PLSR's and the FFNN's in-fold capacity search.

Each variant runs in a fresh process (``--no-cache``, so the embeddings are recomputed) and
its peak memory is that process's max RSS. Target: the default under 10 minutes on 2 cores.
Usage: ``python benchmarks/bench_probe.py``.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import tempfile
import time


def _run(extra: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one ``trace probe`` process."""
    with tempfile.TemporaryDirectory() as out:
        code = (
            "import sys, resource; from residual_trace.cli import main\n"
            "try:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n    code = e.code\n"
            "else:\n    code = 0\n"
            "print('MAXRSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
            "sys.exit(code)"
        )
        args = [
            "probe",
            "--model",
            "minilm",
            "--no-cache",
            "--quiet",
            "--out",
            f"{out}/run",
            *extra,
        ]
        start = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-c", code, *args], capture_output=True, text=True, check=False
        )
        seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"trace probe failed: {done.stderr.strip().splitlines()[-1:]}")
    line = [row for row in done.stderr.splitlines() if row.startswith("MAXRSS")][-1]
    return seconds, int(line.split()[1]) / 1024.0


def main() -> None:
    print(f"python {platform.python_version()}, {os.cpu_count()} CPUs, torch threads default")
    base_s, base_mb = _run(["--mapper", "ridge"])
    full_s, full_mb = _run([])
    print(f"{'variant':<52} {'seconds':>8} {'x baseline':>10} {'peak MiB':>9}")
    print(f"{'baseline: --mapper ridge':<52} {base_s:>8.1f} {1.0:>10.2f} {base_mb:>9.0f}")
    ratio = full_s / base_s
    name = "default: --mapper plsr --mapper ffnn"
    print(f"{name:<52} {full_s:>8.1f} {ratio:>10.2f} {full_mb:>9.0f}")
    print(f"target: default under 600 s -> {'met' if full_s < 600 else 'NOT met'}")


if __name__ == "__main__":
    main()
