"""Assemble the report from the finished parts' tables: ``report.html`` and ``report.md``.

Everything here reads tables only (no model): the comparison tables on a relative-depth axis,
the figures, and the verdicts in plain words with their numbers. The HTML is self-contained:
figures are embedded as data URIs, the style is inline, nothing is fetched.
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from residual_trace.experiments.report.config import ReportOptions
from residual_trace.experiments.report.parts import Part
from residual_trace.figures.report import (
    depth_figure,
    index_figure,
    lens_figure,
    mixing_figure,
    probe_figure,
    sublayer_figure,
)
from residual_trace.probes import CONDITIONS
from residual_trace.runs import package_versions, write_atomic
from residual_trace.tracer.mixing_measures import MIXING
from residual_trace.viewer import embedded_sections

#: Columns gathered from each experiment's summary table. Per-block measures are placed at
#: the layer their block writes (layer = block + 1).
_FROM = {
    "layers": [
        "cos_input",
        "cos_input_lo",
        "cos_input_hi",
        "baseline",
        "identifiable",
        "identifiable_lo",
        "identifiable_hi",
    ],
    "decompose": [
        "proj_attn",
        "proj_attn_lo",
        "proj_attn_hi",
        "proj_mlp",
        "proj_mlp_lo",
        "proj_mlp_hi",
        *(
            column
            for m in MIXING
            for column in (
                (m.column, f"{m.column}_lo", f"{m.column}_hi")
                if m.column == "mix_attnres_n"  # the one drawn with its interval
                else (m.column,)
            )
        ),
    ],
    "perturb": [
        "follow_index",
        "follow_index_lo",
        "follow_index_hi",
        "n_heads_token",
        "n_heads_position",
        "n_heads_undecided",
    ],
}


def _model_info(parts: list[Part]) -> dict[str, dict[str, Any]]:
    info: dict[str, dict[str, Any]] = {}
    for part in parts:
        if part.info:  # a part left out and read back has no record
            info.setdefault(part.model, part.info)
    return info


def depth_table(parts: list[Part], options: ReportOptions) -> pd.DataFrame:
    """One row per model x residual layer, with every measure.

    Columns ``depth`` = layer / blocks and ``block`` = the block whose output the layer is (empty at
    layer 0).
    """
    info = _model_info(parts)
    frames = []
    for model in options.models:
        n = int(info[model]["n_blocks"])
        merged = pd.DataFrame({"layer": np.arange(n + 1)})
        merged["block"] = pd.array([pd.NA, *range(n)], dtype="Int64")
        for part in parts:
            if part.model != model or part.experiment not in _FROM:
                continue
            summary = part.tables["summary"]
            if part.experiment == "perturb":
                summary = summary[summary["perturbation"] == options.perturb_mode]
            if "block" in summary:
                summary = summary.assign(layer=summary["block"] + 1)
            columns = [c for c in _FROM[part.experiment] if c in summary.columns]
            merged = merged.merge(summary[["layer", *columns]], on="layer", how="left")
        merged.insert(0, "depth", merged["layer"] / n)
        merged.insert(0, "family", info[model]["family"])
        merged.insert(0, "model", model)
        frames.append(merged)
    return pd.concat(frames, ignore_index=True)


def lens_table(parts: list[Part]) -> pd.DataFrame:
    """The lens parts' summaries of the residual states (site ``post``), over models.

    One row per model x lens x layer, the lens summary's columns with ``family`` and
    ``depth`` = layer / blocks added; empty when no lens part ran.
    """
    info = _model_info(parts)
    frames = []
    for part in parts:
        if part.experiment != "lens" or part.skipped:
            continue
        summary = part.tables["summary"]
        summary = summary[summary["site"] == "post"].assign(model=part.model)
        n = int(info[part.model]["n_blocks"])
        summary.insert(1, "family", info[part.model]["family"])
        summary.insert(2, "depth", summary["layer"] / n)
        frames.append(summary)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def probe_table(parts: list[Part]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The probe parts' summaries and verdicts, each concatenated over models."""
    summaries = [p.tables["summary"] for p in parts if p.experiment == "probe"]
    verdicts = [p.tables["verdicts"] for p in parts if p.experiment == "probe"]
    if not summaries:
        return pd.DataFrame(), pd.DataFrame()
    return pd.concat(summaries, ignore_index=True), pd.concat(verdicts, ignore_index=True)


def probe_grid(summary: pd.DataFrame) -> pd.DataFrame:
    """The paper-style probe table.

    One row per model x norms x layer x mapper x metric, one column per condition, each cell
    ``mean [lo, hi]``.
    """
    if summary.empty:
        return summary
    cells = summary.assign(
        cell=summary["score"].map("{:.3f}".format)
        + " ["
        + summary["score_lo"].map("{:.2f}".format)
        + ", "
        + summary["score_hi"].map("{:.2f}".format)
        + "]"
    )
    keys = ["model", "norms", "layer", "mapper", "metric"]
    grid = cells.pivot_table(index=keys, columns="condition", values="cell", aggfunc="first")
    order = [c for c in CONDITIONS if c in grid.columns]
    return grid[order].reset_index()


def head_shares(parts: list[Part], mode: str) -> pd.DataFrame:
    """One row per model: its heads by verdict under ``mode``.

    Each row also has the largest noise floor and the positional heads by name (``L{block}H{head}``,
    most positional first).
    """
    rows = []
    for part in parts:
        if part.experiment != "perturb":
            continue
        heads = part.tables["heads"]
        heads = heads[heads["perturbation"] == mode]
        counts = heads["verdict"].value_counts()
        positional = heads[heads["verdict"] == "position"].sort_values("follow_index")
        rows.append(
            {
                "model": part.model,
                "n_heads": len(heads),
                "n_heads_position": int(counts.get("position", 0)),
                "n_heads_token": int(counts.get("token", 0)),
                "n_heads_undecided": int(counts.get("undecided", 0)),
                "noise_floor": float(heads["noise_floor"].max()),
                "position_heads": " ".join(positional["head_name"]),
            }
        )
    return pd.DataFrame(rows)


# -- verdicts ------------------------------------------------------------------------------


def _identifiable_depth(rows: pd.DataFrame) -> float:
    """Deepest relative depth up to which at least half the tokens are identifiable."""
    ok = rows.sort_values("layer")["identifiable"].to_numpy() >= 0.5
    depths = rows.sort_values("layer")["depth"].to_numpy()
    if not ok[0]:
        return 0.0
    broken = np.flatnonzero(~ok)
    return float(depths[-1] if broken.size == 0 else depths[broken[0] - 1])


def _named(heads: str, shown: int = 6) -> str:
    names = heads.split()
    if not names:
        return ""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return f" Most positional: {', '.join(names[:shown])}{more}."


def _floor(value: float) -> str:
    return f"{value:.1e}" if np.isfinite(value) else "n/a"


def _depth_lines(model: str, rows: pd.DataFrame) -> list[str]:
    """The verdicts on token identity across depth of one model (its per-layer rows)."""
    lines: list[str] = []
    family = rows["family"].iloc[0]
    if "identifiable" in rows and rows["identifiable"].notna().any():
        reach = _identifiable_depth(rows)
        top = rows.iloc[-1]
        lines.append(
            f"{model} ({family}): at least half of the tokens stay identifiable by nearest "
            f"neighbour up to relative depth {reach:.2f}; at the top {top['identifiable']:.0%} "
            f"are, with cos_input {top['cos_input']:.3f} "
            f"[{top['cos_input_lo']:.3f}, {top['cos_input_hi']:.3f}] against a baseline of "
            f"{top['baseline']:.3f}."
        )
        cos = rows["cos_input"].to_numpy()
        lowest = int(np.argmin(cos))
        recovery = float(cos[-1] - cos.min())
        half_width = float((top["cos_input_hi"] - top["cos_input_lo"]) / 2)
        if family == "encoder":
            shows = recovery > max(0.05, 2 * half_width)
            lines.append(
                f"{model}: an MLM is expected to recover token identity near the top "
                f"(Voita et al. 2019). This run {'shows' if shows else 'does not show'} it: "
                f"cos_input is lowest at layer {lowest} of {len(cos) - 1} and ends "
                f"{recovery:+.3f} above that minimum."
            )
        else:
            drops = np.diff(cos)
            first_share = float((cos[0] - cos[1]) / max(cos[0] - cos.min(), 1e-12))
            steady = (drops < 0).mean() >= 0.7 and first_share < 0.5
            lines.append(
                f"{model}: a causal LM is expected to lose token identity steadily. This run "
                f"{'shows' if steady else 'does not show'} a steady loss: block 0 alone "
                f"removes {first_share:.0%} of the whole drop in cos_input "
                f"({cos[0]:.3f} -> {cos[1]:.3f}), and {int((drops < 0).sum())} of "
                f"{len(drops)} layers lower it further."
            )
    return lines


def _below_null_from(rows: pd.DataFrame) -> int | None:
    """The first layer from which the lens's KL stays below the unigram null, below the top.

    The top layer is left out (there the model's own head reads the output: KL 0); ``None``
    when the KL is above the null at the layer below the top.
    """
    below = rows[rows["layer"] < rows["layer"].max()].sort_values("layer")
    ok = (below["kl_final"] < below["kl_unigram"]).to_numpy()
    if not len(ok) or not ok[-1]:
        return None
    above = np.flatnonzero(~ok)
    return int(below["layer"].iloc[above[-1] + 1 if above.size else 0])


def _lens_lines(lens: pd.DataFrame) -> list[str]:
    """The verdicts of the lens parts: each lens of each model against its nulls."""
    lines = []
    for (model, name), rows in lens.groupby(["model", "lens"], sort=False):
        rows = rows.sort_values("layer")
        top = int(rows["layer"].max())
        below = rows[rows["layer"] == top - 1].iloc[0] if top > 0 else rows.iloc[-1]
        first = rows.iloc[0]
        if rows["family"].iloc[0] == "encoder":
            lines.append(
                f"{model}, {name} lens: the input token is the head's top-1 reading for "
                f"{first['identifiable']:.0%} of positions at layer 0 and "
                f"{rows.iloc[-1]['identifiable']:.0%} at the top (layer {top}); the nearest "
                f"embedding row answers {first['nn_identifiable']:.0%} and "
                f"{rows.iloc[-1]['nn_identifiable']:.0%}."
            )
            continue
        start = _below_null_from(rows)
        where = (
            f"falls below the unigram null ({first['kl_unigram']:.2f}) from layer {start} of "
            f"{top} (relative depth {start / top:.2f}) on"
            if start is not None
            else f"stays above the unigram null ({first['kl_unigram']:.2f}) at layer {top - 1}"
        )
        lines.append(
            f"{model}, {name} lens: its KL to the model's output is {first['kl_final']:.2f} "
            f"nats at layer 0 and {below['kl_final']:.2f} "
            f"[{below['kl_final_lo']:.2f}, {below['kl_final_hi']:.2f}] at layer {top - 1}, and "
            f"{where}; at layer {top - 1} its top-1 is the next token for "
            f"{below['next_top1']:.0%} of positions (the model's own output: "
            f"{rows.iloc[-1]['next_top1']:.0%}; always the most frequent next token: "
            f"{below['next_top1_null']:.0%})."
        )
    return lines


def verdict_lines(
    config: ReportOptions,
    depth: pd.DataFrame,
    heads: pd.DataFrame,
    probe_verdicts: pd.DataFrame,
    lens: pd.DataFrame | None = None,
    skipped: list[Part] | None = None,
) -> list[str]:
    """Plain-language verdicts with the numbers behind them."""
    lines = []
    for model in config.models:
        lines += _depth_lines(model, depth[depth["model"] == model].sort_values("layer"))
    for row in heads.itertuples(index=False):
        if not row.n_heads:
            lines.append(f"{row.model}: no head was measured under {config.perturb_mode}.")
            continue
        share = row.n_heads_position / row.n_heads
        lines.append(
            f"{row.model}: {row.n_heads_position} of {row.n_heads} heads ({share:.0%}) follow "
            f"positions and {row.n_heads_token} follow tokens under {config.perturb_mode} (95% "
            f"intervals over texts clear of a noise floor of at most {_floor(row.noise_floor)}); "
            f"{row.n_heads_undecided} undecided."
            + _named(str(row.position_heads) if isinstance(row.position_heads, str) else "")
        )
    if not probe_verdicts.empty:
        for model, part in probe_verdicts.groupby("model", sort=False):
            beats = int(part["beats_controls"].sum())
            lines.append(
                f"{model}: the probe beats its shuffled and structured-nonsense controls on "
                f"{beats} of {len(part)} (norms, layer, mapper, metric) lines; it reaches "
                f"{part['share_of_upper'].min():.0%}-{part['share_of_upper'].max():.0%} of its "
                "upper bound."
            )
    if lens is not None and not lens.empty:
        lines += _lens_lines(lens)
    for part in skipped or []:
        lines.append(f"{part.model}: no {part.experiment} part: {part.skipped}.")
    return lines


# -- documents -----------------------------------------------------------------------------


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    return buffer.getvalue()


def _markdown_table(frame: pd.DataFrame) -> str:
    shown = frame.copy()
    for column in shown.columns:
        if shown[column].dtype.kind == "f":
            shown[column] = shown[column].map(lambda v: "n/a" if pd.isna(v) else f"{v:.3f}")
        else:
            shown[column] = shown[column].map(
                lambda v: "n/a" if pd.api.types.is_scalar(v) and pd.isna(v) else v
            )
    header = "| " + " | ".join(map(str, shown.columns)) + " |"
    rule = "|" + "|".join("---" for _ in shown.columns) + "|"
    body = ["| " + " | ".join(map(str, row)) + " |" for row in shown.itertuples(index=False)]
    return "\n".join([header, rule, *body])


_STYLE = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 2rem auto;
       max-width: 72rem; padding: 0 1rem; color: #222; line-height: 1.45; }
h1 { font-size: 1.6rem; }
h2 { font-size: 1.25rem; margin-top: 2.2rem; border-bottom: 1px solid #ddd; }
img { max-width: 100%; border: 1px solid #eee; }
table { border-collapse: collapse; font-size: 0.8rem; margin: 0.6rem 0; }
td, th { border: 1px solid #ccc; padding: 2px 6px; text-align: right; }
.wide { overflow-x: auto; max-width: 100%; }
th { background: #f4f4f4; } .verdicts li { margin: 0.35rem 0; }
.note { color: #555; font-size: 0.85rem; }
"""


def assemble(
    options: ReportOptions, parts: list[Part]
) -> tuple[dict[str, pd.DataFrame], list[str]]:
    """The report's tables and its verdicts, from the parts' tables alone.

    The tables are ``depth``, ``heads``, ``probe`` and ``lens``; empty ones are left out.
    """
    depth = depth_table(parts, options)
    heads = head_shares(parts, options.perturb_mode)
    probe_summary, probe_verdicts = probe_table(parts)
    lens = lens_table(parts)
    skipped = [part for part in parts if part.skipped]
    verdicts = verdict_lines(options, depth, heads, probe_verdicts, lens, skipped)
    tables = {"depth": depth, "heads": heads, "probe": probe_summary, "lens": lens}
    return {k: v for k, v in tables.items() if not v.empty}, verdicts


def report_figures(
    options: ReportOptions, tables: dict[str, pd.DataFrame]
) -> list[tuple[str, str, Figure]]:
    """``(name, title, figure)`` for every figure the tables support."""
    depth = tables["depth"]
    figures: list[tuple[str, str, Figure]] = []
    if "cos_input" in depth:
        figures.append(
            (
                "drift",
                "Token drift: cosine to the input token, with the baseline",
                depth_figure(depth, "cos_input"),
            )
        )
        figures.append(
            (
                "identifiable",
                "Share of tokens identifiable by nearest neighbour",
                depth_figure(depth, "identifiable"),
            )
        )
    if "proj_attn" in depth:
        figures.append(
            (
                "sublayers",
                "Attention vs MLP: effect on the input-token direction",
                sublayer_figure(depth),
            )
        )
        figures.append(("mixing", "Context mixing: six measures", mixing_figure(depth)))
    if "follow_index" in depth:
        figures.append(
            (
                "follow_index",
                "Token-following index of attention heads",
                index_figure(depth, options.perturb_mode),
            )
        )
    if "probe" in tables:
        figures.append(
            ("probe", "Probe scores next to their controls", probe_figure(tables["probe"]))
        )
    if "lens" in tables:
        figures.append(
            (
                "lens",
                "Lenses: each residual state decoded through the model's head (and a tuned "
                "lens where given), against the nulls",
                lens_figure(tables["lens"]),
            )
        )
    return figures


@dataclass(frozen=True)
class _Page:
    """What both documents show: title, verdicts, figures, tables, parts, versions."""

    models: str
    verdicts: list[str]
    figures: list[tuple[str, str, bytes]]
    grid: pd.DataFrame
    heads: pd.DataFrame
    depth: pd.DataFrame
    parts: str
    versions: str
    views: list[str] = field(default_factory=list)


def _markdown(page: _Page) -> str:
    """``report.md``: figures linked from ``figures/``."""
    md = [f"# residual-trace report: {page.models}", ""]
    md += [f"- {line}" for line in page.verdicts] + [""]
    for name, title, _ in page.figures:
        md += [f"## {title}", "", f"![{title}](figures/{name}.png)", ""]
    if not page.grid.empty:
        md += [
            "## Probe scores and their controls (mean [95% interval])",
            "",
            _markdown_table(page.grid),
            "",
        ]
    if not page.heads.empty:
        md += ["## Heads by verdict", "", _markdown_table(page.heads), ""]
    md += ["## Per-layer measures (relative depth)", "", _markdown_table(page.depth), ""]
    md += [
        "---",
        "Layer k is the output of block k-1 (layer 0: the input of block 0); heads are named "
        "L<block>H<head>. Reproduce: `trace report --config config.toml`. Parts: "
        + page.parts
        + f". Versions: {page.versions}.",
    ]
    return "\n".join(md) + "\n"


def _html(page: _Page) -> str:
    """``report.html``: self-contained, the figures embedded."""
    models = html.escape(page.models)
    body = [
        f"<h1>residual-trace report: {models}</h1>",
        "<h2>Verdicts</h2>",
        "<ul class='verdicts'>"
        + "".join(f"<li>{html.escape(v)}</li>" for v in page.verdicts)
        + "</ul>",
    ]
    for _, title, data in page.figures:
        encoded = base64.b64encode(data).decode("ascii")
        body += [
            f"<h2>{html.escape(title)}</h2>",
            f"<img alt='{html.escape(title)}' src='data:image/png;base64,{encoded}'>",
        ]
    if page.views:
        body += [
            "<h2>Interactive views (hover a cell for its value)</h2>",
            embedded_sections(page.views),
        ]
    if not page.grid.empty:
        body += [
            "<h2>Probe scores and their controls (mean [95% interval])</h2>",
            page.grid.to_html(index=False),
        ]
    if not page.heads.empty:
        body += ["<h2>Heads by verdict</h2>", page.heads.to_html(index=False)]
    body += [
        "<h2>Per-layer measures (relative depth = layer / blocks; layer k is the output of "
        "block k-1)</h2>",
        *(
            "<div class='wide'>"
            + display_depth(page.depth, columns).to_html(index=False)
            + "</div>"
            for columns in _PAGE_COLUMNS
        ),
        "<p class='note'>Intervals are 95% bootstrap intervals; <code>tables/depth.csv</code> "
        "has every column, the bounds apart.</p>",
        "<p class='note'>Reproduce with <code>trace report --config config.toml</code>. "
        + html.escape(f"Versions: {page.versions}")
        + "</p>",
    ]
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>residual-trace report: {models}</title>"
        f"<style>{_STYLE}</style></head><body>" + "\n".join(body) + "</body></html>\n"
    )


#: The per-layer tables on the page (two, to fit a window), each value with its interval.
_PAGE_COLUMNS = (
    ("cos_input", "baseline", "identifiable", "proj_attn", "proj_mlp"),
    ("mix_raw", "mix_attnres_n", "mix_rollout", "mix_alti", "mix_vz", "follow_index"),
)


def display_depth(depth: pd.DataFrame, columns: tuple[str, ...]) -> pd.DataFrame:
    """The per-layer table as the page shows it: ``mean [lo, hi]`` cells, ``n/a`` if missing."""
    from residual_trace.stats import format_interval

    def cell(row: Any, column: str) -> str:
        value = row[column]
        if pd.isna(value):
            return "n/a"
        if f"{column}_lo" not in depth:
            return f"{value:.3f}"
        return f"{value:.3f} {format_interval(row[f'{column}_lo'], row[f'{column}_hi'], '.2f')}"

    rows = []
    for _, row in depth.iterrows():
        block = row.get("block")
        shown = {
            "model": row["model"],
            "depth": f"{row['depth']:.2f}",
            "layer": int(row["layer"]),
            "block": "n/a" if pd.isna(block) else int(block),
        }
        shown.update({c: cell(row, c) for c in columns if c in depth})
        rows.append(shown)
    return pd.DataFrame(rows)


_SECTION = re.compile(r'<section class="rt-view".*?</section>', re.DOTALL)


def viewer_sections(parts: list[Part]) -> list[str]:
    """Each part's interactive views, titled with its model.

    From the viewer.html the part saved (not built a second time), else from its run.
    """
    sections = []
    for part in parts:
        if part.directory is not None and (part.directory / "viewer.html").is_file():
            found = _SECTION.findall((part.directory / "viewer.html").read_text("utf-8"))
        elif part.result is not None:
            found = part.result.viewer_sections()
        else:
            found = []
        prefix = f"<h3>{html.escape(part.model)}: "
        sections += [section.replace("<h3>", prefix, 1) for section in found]
    return sections


def write_documents(
    root: Path,
    options: ReportOptions,
    parts: list[Part],
    tables: dict[str, pd.DataFrame],
    verdicts: list[str],
) -> list[Path]:
    """Write tables/, figures/, report.md and report.html into ``root``; return the files."""
    (root / "tables").mkdir(exist_ok=True)
    (root / "figures").mkdir(exist_ok=True)
    files = []
    for name, frame in tables.items():
        target = root / "tables" / f"{name}.csv"
        write_atomic(target, frame.to_csv(index=False))
        files.append(target)
    drawn = []
    for name, title, figure in report_figures(options, tables):
        data = _png(figure)
        target = root / "figures" / f"{name}.png"
        write_atomic(target, data)
        drawn.append((name, title, data))
        files.append(target)
    page = _Page(
        models=", ".join(options.models),
        verdicts=verdicts,
        figures=drawn,
        grid=probe_grid(tables.get("probe", pd.DataFrame())),
        heads=tables.get("heads", pd.DataFrame()),
        depth=tables["depth"],
        parts=", ".join(f"{p.model}/{p.experiment}" for p in parts),
        versions=json.dumps(package_versions()),
        views=viewer_sections(parts),
    )
    for text, name in ((_markdown(page), "report.md"), (_html(page), "report.html")):
        target = root / name
        write_atomic(target, text)
        files.append(target)
    return files
