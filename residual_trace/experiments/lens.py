"""``lens``: decode every residual state through the model's own head, or a tuned lens.

``residual_trace.lens(model, texts)`` returns a :class:`LensResult` whose tables are ``lens``
(one row per text x position x layer x site x lens), ``summary`` (one row per lens x site x
layer, with intervals and nulls) and ``texts``; ``trace lens`` is that call followed by
:meth:`LensResult.save`. The measures are :mod:`residual_trace.tracer.lens`'s.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from residual_trace.experiments.contract import Experiment, ShardPart, on_texts, open_run
from residual_trace.experiments.options import (
    CorpusOptions,
    ModelArg,
    Texts,
    Warn,
    check_text_id,
    include_special_option,
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
    from residual_trace.tracer.lens import LensFunction, NamedLens

__all__ = ["EXPERIMENT", "LensOptions", "LensResult", "run_lens", "shard_rows"]

LensName = Literal["logit", "tuned", "mlm"]


@no_type_check
@dataclass(kw_only=True)
class LensOptions(CorpusOptions):
    """Options of ``lens`` (and ``trace lens``)."""

    lenses: tuple[LensName, ...] = option(
        (),
        "Lens to read every state through; repeatable. logit: the final norm and unembedding "
        "(decoders); mlm: the masked-LM head (encoders with trained head weights); tuned: a "
        "tuned lens (--tuned-lens). Default: logit for decoders, mlm for encoders, plus tuned "
        "when --tuned-lens is given.",
        flag="--lens",
        metavar="LENS",
    )
    tuned_lens: Path | None = option(
        None,
        "A tuned lens folder in tuned-lens's format (config.json, params.pt), e.g. one "
        "written by trace train-lens or by the tuned-lens package.",
        metavar="DIR",
    )
    mid: bool = option(
        False,
        "Also read the state between each block's attention and its MLP (site mid; not for "
        "parallel blocks; the tuned lens has no reading there).",
    )
    grid_text: int = option(0, "text_id drawn in the lens_grid figure.")
    geometry: bool = option(
        True,
        "Also rank each state's own embedding row by cosine, as trace layers does, so that "
        "the summary and lens_curves set the decoding answer beside the geometric one "
        "(costs about one more lens).",
        negate="--no-geometry",
    )
    include_special: bool = include_special_option()

    def validate(self) -> None:
        """Refuse ``tuned`` without a lens folder, a folder that is not one, a negative text."""
        super().validate()
        if "tuned" in self.lenses and self.tuned_lens is None:
            raise self.fail("lenses", "tuned needs --tuned-lens DIR")
        if self.tuned_lens is not None:
            folder = self.tuned_lens
            missing = [n for n in ("config.json", "params.pt") if not (folder / n).is_file()]
            if not folder.is_dir() or missing:
                what = "not a folder" if not folder.is_dir() else f"no {missing[0]} in it"
                raise self.fail("tuned_lens", f"{folder}: {what} (a tuned-lens folder holds "
                                "config.json and params.pt)")  # fmt: skip
        if len(set(self.lenses)) != len(self.lenses):
            raise self.fail("lenses", f"each lens once, got {', '.join(self.lenses)}")
        if self.grid_text < 0:
            raise self.fail("grid_text", f"must be a text id >= 0, got {self.grid_text}")

    def check_texts(self, texts: list[str]) -> None:
        """Refuse a ``grid_text`` that names no text (before any model loads)."""
        check_text_id("grid_text", self.grid_text, texts)

    def lenses_for(self, family: str) -> tuple[str, ...]:
        """The lenses this run reads, in table order, for a model of ``family``."""
        chosen: list[str] = list(self.lenses) or ["mlm" if family == "encoder" else "logit"]
        if self.tuned_lens is not None and "tuned" not in chosen:
            chosen.append("tuned")
        return tuple(chosen)

    @property
    def unigram_counts(self) -> tuple[tuple[int, int], ...]:
        """The texts' token counts (set by :func:`run_lens` for the shards), else empty."""
        return tuple(self.context.get("unigram_counts", ()))

    def with_unigram(self, counts: Counter[int]) -> LensOptions:
        """A copy carrying the texts' token counts to every shard (a context, not an option)."""
        return self.with_context(unigram_counts=tuple(sorted(counts.items())))

    def run(self, model: ModelArg, texts: Texts = None, warn: Warn = python_warning) -> LensResult:
        """Run on ``model`` and ``texts``; see :func:`residual_trace.lens`."""
        return run_lens(model, texts_argument(texts), self, warn)


@dataclass(repr=False)
class LensResult(Result):
    """Tables ``lens``, ``summary``, ``texts``; figures lens_curves and lens_grid."""

    command = "lens"

    @property
    def lens(self) -> pd.DataFrame:
        """``tables["lens"]``: one row per text x position x layer x site x lens."""
        return self.tables["lens"]

    @property
    def summary(self) -> pd.DataFrame:
        """``tables["summary"]``: one row per lens x site x layer."""
        return self.tables["summary"]

    def figures(self) -> dict[str, Figure]:
        """The curves (KL and top-1 per layer, with nulls) and a grid per lens (one text).

        ``lens_grid`` is the first lens's grid, ``lens_grid_tuned`` (and so on) the others'.
        """
        from residual_trace.figures.lens import lens_curves_figure, lens_grid_figure

        options = self.options
        assert isinstance(options, LensOptions)
        decoder = self.model.spec.family == "decoder"
        lenses = list(dict.fromkeys(self.lens["lens"]))
        figures = {
            "lens_curves": lens_curves_figure(self.summary, decoder=decoder),
            "lens_grid": lens_grid_figure(self.lens, text_id=options.grid_text),
        }
        for other in lenses[1:]:
            figures[f"lens_grid_{other}"] = lens_grid_figure(
                self.lens, text_id=options.grid_text, lens=other
            )
        return figures

    def viewer_sections(self) -> list[str]:
        """The grid of top tokens of every text and lens (``lens.csv``, site ``post``)."""
        from residual_trace.viewer import lens_view

        return [lens_view(self.lens, self.texts)]

    def headline(self) -> str:
        """The first lens's KL to the model's output at layer 0 and one layer below the top."""
        s = self.summary
        post = s[s["site"] == "post"]
        if post.empty:
            return "no tokens"
        first = post[post["lens"] == post["lens"].iloc[0]]
        low, high = first.iloc[0], first.iloc[max(0, len(first) - 2)]
        return (
            f"{low['lens']} lens: KL to the output {low['kl_final']:.2f} nats (layer 0) -> "
            f"{high['kl_final']:.2f} (layer {int(high['layer'])}); input token on top "
            f"{low['identifiable']:.0%} -> {high['identifiable']:.0%}"
        )

    def describe(self) -> str:
        """The per-layer summary ``trace lens`` prints, with what its columns mean."""
        from residual_trace.tracer.lens_summary import format_lens_summary

        model = self.model
        return "\n".join(
            [
                f"{model.name}: {model.model_type} {model.spec.family}, {model.n_blocks} blocks, "
                f"{len(self.texts)} texts, lenses {', '.join(self.summary['lens'].unique())}",
                format_lens_summary(self.summary, decoder=model.spec.family == "decoder"),
                "KL: KL(model output || lens) in nats (null: the texts' unigram distribution);\n"
                "input top: the state decodes to its own input token; next top1: the lens's\n"
                "top token is the next token (null: always the most frequent next token).",
            ]
        )


def _lens_functions(
    model: TracedModel, options: LensOptions
) -> tuple[list[NamedLens], LensFunction]:
    """The lenses of a run and the model's own head (``kl_final``'s reference)."""
    from residual_trace.models.readout import default_head, readout
    from residual_trace.tracer.lens import NamedLens
    from residual_trace.tracer.tuned_lens import load_tuned_lens

    names = options.lenses_for(model.spec.family)
    for name in names:  # a lens the model cannot have fails first, naming that lens
        if name != "tuned":
            readout(model, name)  # type: ignore[arg-type]
    own_head = readout(model, default_head(model))
    own = _head_function(own_head)
    lenses: list[NamedLens] = []
    for name in names:
        if name == "tuned":
            if model.spec.family == "encoder":
                raise options.fail("lenses", f"tuned: a tuned lens reads a decoder's logits, "
                                   f"and {model.name} is an encoder")  # fmt: skip
            assert options.tuned_lens is not None
            tuned = load_tuned_lens(options.tuned_lens, model.n_blocks, model.d_model)
            lenses.append(NamedLens("tuned", _tuned_function(tuned, own_head)))
        else:
            head = own_head if name == default_head(model) else readout(model, name)  # type: ignore[arg-type]
            lenses.append(NamedLens(name, _head_function(head)))
    return lenses, own


def _head_function(head: object) -> LensFunction:
    def read(states: object, layer: int, site: str) -> object:
        return head(states)  # type: ignore[operator]

    return read  # type: ignore[return-value]


def _tuned_function(tuned: object, head: object) -> LensFunction:
    def read(states: object, layer: int, site: str) -> object:
        if site != "post":
            return None
        if layer >= tuned.n_layers:  # type: ignore[attr-defined]
            return head(states)  # type: ignore[operator]
        return head(tuned.translate(states, layer))  # type: ignore[attr-defined,operator]

    return read  # type: ignore[return-value]


def check_lens_model(model: TracedModel, options: LensOptions) -> None:
    """Refuse, before any forward pass, lenses the model cannot be read through."""
    if options.mid:
        model.spec.mid_sources(0)
    _lens_functions(model, options)


def skip_reason(model: TracedModel, options: LensOptions) -> str | None:
    """Why ``model`` cannot be read through the lenses of ``options`` (``None``: it can).

    The report's reason for leaving the lens out of a model (``minilm``: an encoder without
    trained MLM-head weights), in the words the command would refuse it with.
    """
    from residual_trace.errors import UserError

    try:
        check_lens_model(model, options)
    except UserError as error:
        return str(error)
    return None


def shard_rows(
    traced: TracedModel, encoded: Sequence[EncodedText], options: LensOptions
) -> ShardPart:
    """The lens rows and the per-position nulls of some texts."""
    import pandas as pd

    from residual_trace.tracer.lens import iter_lens_encoded, unigram_log_probs

    lenses, own = _lens_functions(traced, options)
    counts = dict(options.unigram_counts)
    log_unigram = unigram_log_probs(counts, traced.d_vocab) if counts else None
    frames, nulls, geometry = [], [], []
    for rows, null, shapes in iter_lens_encoded(
        traced,
        encoded,
        lenses,
        own,
        batch_size=options.batch_size,
        mid=options.mid,
        log_unigram=log_unigram,
        geometry=options.geometry,
        progress=options.progress,
    ):
        frames.append(rows)
        nulls.append(null)
        if shapes is not None:
            geometry.append(shapes)
    tables = {
        "lens": pd.concat(frames, ignore_index=True),
        "nulls": pd.concat(nulls, ignore_index=True),
    }
    if geometry:
        tables["geometry"] = pd.concat(geometry, ignore_index=True)
    return ShardPart(tables)


def run_lens(
    model: ModelArg,
    texts: Texts = None,
    options: LensOptions | None = None,
    warn: Warn = python_warning,
) -> LensResult:
    """Every residual state decoded through each lens, and its per-layer summary.

    Args:
        model: a loaded model, or a name for :func:`residual_trace.load_model`.
        texts: a list of texts, one text, a file (``Path``) with one text per line, or
            ``None`` for the bundled sentences.
        options: :class:`LensOptions` (defaults when ``None``).
        warn: receives one-line warnings (truncated texts, model conversion notes).
    """
    import numpy as np
    import pandas as pd

    from residual_trace.experiments.engine import run_shards
    from residual_trace.tracer.lens_summary import lens_summary

    options = options or LensOptions()
    chosen = options

    def check_model(traced: TracedModel) -> None:
        check_lens_model(traced, chosen)

    texts_list, source, traced, encoded, notes, _ = open_run(
        model, texts, options, warn, check_model
    )
    counts: Counter[int] = Counter(i for item in encoded for i in item.ids)
    rows = run_shards(EXPERIMENT, traced, encoded, options.with_unigram(counts))
    table, nulls = rows.tables["lens"], rows.tables["nulls"]
    geometry = rows.tables.get("geometry")
    summary = lens_summary(table, nulls, options.include_special, options.seed, geometry)
    n_tokens = [len(item.ids) for item in encoded]
    text_rows = pd.DataFrame(
        {"text_id": np.arange(len(texts_list)), "n_tokens": n_tokens, "text": texts_list}
    )
    return LensResult(
        model=traced,
        options=options,
        tables={"lens": table, "summary": summary, "texts": text_rows},
        texts=texts_list,
        source=source,
        notes=notes,
        record={"engine": rows.engine, "lenses": list(options.lenses_for(traced.spec.family))},
    )


EXPERIMENT = Experiment(
    name="lens",
    options=LensOptions,
    run=run_lens,
    result=LensResult,
    help="""Decode every residual state through a lens (logit, tuned, or MLM head).

    Prints a per-layer summary and writes lens.csv (one row per text x position x layer x
    site x lens), summary.csv (intervals and nulls), texts.csv, run.json and the figures
    into --out.
    """,
    epilog="""\b
Examples:
  trace lens --model smollm2 --text "The Eiffel Tower is in the city of" --out runs/lens
  trace lens --model smollm2 --mid --file my_sentences.txt
  trace lens --model smollm2 --tuned-lens runs/smollm2-lens --file held_out.txt
  trace lens --model bert-base-uncased --lens mlm
""",
    doc="""Every residual state decoded through a lens (``trace lens``).

    ``lens(model, texts=None, **options)`` with the options of :class:`LensOptions`.
    Returns a :class:`LensResult`: ``tables["lens"]`` (one row per text x position x layer x
    site x lens: ``top_token``, ``input_rank``, ``next_rank``, ``kl_final``, ...),
    ``tables["summary"]`` (one row per lens x site x layer, with 95% intervals and nulls),
    ``tables["texts"]``; ``figures()``; ``save(out)``.
    """,
    shard_rows=shard_rows,
    report_tables=("summary",),
    skip=skip_reason,
)


#: ``residual_trace.lens``: the Python function of this verb.
lens = on_texts(EXPERIMENT)
