"""Peer: train a tuned lens with the tuned-lens package's own training loop (0.2.0).

Run with the peer's virtual environment (``.venv-peers/tuned-lens``, made by
``benchmarks/bench_train_lens.py``), never with the project's: this script imports only
tuned-lens and its dependencies.

It drives tuned-lens's own ``tuned_lens.scripts.train_loop.Train.execute()`` (the body of
``python -m tuned_lens train``), configured through its own ingredients:
``ingredients.Model(name=CHECKPOINT_DIR, precision="float32")`` (``AutoModelForCausalLM``
from the local folder), ``ingredients.Data(name=[TEXTS.jsonl], max_length=SEQ_LEN)`` (their
``Dataset.from_json`` branch, then their ``data.chunk_and_tokenize``: the texts joined with
EOS and cut into SEQ_LEN-token sequences), ``ingredients.Optimizer()`` (their defaults: SGD,
Nesterov 0.9, lr 0.1, weight decay 1e-3, linear decay) and ``ingredients.Distributed(
per_gpu_batch_size=B)`` (one process, CPU, their ``DataLoader2`` pipeline), with
``num_steps`` and ``tokens_per_step`` as given and ``LossChoice.KL``. Their loop is left
as it is: the model forward under ``no_grad`` with ``output_hidden_states``, one forward and
backward of ``TunedLens`` per layer under ``torch.autocast(bfloat16)``, clip 1, step.

One compatibility patch (see ``_compat_transformers5``): their ``Model.load`` passes
``load_in_8bit=False``, which transformers 5 rejects; a wrapper drops it. The only other
addition is a subclass of ``Train`` that overrides two hooks and nothing of the
work: ``setup`` (calls theirs, then notes the time: model load, tokenising and lens creation
are excluded) and ``_log`` (their per-step logging hook, a no-op without wandb, called once
after each optimiser step with the step's per-layer losses: it notes the time and the mean
loss over layers). ``--autocast off`` replaces ``torch.autocast`` by the same call with
``enabled=False`` in this process, so that their loop runs in float32 as ours does.

The texts repeat as often as needed: their data loader reads the data set once (the loop
stops silently when it runs out). Prints one JSON line: ``seconds_per_step`` (median over
the steps after the first), ``peak_mib`` (this process's max RSS), ``final_loss`` (the last
step's mean KL over layers, in nats, before its update), and the rest of the setup.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def _compat_transformers5(ing: object) -> None:
    """The one patch tuned-lens 0.2.0 needs on transformers 5: its ``Model.load``.

    It passes ``load_in_8bit=False`` (and ``torch_dtype``) to
    ``AutoModelForCausalLM.from_pretrained``; transformers 5 forwards the unknown
    ``load_in_8bit`` to the model's ``__init__``, which raises ``TypeError``. The name their
    module imported is replaced by a wrapper that drops ``load_in_8bit=False`` and renames
    ``torch_dtype`` to ``dtype``; every other argument goes through as they pass it.
    """
    from transformers import AutoModelForCausalLM

    class _Auto:
        @staticmethod
        def from_pretrained(
            *args: Any, load_in_8bit: bool = False, torch_dtype: Any = None, **kwargs: Any
        ) -> Any:
            if load_in_8bit:
                raise SystemExit("int8 needs bitsandbytes: not part of this benchmark")
            return AutoModelForCausalLM.from_pretrained(*args, dtype=torch_dtype, **kwargs)

    ing.AutoModelForCausalLM = _Auto  # type: ignore[attr-defined]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="local HF checkpoint directory")
    parser.add_argument("--texts", required=True, help="JSON file: a list of strings")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--tokens-per-step", type=int, default=128)
    parser.add_argument("--seq-len", type=int, help="tokens per sequence (default: per step)")
    parser.add_argument("--batch-size", type=int, default=1, help="sequences per forward")
    parser.add_argument("--autocast", choices=("bf16", "off"), default="bf16")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    seq_len = args.seq_len or args.tokens_per_step

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    work = Path(tempfile.mkdtemp(prefix="tuned-lens-peer-"))
    os.environ["HF_DATASETS_CACHE"] = str(work / "datasets-cache")

    import torch
    from transformers import AutoTokenizer
    from tuned_lens.scripts import ingredients as ing
    from tuned_lens.scripts.train_loop import LossChoice, Train

    if args.threads:
        torch.set_num_threads(args.threads)
    _compat_transformers5(ing)
    if args.autocast == "off":
        torch.autocast = functools.partial(torch.autocast, enabled=False)  # type: ignore[assignment,misc]

    # Enough copies of the texts for every step (their loader reads the data once).
    texts = json.loads(Path(args.texts).read_text())
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    n_tokens = sum(len(tokenizer(t)["input_ids"]) + 1 for t in texts)
    copies = math.ceil((args.steps + 2) * args.tokens_per_step / n_tokens) + 1
    jsonl = work / "texts.jsonl"
    with jsonl.open("w") as f:
        for _ in range(copies):
            for text in texts:
                f.write(json.dumps({"text": text}) + "\n")

    class TimedTrain(Train):
        """Their ``Train``; ``setup`` and ``_log`` only note times and losses."""

        def setup(self) -> Any:
            out = super().setup()
            self.marks = [time.perf_counter()]
            self.step_losses: list[float] = []
            return out

        def _log(
            self, opt: Any, step: int, losses: Any, tuned_lens: Any, nats_to_bpb: float
        ) -> None:
            self.marks.append(time.perf_counter())
            layers = [statistics.fmean(v) for v in losses.values()]  # each over its batches
            self.step_losses.append(statistics.fmean(layers))
            super()._log(opt, step, losses, tuned_lens, nats_to_bpb)

    train = TimedTrain(
        model=ing.Model(name=args.model, precision="float32"),
        data=ing.Data(name=[str(jsonl)], max_length=seq_len),
        opt=ing.Optimizer(),
        dist=ing.Distributed(per_gpu_batch_size=args.batch_size),
        output=work / "lens",
        seed=args.seed,
        num_steps=args.steps,
        tokens_per_step=args.tokens_per_step,
        loss=LossChoice.KL,
    )
    stdout = sys.stdout
    sys.stdout = sys.stderr  # their prints; our one JSON line alone on stdout
    try:
        train.execute()
    finally:
        sys.stdout = stdout
        shutil.rmtree(work, ignore_errors=True)
    steps = [b - a for a, b in itertools.pairwise(train.marks)]
    if len(steps) != args.steps:
        raise SystemExit(f"tuned-lens ran {len(steps)} of {args.steps} steps")
    timed = steps[1:] or steps
    print(
        json.dumps(
            {
                "variant": "tuned-lens" + ("" if args.autocast == "bf16" else "-fp32"),
                "seconds_per_step": statistics.median(timed),
                "step_seconds": steps,
                "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "final_loss": train.step_losses[-1],
                "first_loss": train.step_losses[0],
                "steps": args.steps,
                "tokens_per_step": args.tokens_per_step,
                "seq_len": seq_len,
                "batch_size": args.batch_size,
                "autocast": args.autocast,
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
            }
        )
    )


if __name__ == "__main__":
    main()
