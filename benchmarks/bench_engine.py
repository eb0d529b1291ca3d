"""Benchmark: ``--engine ray`` against one process, time and peak memory, in the same run.

Each variant is the command as users run it (``trace VERB ... -q``, files and figures
included), in a fresh process:

- baseline: ``--engine local`` (one process, torch on every core);
- ``--engine ray --workers N``: a local Ray instance started by the command, N workers
  each holding the model (torch on cores / N threads each).

Time is wall-clock from launch to exit, so it includes starting Ray and loading the model
in every worker. Peak memory is the largest *sum* of the resident memory of the command's
whole process tree (driver, Ray's own processes and the workers), sampled every 50 ms from
/proc: what the run takes from the machine, not only the driver's share.

Usage: ``python benchmarks/bench_engine.py [--model minilm] [--verbs layers decompose
perturb] [--workers 2] [--repeat N] [--json out.json]``. The texts are the bundled
sentences (``--repeat`` copies of them, for a larger corpus).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PAGE = os.sysconf("SC_PAGE_SIZE")

VERB_ARGS = {
    "layers": ["layers"],
    "decompose": ["decompose"],
    "perturb": ["perturb", "--mode", "shuffle", "--samples", "2"],
}


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def _tree_rss(root: int) -> int:
    """Resident bytes of ``root`` and all its descendants."""
    tree, total, stack = _children(), 0, [root]
    while stack:
        pid = stack.pop()
        with contextlib.suppress(OSError):
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
        stack += tree.get(pid, [])
    return total


def _run(args: list[str]) -> tuple[float, float]:
    """(seconds, peak process-tree RSS in MiB) of ``trace ARGS`` in a fresh process."""
    out = tempfile.mkdtemp()
    command = [sys.executable, "-m", "residual_trace.cli", *args, "-q", "-o", f"{out}/run"]
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _tree_rss(process.pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    _, stderr = process.communicate()
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    if process.returncode:
        raise SystemExit(f"{' '.join(args)} failed: {stderr.decode()[-2000:]}")
    return seconds, peak / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--verbs", nargs="+", default=list(VERB_ARGS), choices=list(VERB_ARGS))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=1, help="copies of the bundled sentences")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    from residual_trace.experiments import bundled_sentences

    texts = bundled_sentences() * args.repeat
    folder = Path(tempfile.mkdtemp())
    texts_file = folder / "texts.txt"
    texts_file.write_text("\n".join(texts) + "\n", encoding="utf-8")
    print(
        f"{args.model}, {len(texts)} texts (bundled sentences x{args.repeat}), "
        f"{os.cpu_count()} CPUs; baseline: --engine local in one process",
        flush=True,
    )
    print(f"{'verb':<10} {'engine':<16} {'time':>8} {'peak MiB':>9} {'time x':>7} {'mem x':>6}")
    rows = []
    for verb in args.verbs:
        base = ["-m", args.model, "-f", str(texts_file)]
        local = _run([*VERB_ARGS[verb], *base])
        ray = _run([*VERB_ARGS[verb], *base, "--engine", "ray", "--workers", str(args.workers)])
        for name, (seconds, mib) in (
            ("local", local),
            (f"ray, {args.workers} workers", ray),
        ):
            ratio_t, ratio_m = seconds / local[0], mib / local[1]
            print(
                f"{verb:<10} {name:<16} {seconds:>7.1f}s {mib:>9.0f} {ratio_t:>6.2f}x "
                f"{ratio_m:>5.2f}x",
                flush=True,
            )
            rows.append(
                {
                    "verb": verb,
                    "engine": name,
                    "seconds": seconds,
                    "peak_mib": mib,
                    "time_ratio": ratio_t,
                    "memory_ratio": ratio_m,
                }
            )
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
