"""Assemble ``report.html`` and ``report.md`` from the finished parts' tables.

Everything here reads tables only (no model): the comparison tables on a relative-depth axis,
the figures, and the verdicts in plain words with their numbers. The HTML is self-contained:
figures are embedded as data URIs, the style is inline, nothing is fetched.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from residual_trace.experiments.report import Part, ReportConfig, slug
from residual_trace.figures.report import (
    depth_figure,
    index_figure,
    mixing_figure,
    probe_figure,
    sublayer_figure,
)
from residual_trace.probes import CONDITIONS
from residual_trace.runs import package_versions, write_atomic, write_run_json

#: Per-layer columns gathered from each experiment's summary.csv.
_FROM = {
    "layers": ["cos_input", "cos_input_lo", "cos_input_hi", "baseline", "identifiable"],
    "decompose": [
        "proj_attn",
        "proj_attn_lo",
        "proj_attn_hi",
        "proj_mlp",
        "proj_mlp_lo",
        "proj_mlp_hi",
        "mix_raw",
        "mix_norm",
        "mix_norm_lo",
        "mix_norm_hi",
        "mix_rollout",
    ],
    "perturb": ["index", "index_lo", "index_hi", "n_token", "n_position", "n_undecided"],
}


def _model_info(parts: list[Part]) -> dict[str, dict[str, Any]]:
    info: dict[str, dict[str, Any]] = {}
    for part in parts:
        if part.model in info:
            continue
        record = json.loads((part.directory / "run.json").read_text())["model"]
        info[part.model] = {
            "family": record["family"],
            "architecture": record["architecture"],
            "n_blocks": int(record["n_blocks"]),
            "norm_placement": record["norm_placement"],
        }
    return info


def depth_table(parts: list[Part], config: ReportConfig) -> pd.DataFrame:
    """One row per model x layer: every per-layer measure, with ``depth`` = layer / blocks."""
    info = _model_info(parts)
    frames = []
    for model in config.models:
        n = info[model]["n_blocks"]
        merged = pd.DataFrame({"layer": np.arange(n + 1)})
        for part in parts:
            if part.model != model or part.experiment not in _FROM:
                continue
            summary = pd.read_csv(part.directory / "summary.csv")
            if part.experiment == "perturb":
                summary = summary[summary["perturbation"] == config.perturb_mode]
            columns = [c for c in _FROM[part.experiment] if c in summary.columns]
            merged = merged.merge(summary[["layer", *columns]], on="layer", how="left")
        merged.insert(0, "depth", merged["layer"] / n)
        merged.insert(0, "family", info[model]["family"])
        merged.insert(0, "model", model)
        frames.append(merged)
    return pd.concat(frames, ignore_index=True)


def probe_table(parts: list[Part]) -> tuple[pd.DataFrame, pd.DataFrame]:
    summaries, verdicts = [], []
    for part in parts:
        if part.experiment != "probe":
            continue
        summaries.append(pd.read_csv(part.directory / "summary.csv"))
        verdicts.append(pd.read_csv(part.directory / "verdicts.csv"))
    if not summaries:
        return pd.DataFrame(), pd.DataFrame()
    return pd.concat(summaries, ignore_index=True), pd.concat(verdicts, ignore_index=True)


def probe_grid(summary: pd.DataFrame) -> pd.DataFrame:
    """The paper-style probe table: one row per model x norms x layer x mapper x metric, one
    column per condition, each cell ``mean [lo, hi]``."""
    if summary.empty:
        return summary
    cells = summary.assign(
        cell=summary["mean"].map("{:.3f}".format)
        + " ["
        + summary["lo"].map("{:.2f}".format)
        + ", "
        + summary["hi"].map("{:.2f}".format)
        + "]"
    )
    keys = ["model", "norms", "layer", "mapper", "metric"]
    grid = cells.pivot_table(index=keys, columns="condition", values="cell", aggfunc="first")
    order = [c for c in CONDITIONS if c in grid.columns]
    return grid[order].reset_index()


def head_shares(parts: list[Part], mode: str) -> pd.DataFrame:
    rows = []
    for part in parts:
        if part.experiment != "perturb":
            continue
        heads = pd.read_csv(part.directory / "heads.csv")
        heads = heads[heads["perturbation"] == mode]
        counts = heads["verdict"].value_counts()
        total = len(heads)
        rows.append(
            {
                "model": part.model,
                "heads": total,
                "position": int(counts.get("position", 0)),
                "token": int(counts.get("token", 0)),
                "undecided": int(counts.get("undecided", 0)),
                "noise_floor": float(heads["noise_floor"].max()),
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


def verdict_lines(
    config: ReportConfig,
    depth: pd.DataFrame,
    heads: pd.DataFrame,
    probe_verdicts: pd.DataFrame,
) -> list[str]:
    """Plain-language verdicts with the numbers behind them."""
    lines = []
    for model in config.models:
        rows = depth[depth["model"] == model].sort_values("layer")
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
    for row in heads.itertuples(index=False):
        share = row.position / row.heads if row.heads else float("nan")
        lines.append(
            f"{row.model}: {row.position} of {row.heads} heads ({share:.0%}) follow positions "
            f"and {row.token} follow tokens under {config.perturb_mode} (95% intervals over "
            f"texts clear of a noise floor of at most {row.noise_floor:.1e}); "
            f"{row.undecided} undecided."
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
            shown[column] = shown[column].map(lambda v: "" if pd.isna(v) else f"{v:.3f}")
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
th { background: #f4f4f4; } .verdicts li { margin: 0.35rem 0; }
.note { color: #555; font-size: 0.85rem; }
"""


def write_report(
    config: ReportConfig, root: Path, parts: list[Part]
) -> tuple[list[str], list[Path]]:
    """Write tables, figures, report.md and report.html; return the verdicts and the files."""
    depth = depth_table(parts, config)
    heads = head_shares(parts, config.perturb_mode)
    probe_summary, probe_verdicts = probe_table(parts)
    verdicts = verdict_lines(config, depth, heads, probe_verdicts)
    (root / "tables").mkdir(exist_ok=True)
    (root / "figures").mkdir(exist_ok=True)
    files = []
    for frame, name in ((depth, "depth.csv"), (heads, "heads.csv"), (probe_summary, "probe.csv")):
        if not frame.empty:
            target = root / "tables" / name
            write_atomic(target, frame.to_csv(index=False))
            files.append(target)
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
        figures.append(("mixing", "Context mixing: three measures", mixing_figure(depth)))
    if "index" in depth:
        figures.append(
            (
                "index",
                "Token-following index of attention heads",
                index_figure(depth, config.perturb_mode),
            )
        )
    if not probe_summary.empty:
        figures.append(
            ("probe", "Probe scores next to their controls", probe_figure(probe_summary))
        )
    images = {}
    for name, _, figure in figures:
        data = _png(figure)
        target = root / "figures" / f"{name}.png"
        write_atomic(target, data)
        images[name] = data
        files.append(target)

    models = ", ".join(config.models)
    versions = json.dumps(package_versions())
    md = [f"# residual-trace report: {models}", ""]
    md += [f"- {line}" for line in verdicts] + [""]
    for name, title, _ in figures:
        md += [f"## {title}", "", f"![{title}](figures/{name}.png)", ""]
    grid = probe_grid(probe_summary)
    if not grid.empty:
        md += [
            "## Probe scores and their controls (mean [95% interval])",
            "",
            _markdown_table(grid),
            "",
        ]
    if not heads.empty:
        md += ["## Heads by verdict", "", _markdown_table(heads), ""]
    md += ["## Per-layer measures (relative depth)", "", _markdown_table(depth), ""]
    md += [
        "---",
        "Reproduce: `trace report --config config.toml`. Parts: "
        + ", ".join(f"{p.model}/{p.experiment}" for p in parts)
        + f". Versions: {versions}.",
    ]
    body = [
        f"<h1>residual-trace report: {html.escape(models)}</h1>",
        "<h2>Verdicts</h2>",
        "<ul class='verdicts'>" + "".join(f"<li>{html.escape(v)}</li>" for v in verdicts) + "</ul>",
    ]
    for name, title, _ in figures:
        encoded = base64.b64encode(images[name]).decode("ascii")
        body += [
            f"<h2>{html.escape(title)}</h2>",
            f"<img alt='{html.escape(title)}' src='data:image/png;base64,{encoded}'>",
        ]
    if not grid.empty:
        body += [
            "<h2>Probe scores and their controls (mean [95% interval])</h2>",
            grid.to_html(index=False),
        ]
    if not heads.empty:
        body += ["<h2>Heads by verdict</h2>", heads.to_html(index=False)]
    body += [
        "<h2>Per-layer measures (relative depth = layer / blocks)</h2>",
        depth.to_html(index=False, float_format=lambda v: f"{v:.3f}", na_rep=""),
        "<p class='note'>Reproduce with <code>trace report --config config.toml</code>. "
        + html.escape(f"Versions: {versions}")
        + "</p>",
    ]
    page = (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>residual-trace report: {html.escape(models)}</title>"
        f"<style>{_STYLE}</style></head><body>" + "\n".join(body) + "</body></html>\n"
    )
    for text, name in (("\n".join(md) + "\n", "report.md"), (page, "report.html")):
        target = root / name
        write_atomic(target, text)
        files.append(target)
    run_json = {
        "command": "report",
        "config": json.loads(json.dumps(config.__dict__, default=str)),
        "parts": [
            {
                "model": p.model,
                "experiment": p.experiment,
                "directory": str(p.directory),
                "ran_now": p.ran,
            }
            for p in parts
        ],
        "model_dirs": {m: slug(m) for m in config.models},
        "verdicts": verdicts,
    }
    write_run_json(root / "run.json", run_json)
    files += [root / "run.json", root / "config.toml"]
    return verdicts, files
