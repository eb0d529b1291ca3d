"""Benchmark: time and peak memory against input length, as ratios to a floor in the same run.

For each length, ``--texts`` texts of exactly that many tokens (bundled sentences joined
until long enough, then truncated with ``--max-length``) are written to a file, and every
variant runs in a fresh process so that its peak RSS is its own:

- floor: a Hugging Face eager forward with ``output_hidden_states`` and
  ``output_attentions`` on the same batches, followed by the same drift-table code (what
  any tool producing this table must at least do);
- ``trace layers``, ``trace decompose`` and ``trace perturb --mode shuffle --samples 2``,
  the commands as users run them (figures and files included); ``decompose-novz``
  (``--variants``) is ``trace decompose --vz-max-tokens 0``, the same without Value Zeroing.

Usage: ``python benchmarks/bench_length.py [--model minilm] [--lengths 64 128 256 512]
[--texts 8] [--batch-size 16] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FLOOR = """
import resource, sys, torch
from pathlib import Path
from transformers import AutoModel
from residual_trace import load_model
from residual_trace.tracer import encode_texts, iter_batches
from residual_trace.tracer.drift import _batch_frame, _scorers
model_name, texts_file = sys.argv[1], sys.argv[2]
length, batch_size = int(sys.argv[3]), int(sys.argv[4])
texts = Path(texts_file).read_text(encoding="utf-8").splitlines()
model = load_model(model_name, device="cpu")
hf = AutoModel.from_pretrained(model.resolved.directory, attn_implementation="eager").eval()
encoded = encode_texts(model, texts, length)
scorers = _scorers(model, normed=True)
with torch.inference_mode():
    for batch in iter_batches(encoded, batch_size, model.pad_id):
        out = hf(input_ids=batch.ids, attention_mask=batch.mask, output_hidden_states=True,
                 output_attentions=True)
        resid = torch.stack(out.hidden_states)
        _batch_frame(model, batch, resid, scorers)
        del out, resid
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""

VERB = """
import resource, sys, tempfile
from residual_trace.cli import main
out = tempfile.mkdtemp()
try:
    main(sys.argv[1:] + ["-q", "-o", out + "/run"])
except SystemExit as error:
    assert not error.code, error.code
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def _texts(model: str, length: int, count: int) -> list[str]:
    from residual_trace import load_model
    from residual_trace.experiments import bundled_sentences

    traced = load_model(model, device="cpu")
    sentences, texts, index = bundled_sentences(), [], 0
    for _ in range(count):
        text = ""
        while len(traced.encode(text)) < length + 8:
            text = f"{text} {sentences[index % len(sentences)]}".strip()
            index += 1
        texts.append(text)
    return texts


def _run(code: str, args: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS MiB) of a fresh process running ``code`` with ``args``."""
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, check=False
    )
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["?"]
        raise RuntimeError(f"{args[:2]} failed: {tail[0]}")
    return seconds, int(done.stdout.strip().splitlines()[-1]) / 1024.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 128, 256, 512])
    parser.add_argument("--texts", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["layers", "decompose", "perturb"],
        help="verbs to measure (the floor always runs)",
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    rows: list[dict[str, object]] = []
    print(f"{args.model}, {args.texts} texts per length, batch size {args.batch_size}")
    header = ("length", "variant", "seconds", "x floor", "peak MiB", "x floor")
    print("{:>6} {:<10} {:>8} {:>8} {:>9} {:>8}".format(*header))
    with tempfile.TemporaryDirectory() as folder:
        for length in args.lengths:
            path = Path(folder) / f"texts-{length}.txt"
            path.write_text("\n".join(_texts(args.model, length, args.texts)) + "\n")
            common = ["-m", args.model, "-f", str(path), "--max-length", str(length)]
            common += ["--batch-size", str(args.batch_size)]
            variants = {
                "floor": (FLOOR, [args.model, str(path), str(length), str(args.batch_size)]),
                "layers": (VERB, ["layers", *common]),
                "decompose": (VERB, ["decompose", *common]),
                # decompose without Value Zeroing: what the n^2 re-runs of each block cost
                "decompose-novz": (VERB, ["decompose", *common, "--vz-max-tokens", "0"]),
                "perturb": (VERB, ["perturb", *common, "--mode", "shuffle", "--samples", "2"]),
            }
            floor: tuple[float, float] | None = None
            chosen = {k: v for k, v in variants.items() if k == "floor" or k in args.variants}
            for name, (code, argv) in chosen.items():
                try:
                    seconds, peak = _run(code, argv)
                except RuntimeError as error:
                    print(f"{length:>6} {name:<10} failed: {error}")
                    rows.append({"length": length, "variant": name, "error": str(error)})
                    continue
                floor = floor or (seconds, peak)
                print(
                    f"{length:>6} {name:<10} {seconds:>8.1f} {seconds / floor[0]:>8.2f} "
                    f"{peak:>9.0f} {peak / floor[1]:>8.2f}"
                )
                rows.append(
                    {
                        "length": length,
                        "variant": name,
                        "seconds": seconds,
                        "peak_mib": peak,
                        "time_ratio": seconds / floor[0],
                        "memory_ratio": peak / floor[1],
                    }
                )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        record = {"model": args.model, "texts": args.texts, "batch_size": args.batch_size}
        args.json.write_text(json.dumps({**record, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
