"""``train-lens``: train a tuned lens on texts, and save it in tuned-lens's own format.

``residual_trace.train_lens(model, texts)`` returns a :class:`TrainLensResult` whose
``save(out)`` writes the lens (``config.json``, ``params.pt``: a folder ``trace lens
--tuned-lens`` and the tuned-lens package read) beside its tables: ``training`` (the loss per
step and layer), ``heldout`` (per held-out position, layer and lens, the KL to the model's
output) and ``heldout_summary`` (per layer and lens, with intervals). The training follows the
authors' (see :mod:`residual_trace.tracer.lens_training`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from residual_trace.experiments.contract import Experiment, on_texts, open_run
from residual_trace.experiments.options import (
    CorpusOptions,
    Engine,
    ModelArg,
    Texts,
    Warn,
    python_warning,
    texts_argument,
)
from residual_trace.experiments.result import Result
from residual_trace.options import no_type_check, option

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

    from residual_trace.models import TracedModel
    from residual_trace.tracer.batching import EncodedText

__all__ = ["EXPERIMENT", "TrainLensOptions", "TrainLensResult", "run_train_lens"]

#: Defaults sized for a CPU (the authors: 250 steps of 2**18 tokens, on GPUs).
DEFAULT_STEPS = 30
DEFAULT_TOKENS_PER_STEP = 128


@no_type_check
@dataclass(kw_only=True)
class TrainLensOptions(CorpusOptions):
    """Options of ``train-lens`` (and ``trace train-lens``)."""

    steps: int = option(
        DEFAULT_STEPS,
        "Optimiser steps (the tuned-lens package: 250). The defaults train a lens for "
        "smollm2 in minutes on a laptop's CPU; give more on a GPU.",
    )
    tokens_per_step: int = option(
        DEFAULT_TOKENS_PER_STEP,
        "Tokens each step's loss averages over (the tuned-lens package: 262,144).",
    )
    heldout: float = option(
        0.1,
        "Share of the texts kept out of training (the last ones) to measure the lens on: "
        "heldout.csv compares its KL with the logit lens's (0: none).",
    )
    engine: Engine = option("local", "Where the work runs: this process.", cli=False)
    ray_address: str | None = option(None, "Not used: training runs locally.", cli=False)
    workers: int | None = option(None, "Not used: training runs locally.", cli=False)

    def validate(self) -> None:
        """Refuse non-positive budgets, a held-out share outside [0, 1) and Ray."""
        super().validate()
        if self.steps < 1:
            raise self.fail("steps", f"must be at least 1, got {self.steps}")
        if self.tokens_per_step < 1:
            raise self.fail("tokens_per_step", f"must be at least 1, got {self.tokens_per_step}")
        if not 0.0 <= self.heldout < 1.0:
            raise self.fail("heldout", f"must be in [0, 1), got {self.heldout}")
        if self.engine != "local":
            raise self.fail("engine", "train-lens runs in this process (engine local)")

    def split(self, n_texts: int) -> int:
        """How many texts train (the rest are held out; at least one of each when both)."""
        held = 0 if self.heldout == 0 else max(1, round(n_texts * self.heldout))
        return n_texts - held if n_texts - held >= 1 else n_texts

    def check_texts(self, texts: list[str]) -> None:
        """Refuse a held-out share that leaves no text to train on."""
        if self.heldout > 0 and len(texts) < 2:
            raise self.fail("heldout", "needs at least two texts (one to train, one to test)")

    def run(
        self, model: ModelArg, texts: Texts = None, warn: Warn = python_warning
    ) -> TrainLensResult:
        """Run on ``model`` and ``texts``; see :func:`residual_trace.train_lens`."""
        return run_train_lens(model, texts_argument(texts), self, warn)


@dataclass(repr=False)
class TrainLensResult(Result):
    """Tables ``training``, ``heldout``, ``heldout_summary``, ``texts``; the ``lens`` itself."""

    command = "train-lens"
    #: the trained lens (:class:`~residual_trace.tracer.tuned_lens.TunedLens`)
    lens: Any = field(default=None)

    def figures(self) -> dict[str, Figure]:
        """Training (KL per step for a few layers) and heldout (KL per layer, both lenses)."""
        from residual_trace.figures.lens import heldout_figure, training_figure

        figures = {"training": training_figure(self.tables["training"], self.model.name)}
        if len(self.tables["heldout_summary"]):
            figures["heldout"] = heldout_figure(self.tables["heldout_summary"], self.model.name)
        return figures

    def headline(self) -> str:
        """The held-out KL of both lenses at the middle layer."""
        s = self.tables["heldout_summary"]
        if s.empty:
            t = self.tables["training"]
            last = t[t["step"] == t["step"].max()]["kl"].mean()
            return f"trained {int(t['step'].max())} steps; last step's mean KL {last:.3f} nats"
        mid = int(s["layer"].max()) // 2
        at = s[s["layer"] == mid].set_index("lens")["kl"]
        return (
            f"held-out KL at layer {mid}: logit lens {at['logit']:.2f} nats, "
            f"tuned lens {at['tuned']:.2f} nats"
        )

    def describe(self) -> str:
        """The held-out KL per layer of the logit and the tuned lens."""
        s = self.tables["heldout_summary"]
        t = self.tables["training"]
        head = (
            f"{self.model.name}: trained a tuned lens, {int(t['step'].max())} steps; "
            f"first step's mean KL {t[t['step'] == 1]['kl'].mean():.3f} nats, last "
            f"{t[t['step'] == t['step'].max()]['kl'].mean():.3f}"
        )
        if s.empty:
            return head + " (no held-out texts)"
        lines = [head, f"{'layer':>5}  {'logit KL [95% CI]':>24}  {'tuned KL [95% CI]':>24}"]
        wide = s.pivot(index="layer", columns="lens")
        for layer in wide.index:
            cells = []
            for lens in ("logit", "tuned"):
                kl, lo, hi = (wide.loc[layer, (c, lens)] for c in ("kl", "kl_lo", "kl_hi"))
                cells.append(f"{kl:>8.3f} [{lo:.2f}, {hi:.2f}]".rjust(24))
            lines.append(f"{layer:>5}  " + "  ".join(cells))
        lines.append("KL: KL(model output || lens) in nats on the held-out texts.")
        return "\n".join(lines)

    def _save_extra(self, folder: Path) -> list[str]:
        from residual_trace.tracer.tuned_lens import CONFIG_FILE, PARAMS_FILE, save_tuned_lens

        save_tuned_lens(self.lens, folder)
        return [CONFIG_FILE, PARAMS_FILE]


def _check_model(model: TracedModel) -> None:
    from residual_trace.errors import UserError

    if model.spec.family == "encoder":
        raise UserError(
            f"train-lens: {model.name} is an encoder; a tuned lens translates states for a "
            "decoder's logit head"
        )
    from residual_trace.models.readout import logit_readout

    logit_readout(model)


def _note_passes(train: Sequence[EncodedText], options: TrainLensOptions, note: Warn) -> None:
    """A note when the steps read the same training texts more than 20 times over."""
    n_tokens = sum(len(item.ids) for item in train)
    wanted = options.steps * options.tokens_per_step
    if wanted > 20 * n_tokens:
        note(
            f"the steps read {wanted:,} tokens from {n_tokens:,} training tokens: more than "
            "20 passes over the same texts"
        )


def _heldout_summary(heldout: pd.DataFrame, seed: int) -> pd.DataFrame:
    import pandas as pd

    from residual_trace.stats import mean_with_ci

    rows = [
        {
            "layer": int(layer),
            "lens": lens,
            "n_tokens": len(g),
            **mean_with_ci(g["kl"].to_numpy(), "kl", seed=seed),
        }
        for (layer, lens), g in heldout.groupby(["layer", "lens"], sort=True)
    ]
    return pd.DataFrame(rows, columns=["layer", "lens", "n_tokens", "kl", "kl_lo", "kl_hi"])


def run_train_lens(
    model: ModelArg,
    texts: Texts = None,
    options: TrainLensOptions | None = None,
    warn: Warn = python_warning,
) -> TrainLensResult:
    """Train a tuned lens on ``texts`` and measure it on the held-out ones.

    Args:
        model: a loaded decoder, or a name for :func:`residual_trace.load_model`.
        texts: a list of texts, one text, a file (``Path``) with one text per line, or
            ``None`` for the bundled sentences.
        options: :class:`TrainLensOptions` (defaults when ``None``).
        warn: receives one-line warnings (truncated texts, model conversion notes).
    """
    import numpy as np
    import pandas as pd

    from residual_trace.models.readout import logit_readout, unembedding_weight
    from residual_trace.tracer.lens_training import TrainingPlan, heldout_kl, train_tuned_lens
    from residual_trace.tracer.tuned_lens import TunedLens, lens_config

    options = options or TrainLensOptions()
    texts_list, source, traced, encoded, notes, note = open_run(
        model, texts, options, warn, _check_model
    )
    n_train = options.split(len(encoded))
    train, test = encoded[:n_train], encoded[n_train:]
    head = logit_readout(traced)
    config = lens_config(
        traced.name, traced.n_blocks, traced.d_model, unembedding_weight(traced),
        traced.resolved.revision,
    )  # fmt: skip
    lens = TunedLens.identity(traced.n_blocks, traced.d_model, config)
    plan = TrainingPlan(options.steps, options.tokens_per_step, options.batch_size, options.seed)
    _note_passes(train, options, note)
    training = train_tuned_lens(traced, head, train, lens, plan, options.progress)
    heldout = heldout_kl(traced, head, test, lens, options.batch_size)
    summary = _heldout_summary(heldout[~heldout["is_special"]], options.seed)
    split = np.where(np.arange(len(texts_list)) < n_train, "train", "heldout")
    text_rows = pd.DataFrame(
        {"text_id": np.arange(len(texts_list)), "split": split, "text": texts_list}
    )
    return TrainLensResult(
        model=traced,
        options=options,
        tables={
            "training": training,
            "heldout": heldout,
            "heldout_summary": summary,
            "texts": text_rows,
        },
        texts=texts_list,
        source=source,
        notes=notes,
        record={"lens": {k: v for k, v in config.items() if k != "unembed_hash"}},
        lens=lens,
    )


EXPERIMENT = Experiment(
    name="train-lens",
    options=TrainLensOptions,
    run=run_train_lens,
    result=TrainLensResult,
    help="""Train a tuned lens (Belrose et al. 2023) and save it in tuned-lens's format.

    Writes config.json and params.pt (read by trace lens --tuned-lens and by the tuned-lens
    package), training.csv, heldout.csv, heldout_summary.csv, texts.csv, run.json and two
    figures into --out, and prints the held-out KL of the logit and the tuned lens.
    """,
    epilog="""\b
Examples:
  trace train-lens --model smollm2 --out runs/smollm2-lens          # bundled sentences
  trace train-lens --model smollm2 --file corpus.txt --steps 250 --tokens-per-step 4096
  trace lens --model smollm2 --tuned-lens runs/smollm2-lens --file held_out.txt
""",
    doc="""Train a tuned lens on texts (``trace train-lens``).

    ``train_lens(model, texts=None, **options)`` with the options of
    :class:`TrainLensOptions`. Returns a :class:`TrainLensResult`: ``tables["training"]``
    (KL per step and layer), ``tables["heldout"]`` and ``tables["heldout_summary"]`` (the
    logit and the tuned lens on the held-out texts), ``lens`` (the trained
    :class:`~residual_trace.tracer.tuned_lens.TunedLens`); ``save(out)`` writes the lens in
    tuned-lens's format with the tables.
    """,
)


#: ``residual_trace.train_lens``: the Python function of this verb.
train_lens = on_texts(EXPERIMENT)
