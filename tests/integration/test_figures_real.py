"""Every figure of every verb on both packaged models, checked for what a script can check.

A reader's look (what the docs and the closing notes describe) cannot be automated; these
checks catch the failures that can: a canvas too small or too large, a legend entry with
nothing drawn for it, tick labels that overlap or text outside the canvas, too many lines in
one panel, a diverging colour map not centred at 0, ``nan`` / ``<NA>`` or tokenizer markers
in any text. The console summaries are checked too: within 100 columns, ``n/a`` for missing.
"""

from __future__ import annotations

import itertools
import re

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import Collection
from matplotlib.colors import CenteredNorm, TwoSlopeNorm
from matplotlib.container import BarContainer
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from residual_trace.console import CONSOLE_WIDTH, fit_width

pytestmark = pytest.mark.slow

DPI = 150  # what `trace` saves at
#: Figure sizes a page or a screen holds, in inches.
SMALLEST, LARGEST = 3.0, 16.0
MOST_LINES = 5
DIVERGING = {"RdBu", "RdBu_r", "vlag", "coolwarm", "bwr", "seismic", "PuOr", "PiYG", "RdYlBu"}
MISSING = re.compile(r"\bnan\b|<NA>|\bNone\b", re.IGNORECASE)
MARKERS = ("Ġ", "▁", "Ċ")


def _drawn(artist) -> bool:
    """Whether a labelled artist puts something on the canvas."""
    if isinstance(artist, BarContainer):
        return any(bar.get_visible() and np.isfinite(bar.get_height()) for bar in artist.patches)
    if not artist.get_visible():
        return False
    if isinstance(artist, Line2D):
        x, y = (np.asarray(v, dtype=float) for v in artist.get_data())
        return bool((np.isfinite(x) & np.isfinite(y)).any())
    if isinstance(artist, Collection):
        return any(np.isfinite(p.vertices).all(axis=1).any() for p in artist.get_paths())
    if isinstance(artist, Patch):
        return True
    return True


def _problems(figure: Figure) -> list[str]:
    """Everything wrong with ``figure`` that the checks above can see."""
    found = []
    width, height = figure.get_size_inches()
    if not (SMALLEST <= width <= LARGEST and SMALLEST <= height <= LARGEST):
        found.append(f"size {width:.1f} x {height:.1f} in")
    figure.set_dpi(DPI)
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    renderer = canvas.get_renderer()
    box = figure.bbox
    labels_drawn: set[str] = set()
    for ax in figure.axes:
        handles, labels = ax.get_legend_handles_labels()
        for handle, label in zip(handles, labels, strict=True):
            if _drawn(handle):
                labels_drawn.add(label)
            else:
                found.append(f"legend entry {label!r} has nothing drawn")
        lines = [h for h, lab in zip(handles, labels, strict=True) if isinstance(h, Line2D)]
        if len(lines) > MOST_LINES:
            found.append(f"{len(lines)} labelled lines in one panel")
        for image in ax.images + [c for c in ax.collections if c.get_array() is not None]:
            cmap = image.get_cmap().name
            if cmap in DIVERGING:
                norm = image.norm
                centred = isinstance(norm, (TwoSlopeNorm, CenteredNorm)) or (
                    norm.vmin is not None and np.isclose(norm.vmin, -norm.vmax)
                )
                if not centred:
                    found.append(f"diverging map {cmap} not centred at 0")
        for axis in (ax.xaxis, ax.yaxis):
            ticks = [t for t in axis.get_ticklabels() if t.get_visible() and t.get_text()]
            if _overlapping(ticks, renderer, axis.axis_name):
                found.append(f"tick labels overlap on the {axis.axis_name} axis")
    for ax in figure.axes:
        if _legend_covers_data(ax, renderer):
            found.append("a legend covers drawn data")
    for legend in [ax.get_legend() for ax in figure.axes] + list(figure.legends):
        if legend is None:
            continue
        for text in legend.get_texts():
            if text.get_text() not in labels_drawn:
                found.append(f"legend entry {text.get_text()!r} stands for no drawn artist")
    for text in _texts(figure):
        content = text.get_text()
        if not content or not text.get_visible():
            continue
        if MISSING.search(content):
            found.append(f"text {content!r} shows a missing value")
        if any(m in content for m in MARKERS):
            found.append(f"text {content!r} keeps a tokenizer marker")
        extent = text.get_window_extent(renderer)
        if (
            extent.x0 < box.x0 - 2
            or extent.x1 > box.x1 + 2
            or extent.y0 < box.y0 - 2
            or extent.y1 > box.y1 + 2
        ):
            found.append(f"text {content[:40]!r} leaves the canvas")
    return found


def _legend_covers_data(ax, renderer) -> bool:
    """Whether a legend inside the axes sits on a plotted point of a line."""
    legend = ax.get_legend()
    if legend is None:
        return False
    box = legend.get_window_extent(renderer)
    if not ax.bbox.overlaps(box):
        return False  # placed outside the axes
    for line in ax.lines:
        x, y = (np.asarray(v, dtype=float) for v in line.get_data())
        if x.size < 3:
            continue  # reference lines (axhline, axvline)
        points = line.get_transform().transform(
            np.column_stack([x, y])[np.isfinite(x) & np.isfinite(y)]
        )
        inside = (
            (points[:, 0] > box.x0)
            & (points[:, 0] < box.x1)
            & (points[:, 1] > box.y0)
            & (points[:, 1] < box.y1)
        )
        if inside.any():
            return True
    return False


def _overlapping(ticks: list, renderer, axis: str) -> bool:
    """Whether neighbouring tick labels overlap.

    Level or upright labels overlap when their boxes do; slanted ones when their baselines
    are closer than a line of text (their boxes always overlap).
    """
    boxes = [t.get_window_extent(renderer) for t in ticks]
    for k, (a, b) in enumerate(itertools.pairwise(boxes)):
        angle = ticks[k].get_rotation() % 180
        if angle in (0, 90):
            overlap = a.intersection(a, b)
            if overlap is not None and overlap.width > 1.5 and overlap.height > 1.5:
                return True
        else:
            step = abs(b.x0 - a.x0) if axis == "x" else abs(b.y0 - a.y0)
            line = ticks[k].get_fontsize() * renderer.points_to_pixels(1.0)
            if step * np.sin(np.radians(angle)) < 0.9 * line:
                return True
    return False


def _texts(figure: Figure) -> list:
    """Every text drawn: titles, axis labels, tick labels in view, notes and legends."""
    texts = [figure._suptitle, *figure.texts] if figure._suptitle else list(figure.texts)
    for ax in figure.axes:
        texts += [ax.title, ax._left_title, ax._right_title, ax.xaxis.label, ax.yaxis.label]
        texts += ax.texts
        for axis in (ax.xaxis, ax.yaxis):
            low, high = sorted(axis.get_view_interval())
            for tick in axis.get_major_ticks():
                if low - 1e-9 <= tick.get_loc() <= high + 1e-9:
                    texts += [tick.label1, tick.label2]
    for legend in [ax.get_legend() for ax in figure.axes] + list(figure.legends):
        if legend is not None:
            texts += [*legend.get_texts(), legend.get_title()]
    return [t for t in texts if t is not None and t.get_visible()]


@pytest.mark.parametrize("model", ["minilm", "smollm2"])
def test_every_figure_passes_the_scripted_checks(packaged_runs, model):
    problems = {}
    for verb, result in packaged_runs[model].items():
        for key, figure in result.figures().items():
            found = _problems(figure)
            if found:
                problems[f"{verb}/{key}"] = sorted(set(found))
    assert problems == {}


@pytest.mark.parametrize("model", ["minilm", "smollm2"])
def test_console_summaries_fit_100_columns_and_say_n_a(packaged_runs, model):
    for verb, result in packaged_runs[model].items():
        text = fit_width(result.describe())
        wide = [line for line in text.splitlines() if len(line) > CONSOLE_WIDTH]
        assert wide == [], (verb, wide[:3])
        assert not MISSING.search(text), (verb, MISSING.search(text))


def test_the_checks_catch_what_they_look_for():
    """A figure with each fault is reported for each."""
    figure = Figure(figsize=(20, 2))
    ax = figure.subplots()
    for k in range(7):
        ax.plot([0, 1, 2], [k, k + 1, k], label=f"line {k}")
    ax.plot([0, 1], [np.nan, np.nan], label="invisible")
    ax.imshow(np.array([[-1.0, 2.0]]), cmap="RdBu_r")
    ax.set_xticks([0, 0.01], ["Ġlong label one", "nan"])
    ax.legend()
    found = " | ".join(_problems(figure))
    for fault in ("size", "labelled lines", "'invisible' has nothing drawn", "not centred",
                  "overlap", "missing value", "tokenizer marker"):  # fmt: skip
        assert fault in found, fault
    # a legend placed on the data
    covered = Figure(figsize=(5, 4))
    ax = covered.subplots()
    ax.plot(np.linspace(0, 1, 50), np.full(50, 0.95), label="along the top")
    ax.set_ylim(0, 1)
    ax.legend(loc="upper center")
    assert "a legend covers drawn data" in _problems(covered)


def test_the_report_figures_of_both_models_pass_the_checks(packaged_runs):
    """The report's figures, assembled from the same runs as `trace report` assembles them."""
    from residual_trace.experiments.common import model_record
    from residual_trace.experiments.report.config import ReportOptions
    from residual_trace.experiments.report.document import assemble, report_figures
    from residual_trace.experiments.report.parts import READS, Part

    experiments = ("layers", "decompose", "perturb", "probe", "lens")
    options = ReportOptions(models=("minilm", "smollm2"), experiments=experiments)
    parts = [
        Part(
            name,
            verb,
            {k: runs[verb].tables[k] for k in READS[verb]},
            model_record(runs[verb].model),
            result=runs[verb],
        )
        for name, runs in packaged_runs.items()
        for verb in experiments
        if verb in runs
    ]
    tables, verdicts = assemble(options, parts)
    assert verdicts and not any(MISSING.search(v) for v in verdicts)
    drawn = report_figures(options, tables)
    assert len(drawn) >= 6
    problems = {name: sorted(set(_problems(figure))) for name, _, figure in drawn}
    assert {k: v for k, v in problems.items() if v} == {}
