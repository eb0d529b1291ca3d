"""``patch``: activation patching, where a token's information causally lives.

``residual_trace.patch(model, clean=[...], corrupt=[...], answer=..., wrong=...)`` returns a
:class:`PatchResult` whose tables are ``patch`` (one row per pair x condition x cell),
``summary`` (one row per cell over pairs, with intervals and the noise floor) and ``pairs``;
``trace patch`` is that call followed by :meth:`PatchResult.save`. The measures are
:mod:`residual_trace.tracer.patching`'s.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from residual_trace.errors import UserError
from residual_trace.experiments.common import resolve_model
from residual_trace.experiments.contract import Experiment, ShardPart, on_model
from residual_trace.experiments.options import EngineOptions, ModelArg, Warn, python_warning
from residual_trace.experiments.result import Result
from residual_trace.options import no_type_check, option

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

    from residual_trace.models import TracedModel
    from residual_trace.tracer.patching import Cell

__all__ = ["EXPERIMENT", "PatchOptions", "PatchResult", "run_patch"]

SiteName = Literal["resid", "attn", "mlp", "head"]
MetricName = Literal["logit-diff", "logprob", "state-cos"]


@dataclass(frozen=True)
class TextPair:
    """One clean/corrupt pair as given, with its answer and wrong token (may be empty)."""

    clean: str
    corrupt: str
    answer: str = ""
    wrong: str = ""
    subject: str = ""


def _parse_at(value: str) -> str:
    return value.strip().lower()


@no_type_check
@dataclass(kw_only=True)
class PatchOptions(EngineOptions):
    """Options of ``patch`` (and ``trace patch``)."""

    batch_size: int = option(
        1,
        "Pairs to a batch: --engine ray shards whole batches (the cells of one forward pass "
        "are --cells-per-pass; results do not depend on either).",
    )

    clean: tuple[str, ...] = option(
        (), "A clean text (repeatable; the Nth --clean pairs with the Nth --corrupt).",
        metavar="TEXT",
    )  # fmt: skip
    corrupt: tuple[str, ...] = option(
        (), "A corrupt text, as many tokens long as its clean text (repeatable).",
        metavar="TEXT",
    )  # fmt: skip
    pairs: Path | None = option(
        None,
        "Pairs from a file, one per line: clean, corrupt, answer, wrong, separated by tabs "
        "(answer and wrong may be left out where --answer/--wrong or state-cos apply).",
        metavar="FILE",
    )
    answer: str = option(
        "", "The answer token of the clean texts (one token; ' Paris' with its space).",
        metavar="TOKEN",
    )  # fmt: skip
    wrong: str = option(
        "", "The wrong token (the corrupt texts' answer), for logit-diff.", metavar="TOKEN"
    )
    metric: MetricName | None = option(
        None,
        "What a run's output is scored by: logit-diff (answer minus wrong, the default with "
        "--wrong), logprob (of the answer, the default with --answer alone) or state-cos "
        "(cosine of the final state to the clean run's; the default without an answer, and "
        "for models without an output head).",
    )
    sites: tuple[SiteName, ...] = option(
        ("resid", "attn", "mlp"),
        "Where to patch (repeatable): resid (every residual state, the input of block "
        "LAYER), attn and mlp (each block's sublayer output), head (each head's output).",
        flag="--site",
    )
    window: int = option(
        1, "attn and mlp: restore this many consecutive blocks around each (Meng et al.: 10)."
    )
    head_positions: Literal["all", "each"] = option(
        "all", "head: patch each head at every position at once (all) or per position (each)."
    )
    direction: Literal["denoising", "noising"] = option(
        "denoising",
        "denoising: clean states into the corrupt run; noising: corrupt states into the "
        "clean run. The effect is (patched - corrupt) / (clean - corrupt) either way.",
    )
    at: str = option(
        "last",
        "Where the metric is read: last (the last position), same (the patched position "
        "itself; state-cos only) or a position number.",
        parse=_parse_at,
        metavar="POSITION",
    )
    floor: bool = option(
        True,
        "Also patch the target run with its own states at the metric position (condition "
        "floor): how far the batched patching alone moves the metric.",
        negate="--no-floor",
    )
    corrupt_noise: bool = option(
        False,
        "Corrupt by noise instead of a corrupt text, as Meng et al. (2022): Gaussian noise on "
        "the input embedding states of --subject's tokens in each --clean text.",
    )
    subject: tuple[str, ...] = option(
        (),
        "--corrupt-noise: the words whose tokens get noise (one for every --clean text, or "
        "one per text, in order).",
        metavar="WORDS",
    )
    noise: float = option(
        3.0,
        "--corrupt-noise: the noise's standard deviation, in units of the standard deviation "
        "of the subjects' embedding states (Meng et al.: 3).",
    )
    samples: int = option(10, "--corrupt-noise: noise draws per text (each a corrupt run).")
    cells_per_pass: int | None = option(
        None, "Cells per forward pass (default: as many as the memory budget allows)."
    )
    grid_pair: int = option(0, "pair_id drawn in the per-pair figures.")

    def validate(self) -> None:
        """The pairs, the metric's needs, the window and position (before any model loads)."""
        super().validate()
        if self.pairs is not None and (self.clean or self.corrupt):
            raise self.fail("pairs", "give --pairs FILE or --clean/--corrupt, not both")
        if self.corrupt_noise:
            self._validate_noise()
        elif self.subject:
            raise self.fail("subject", "--subject names the words --corrupt-noise corrupts")
        elif len(self.clean) != len(self.corrupt):
            raise self.fail(
                "corrupt",
                f"{len(self.clean)} --clean and {len(self.corrupt)} --corrupt texts: each clean "
                "text needs its corrupt text",
            )
        if self.pairs is None and not self.clean:
            raise self.fail("clean", "give pairs: --clean TEXT --corrupt TEXT, or --pairs FILE")
        if self.pairs is not None and not self.pairs.is_file():
            raise self.fail("pairs", f"{self.pairs}: no such file")
        if self.window < 1:
            raise self.fail("window", f"must be at least 1, got {self.window}")
        if self.cells_per_pass is not None and self.cells_per_pass < 1:
            raise self.fail("cells_per_pass", f"must be at least 1, got {self.cells_per_pass}")
        if self.at not in ("last", "same") and not self.at.lstrip("-").isdigit():
            raise self.fail("at", f"expected last, same or a position number, got {self.at!r}")
        if self.at == "same" and self.chosen_metric != "state-cos":
            raise self.fail("at", "same reads the patched position itself: state-cos only")
        if len(set(self.sites)) != len(self.sites) or not self.sites:
            raise self.fail("sites", "give each site once, at least one")
        if self.grid_pair < 0:
            raise self.fail("grid_pair", f"must be a pair id >= 0, got {self.grid_pair}")
        pairs = self.text_pairs()
        metric = self.chosen_metric
        for k, pair in enumerate(pairs):
            if metric in ("logit-diff", "logprob") and not pair.answer:
                raise self.fail("answer", f"pair {k}: {metric} needs an answer token (--answer)")
            if metric == "logit-diff" and not pair.wrong:
                raise self.fail("wrong", f"pair {k}: logit-diff needs a wrong token (--wrong)")
        if self.grid_pair >= len(pairs):
            raise self.fail("grid_pair", f"there are {len(pairs)} pair(s), ids 0..{len(pairs) - 1}")

    def _validate_noise(self) -> None:
        if self.corrupt:
            raise self.fail("corrupt", "--corrupt-noise corrupts the --clean texts: no --corrupt")
        if self.pairs is None and len(self.subject) not in (1, len(self.clean)):
            raise self.fail(
                "subject",
                f"{len(self.subject)} --subject for {len(self.clean)} --clean texts: give one "
                "for all, or one per text",
            )
        if not self.noise > 0:
            raise self.fail("noise", f"must be above 0, got {self.noise}")
        if not 1 <= self.samples <= 1000:
            raise self.fail("samples", f"must be between 1 and 1,000, got {self.samples}")

    @property
    def chosen_metric(self) -> str:
        """The metric: as given, else logit-diff with --wrong, logprob with --answer, state-cos."""
        if self.metric is not None:
            return str(self.metric)
        if self.pairs is not None:
            first = self.text_pairs()
            if first and first[0].wrong:
                return "logit-diff"
            return "logprob" if first and first[0].answer else "state-cos"
        return "logit-diff" if self.wrong else "logprob" if self.answer else "state-cos"

    def text_pairs(self) -> list[TextPair]:
        """The pairs, from ``--clean``/``--corrupt`` or the ``--pairs`` file."""
        if self.pairs is not None:
            pairs = _read_pairs(self.pairs, self.answer, self.wrong)
            if self.corrupt_noise:  # the second column names the subject
                return [TextPair(p.clean, "", p.answer, p.wrong, p.corrupt) for p in pairs]
            return pairs
        if self.corrupt_noise:
            subjects = (
                list(self.subject) * len(self.clean) if len(self.subject) == 1 else self.subject
            )
            return [
                TextPair(c, "", self.answer, self.wrong, w)
                for c, w in zip(self.clean, subjects, strict=True)
            ]
        given = zip(self.clean, self.corrupt, strict=True)
        return [TextPair(c, x, self.answer, self.wrong) for c, x in given]

    def run(self, model: ModelArg, warn: Warn = python_warning) -> PatchResult:
        """Run on ``model``; see :func:`residual_trace.patch`."""
        return run_patch(model, self, warn)


def _read_pairs(path: Path, answer: str, wrong: str) -> list[TextPair]:
    """The pairs of a TSV file; a line without two texts is a one-line error naming it."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise UserError(f"--pairs {path}: not UTF-8 text") from None
    pairs = []
    for number, fields in enumerate(csv.reader(lines, delimiter="\t"), start=1):
        if not fields or not any(f.strip() for f in fields):
            continue
        if number == 1 and [f.strip().lower() for f in fields[:2]] == ["clean", "corrupt"]:
            continue  # a header
        if len(fields) < 2 or len(fields) > 4 or not fields[0].strip() or not fields[1].strip():
            raise UserError(
                f"--pairs {path}: line {number} has {len(fields)} tab-separated field(s); "
                "expected clean, corrupt and optionally answer and wrong"
            )
        given = [*fields, "", ""][:4]
        pairs.append(TextPair(given[0].strip(), given[1].strip(), given[2] or answer,
                              given[3] or wrong))  # fmt: skip
    if not pairs:
        raise UserError(f"--pairs {path}: no pairs in it")
    return pairs


@dataclass(repr=False)
class PatchResult(Result):
    """Tables ``patch``, ``summary``, ``pairs``; figures per site (one pair) and over pairs."""

    command = "patch"

    @property
    def patch(self) -> pd.DataFrame:
        """``tables["patch"]``: one row per pair x condition x cell."""
        return self.tables["patch"]

    @property
    def summary(self) -> pd.DataFrame:
        """``tables["summary"]``: one row per cell (or position kind) over pairs."""
        return self.tables["summary"]

    def figures(self) -> dict[str, Figure]:
        """``patch_{site}`` (the grid of one pair, per site) and ``patch_summary``."""
        from residual_trace.figures.patch import patch_grid_figure, patch_summary_figure

        options = self.options
        assert isinstance(options, PatchOptions)
        figures = {}
        for site in dict.fromkeys(self.patch["site"]):
            figures[f"patch_{site}"] = patch_grid_figure(
                self.patch, site=str(site), pair_id=options.grid_pair
            )
        pairs = self.tables["pairs"]
        at = str(pairs["metric_position"].iloc[0])
        where = {"same": "the patched position"}.get(at, f"position {at}")
        if options.at == "last":
            where = "the last position"
        figures["patch_summary"] = patch_summary_figure(
            self.summary,
            n_pairs=len(pairs),
            sites=list(options.sites),
            window=options.window,
            reading=(
                "clean states restored in the corrupt run"
                if options.direction == "denoising"
                else "corrupt states written into the clean run"
            )
            + f"; effect on {pairs['metric'].iloc[0]} at {where}",
            over=(
                f"{len(pairs)} text(s) x {options.samples} noise samples"
                if options.corrupt_noise
                else f"{len(pairs)} pair(s)"
            ),
        )
        return figures

    def viewer_sections(self) -> list[str]:
        """The map of every pair, site and sample (``patch.csv``, condition ``patch``)."""
        from residual_trace.viewer import patch_view

        return [patch_view(self.patch, self.tables["pairs"])]

    def headline(self) -> str:
        """The strongest cell of each site (mean effect over pairs)."""
        s = self.summary
        s = s[(s["condition"] == "patch") & (s["position_kind"] != "")]
        parts = []
        for site, rows in s.groupby("site", sort=False):
            best = rows.loc[rows["effect"].abs().idxmax()] if rows["effect"].notna().any() else None
            if best is not None:
                where = f"layer {best['layer']}" if site == "resid" else f"block {best['block']}"
                parts.append(f"{site}: {best['effect']:.2f} at {where}, {best['position_kind']}")
        return "; ".join(parts) or "no effect to show"

    def describe(self) -> str:
        """The per-layer strongest restoration of each site, as ``trace patch`` prints it."""
        from residual_trace.figures.patch import format_patch_summary

        pairs = self.tables["pairs"]
        model = self.model
        options = self.options
        assert isinstance(options, PatchOptions)
        return "\n".join(
            [
                f"{model.name}: {model.model_type} {model.spec.family}, {model.n_blocks} blocks, "
                f"{len(pairs)} pair(s), metric {pairs['metric'].iloc[0]} ({options.direction})",
                format_patch_summary(
                    self.summary,
                    "a second noise draw patched in"
                    if options.corrupt_noise
                    else "the target run patched with its own states",
                ),
                "effect: (patched - corrupt) / (clean - corrupt), mean over pairs [95% interval];"
                "\n0 = nothing restored, 1 = the clean run's metric restored.",
            ]
        )


# -- the run ------------------------------------------------------------------------------


def _one_token(model: TracedModel, token: str, what: str, pair: int) -> int:
    """The id of a one-token string; a leading space is tried where the bare word splits."""
    tokenizer = model.tokenizer
    ids = tokenizer.encode(token, add_special_tokens=False)
    if len(ids) != 1 and not token.startswith(" "):
        spaced = tokenizer.encode(" " + token, add_special_tokens=False)
        if len(spaced) == 1:
            return int(spaced[0])
    if len(ids) != 1:
        pieces = ", ".join(repr(p) for p in tokenizer.convert_ids_to_tokens(ids)) or "none"
        raise UserError(
            f"--{what} {token!r} (pair {pair}) is {len(ids)} tokens for {model.name} ({pieces}); "
            "give one token"
        )
    return int(ids[0])


@dataclass(frozen=True)
class _Encoded:
    pair_id: int
    clean: list[int]
    corrupt: list[int]
    answer: int | None
    wrong: int | None
    subject: list[int] | None = None


def _encode_pairs(model: TracedModel, pairs: list[TextPair], metric: str) -> list[_Encoded]:
    encoded = []
    for k, pair in enumerate(pairs):
        clean = model.encode(pair.clean)
        subject = _subject_positions(model, pair, clean, k) if pair.subject else None
        corrupt = clean if subject is not None else model.encode(pair.corrupt)
        if len(clean) != len(corrupt):
            raise UserError(
                f"pair {k}: the clean text is {len(clean)} tokens and the corrupt text "
                f"{len(corrupt)} for {model.name}; patching needs pairs of equal length "
                f"({pair.clean!r} / {pair.corrupt!r})"
            )
        needs = metric in ("logit-diff", "logprob")
        answer = _one_token(model, pair.answer, "answer", k) if needs else None
        wrong = _one_token(model, pair.wrong, "wrong", k) if metric == "logit-diff" else None
        encoded.append(_Encoded(k, clean, corrupt, answer, wrong, subject))
    return encoded


def _subject_positions(model: TracedModel, pair: TextPair, ids: list[int], k: int) -> list[int]:
    """The positions of the tokens that cover the subject's first occurrence in the text."""
    start = pair.clean.find(pair.subject)
    if start < 0:
        raise UserError(f"--subject {pair.subject!r} (text {k}) does not occur in {pair.clean!r}")
    end = start + len(pair.subject)
    spans = model.token_offsets(pair.clean, ids)
    found = [i for i, s in enumerate(spans) if s is not None and s[0] < end and s[1] > start]
    if not found:
        raise UserError(f"--subject {pair.subject!r} (text {k}): no token covers it")
    return found


def _read_position(at: str, n_tokens: int, pair: int) -> int:
    from residual_trace.tracer.patching import SAME

    if at == "same":
        return SAME
    if at == "last":
        return n_tokens - 1
    position = int(at)
    if not -n_tokens <= position < n_tokens:
        raise UserError(f"--at {at}: pair {pair} has {n_tokens} positions (0..{n_tokens - 1})")
    return position % n_tokens


def _noise_seed(seed: int, pair_id: int, sample: int, draw: int) -> int:
    """The seed of one noise draw: distinct per run seed, text, sample and draw."""
    return (seed * 1_000_003 + pair_id * 10_007 + sample * 101 + draw) % (2**63)


def _corruptions(
    model: TracedModel, pair: _Encoded, options: PatchOptions, hooks: list[str], sigma: float
) -> Any:
    """Each corrupt run of a pair: ``(sample, ids, noise edit, states, final, floor states)``.

    A pair's corrupt text is one run; a noise-corrupted text is ``samples`` runs of its clean
    tokens with noise on the subject's embeddings, each with a second, independent draw for
    the floor (``None`` where the floor is the target's own states).
    """
    from residual_trace.tracer.patching import gaussian_noise, noise_edit, source_states

    if pair.subject is None:
        states, final = source_states(model, pair.corrupt, hooks)
        yield 0, pair.corrupt, None, states, final, None
        return
    scale = options.noise * sigma
    for sample in range(options.samples):
        draws = [
            noise_edit(model, pair.subject, gaussian_noise(len(pair.subject), model.d_model,
                       scale, _noise_seed(options.seed, pair.pair_id, sample, draw)))
            for draw in (0, 1)
        ]  # fmt: skip
        states, final = source_states(model, pair.clean, hooks, draws[0])
        floor = source_states(model, pair.clean, hooks, draws[1])[0] if options.floor else None
        yield sample, pair.clean, draws[0], states, final, floor


def _pair_rows(
    model: TracedModel,
    pair: _Encoded,
    options: PatchOptions,
    head: Any,
    bar: Any,
    sigma: float,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The rows of one pair (every cell of every corrupt run, and the floor), its record."""
    from residual_trace.tracer import patching as tp

    metric = options.chosen_metric
    n = len(pair.clean)
    hooks = tp.needed_hooks(model, options.sites)
    clean_states, clean_final = tp.source_states(model, pair.clean, hooks)
    position = _read_position(options.at, n, pair.pair_id)
    spec = tp.MetricSpec(metric, position, pair.answer, pair.wrong, clean_final)  # type: ignore[arg-type]
    cells, floor_cells = pair_cells(model, options, n)
    per_pass = tp.cells_per_pass(model, n, options.cells_per_pass)
    reads = sorted(set(tp.read_positions(spec, cells, n)))

    def metric_at(final: Any) -> dict[int, float]:
        values = tp.metric_values(model, final[None].expand(len(reads), -1, -1), spec, reads, head)
        return dict(zip(reads, (float(v) for v in values), strict=True))

    clean_at = metric_at(clean_final)
    kinds = tp.position_kinds(pair.clean, pair.corrupt, pair.subject)
    tokens = model.token_strings(pair.clean)
    denoise = options.direction == "denoising"
    last = n - 1 if position == tp.SAME else position  # where pairs.csv reads the metrics
    rows: list[dict[str, Any]] = []
    corrupt_metrics = []
    for sample, ids, noise, states, final, second in _corruptions(model, pair, options, hooks,
                                                                   sigma):  # fmt: skip
        corrupt_at = metric_at(final)
        if denoise:  # clean states into the corrupt run; floor: its own or a second draw
            target, base, source = ids, noise, clean_states
            floor_source = second if second is not None else states
        else:  # corrupt states into the clean run; floor: the clean run's own
            target, base, source, floor_source = pair.clean, None, states, clean_states
        patched = tp.run_cells(model, target, cells, source, spec, head, per_pass, bar.update, base)
        floored = tp.run_cells(model, target, floor_cells, floor_source, spec, head, per_pass,
                            bar.update, base)  # fmt: skip
        for condition, group, values in (
            ("patch", cells, patched),
            ("floor", floor_cells, floored),
        ):
            for cell, value, read in zip(
                group, values, tp.read_positions(spec, group, n), strict=True
            ):
                clean, corrupt = clean_at[read], corrupt_at[read]
                effect = float(tp.normalised(value[None], clean, corrupt)[0])
                rows.append(_row(model, pair.pair_id, sample, condition, cell, n, kinds, tokens,
                                 effect, float(value), clean, corrupt, options.window))  # fmt: skip
        corrupt_metrics.append(corrupt_at.get(last, corrupt_at[reads[-1]]))
    clean_metric = clean_at.get(last, clean_at[reads[-1]])
    return rows, _record(pair, metric, position, clean_metric, corrupt_metrics)


def _record(
    pair: _Encoded, metric: str, position: int, clean: float, corrupt: list[float]
) -> dict[str, Any]:
    """One pair's line of ``pairs.csv`` (its metrics at the read position)."""
    import numpy as np

    from residual_trace.tracer.patching import SAME

    differing = sum(a != b for a, b in zip(pair.clean, pair.corrupt, strict=True))
    return {
        "pair_id": pair.pair_id,
        "n_tokens": len(pair.clean),
        "answer_id": pair.answer,
        "wrong_id": pair.wrong,
        "metric": metric,
        "metric_position": "same" if position == SAME else position,
        "metric_clean": clean,
        "metric_corrupt": float(np.mean(corrupt)),
        "n_samples": len(corrupt),
        "n_differing": len(pair.subject) if pair.subject is not None else differing,
    }


def pair_cells(
    model: TracedModel, options: PatchOptions, n_tokens: int
) -> tuple[list[Cell], list[Cell]]:
    """The cells of a pair of ``n_tokens`` tokens, and those of its floor.

    The floor patches the target run with its own states, at the position the metric is read
    (the last one for ``--at same``), and every head cell patched at every position.
    """
    from residual_trace.tracer.patching import EVERY, SAME, grid_cells

    cells: list[Cell] = []
    for site in options.sites:
        cells += grid_cells(site, model.n_blocks, model.n_heads, n_tokens, options.window,
                            options.head_positions)  # fmt: skip
    if not options.floor:
        return cells, []
    read = _read_position(options.at, n_tokens, 0)
    where = n_tokens - 1 if read == SAME else read
    return cells, [c for c in cells if c.position in (where, EVERY)]


def _row(
    model: TracedModel,
    pair_id: int,
    sample: int,
    condition: str,
    cell: Cell,
    n_tokens: int,
    kinds: list[str],
    tokens: list[str],
    effect: float,
    value: float,
    clean: float,
    corrupt: float,
    window: int,
) -> dict[str, Any]:
    every = cell.position < 0
    return {
        "model": model.name,
        "pair_id": pair_id,
        "sample": sample,
        "condition": condition,
        "site": cell.site,
        "layer": cell.index if cell.site == "resid" else None,
        "block": None if cell.site == "resid" else cell.index,
        "window": window if cell.site in ("attn", "mlp") else 1,
        "head": cell.head,
        "head_name": f"L{cell.index}H{cell.head}" if cell.site == "head" else "",
        "position": None if every else cell.position,
        "position_kind": "all" if every else kinds[cell.position],
        "token": "" if every else tokens[cell.position],
        "n_tokens": n_tokens,
        "effect": effect,
        "metric_patched": value,
        "metric_clean": clean,
        "metric_corrupt": corrupt,
    }


def _subject_scale(model: TracedModel, encoded: list[_Encoded]) -> float | None:
    """The standard deviation of the layer-0 states of every subject token (noise mode).

    Meng et al. scale their noise by the standard deviation of the subjects' token
    embeddings over their dataset; layer 0 is the embedding state the first block reads.
    """
    import torch

    from residual_trace.tracer.patching import source_states

    if not any(pair.subject for pair in encoded):
        return None
    layer0 = model.spec.resid_hook(0)
    values = []
    for pair in encoded:
        assert pair.subject is not None
        states = source_states(model, pair.clean, [layer0])[0][layer0][0]
        values.append(states[pair.subject].float().flatten())
    return float(torch.cat(values).std())


def check_patch_model(model: TracedModel, options: PatchOptions) -> Any:
    """The head the metric reads through, or a one-line refusal before any pass."""
    from residual_trace.models.readout import default_head, readout

    metric = options.chosen_metric
    if metric == "state-cos":
        return None
    try:
        return readout(model, default_head(model))
    except UserError as error:
        raise UserError(
            f"--metric {metric}: {error}; --metric state-cos needs no output head"
        ) from None


def run_patch(
    model: ModelArg, options: PatchOptions | None = None, warn: Warn = python_warning
) -> PatchResult:
    """Activation patching of every cell of every pair, and its summary over pairs.

    Args:
        model: a loaded model, or a name for :func:`residual_trace.load_model`.
        options: :class:`PatchOptions` (the pairs among them).
        warn: receives one-line warnings and notes.
    """
    from residual_trace.experiments.engine import run_shards
    from residual_trace.tracer.patch_summary import patch_summary

    if options is None:
        raise UserError("patch needs pairs: PatchOptions(clean=[...], corrupt=[...])")
    pairs = options.text_pairs()
    notes: list[str] = []

    def note(message: str) -> None:
        notes.append(message)
        warn(message)

    traced = resolve_model(model, note)
    if "head" in options.sites and options.window > 1:
        note("note: --window applies to attn and mlp; head cells patch one block each")
    check_patch_model(traced, options)
    options.seed_torch()
    encoded = _encode_pairs(traced, pairs, options.chosen_metric)
    for pair in encoded:
        _read_position(options.at, len(pair.clean), pair.pair_id)  # every pair, before any pass
    sigma = _subject_scale(traced, encoded)
    if sigma is not None:
        note(f"note: noise of {options.noise} x {sigma:.4g} (the standard deviation of the "
             "subjects' embedding states) on each subject's tokens")  # fmt: skip
    shards = run_shards(EXPERIMENT, traced, encoded, options.with_context(sigma=sigma or 0.0))
    table = shards.tables["patch"]
    records = shards.tables["records"].to_dict("records")
    summary = patch_summary(table, seed=options.seed)
    pair_table = _pair_table(pairs, records, note)
    return PatchResult(
        model=traced,
        options=options,
        tables={"patch": table, "summary": summary, "pairs": pair_table},
        texts=[p.clean for p in pairs],
        source="--pairs " + str(options.pairs) if options.pairs else "--clean/--corrupt",
        notes=notes,
        record={
            "metric": options.chosen_metric,
            "direction": options.direction,
            "engine": shards.engine,
            "noise_sd": sigma,
        },
    )


def shard_rows(traced: TracedModel, encoded: Sequence[Any], options: PatchOptions) -> ShardPart:
    """The patching rows and records of some pairs (what a Ray worker computes)."""
    import pandas as pd

    from residual_trace.progress import progress_bar

    head = check_patch_model(traced, options)
    sigma = float(options.context.get("sigma", 0.0))
    total = 0
    for pair in encoded:
        cells, floor_cells = pair_cells(traced, options, len(pair.clean))
        runs = options.samples if pair.subject is not None else 1
        total += (len(cells) + len(floor_cells)) * runs
    rows: list[dict[str, Any]] = []
    records = []
    with progress_bar(total=total, desc=f"patch {traced.name}", unit="cell",
                      enabled=options.progress) as bar:  # fmt: skip
        for pair in encoded:
            pair_rows, record = _pair_rows(traced, pair, options, head, bar, sigma)
            rows += pair_rows
            records.append(record)
    table = pd.DataFrame(rows)
    for column in ("layer", "block", "position"):
        table[column] = table[column].astype("Int64")
    return ShardPart({"patch": table, "records": pd.DataFrame(records)})


def _pair_table(pairs: list[TextPair], records: list[dict[str, Any]], note: Warn) -> pd.DataFrame:
    """``pairs.csv``: each pair as given, then its record; a warning for a pair with no span."""
    import pandas as pd

    for record in records:
        if abs(record["metric_clean"] - record["metric_corrupt"]) < 1e-6:
            note(f"warning: pair {record['pair_id']}: the clean and corrupt runs score the same "
                 f"({record['metric_clean']:.4g}): its effects are undefined (empty)")  # fmt: skip
    rows = []
    for k, (p, r) in enumerate(zip(pairs, records, strict=True)):
        given = {"pair_id": k, "clean": p.clean, "corrupt": p.corrupt, "subject": p.subject,
                 "answer": p.answer, "wrong": p.wrong}  # fmt: skip
        rows.append({**given, **{key: v for key, v in r.items() if key != "pair_id"}})
    return pd.DataFrame(rows)


def _run(model: ModelArg, inputs: Any, options: PatchOptions, warn: Warn) -> PatchResult:
    """The contract's ``run``: the pairs are options, there are no other inputs."""
    return run_patch(model, options, warn)


EXPERIMENT = Experiment(
    name="patch",
    options=PatchOptions,
    run=_run,
    result=PatchResult,
    help="""Activation patching: restore clean states in a corrupt run, cell by cell.

    Prints the strongest restorations per site and writes patch.csv (one row per pair x
    cell), summary.csv (over pairs, with 95% intervals and the noise floor), pairs.csv,
    run.json and the figures into --out.
    """,
    epilog="""\b
Examples:
  trace patch --model smollm2 --clean "The Eiffel Tower is in the city of" \\
      --corrupt "The Colosseum Tower is in the city of" --answer " Paris" --wrong " Rome"
  trace patch --model smollm2 --pairs facts.tsv --site resid --site mlp --window 10
  trace patch --model minilm --clean "The cat sat on the mat." \\
      --corrupt "The dog sat on the mat." --metric state-cos --at same
""",
    doc="""Activation patching (``trace patch``).

    ``patch(model, **options)`` with the options of :class:`PatchOptions` (``clean``,
    ``corrupt`` or ``pairs``; ``answer``, ``wrong``, ``metric``, ``sites``, ...). Returns a
    :class:`PatchResult`: ``tables["patch"]`` (one row per pair x condition x cell: ``site``,
    ``layer``/``block``, ``head``, ``position``, ``effect``, ...), ``tables["summary"]``
    (mean effect over pairs with 95% intervals, per position and per position kind),
    ``tables["pairs"]``; ``figures()``; ``save(out)``.
    """,
    inputs="model",
    shard_rows=shard_rows,
)


#: ``residual_trace.patch``: the Python function of this verb.
patch = on_model(EXPERIMENT)
