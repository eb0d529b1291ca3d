"""The viewer's views: pure functions from a verb's tables to one section of ``viewer.html``.

Each returns the section's HTML (:func:`~residual_trace.viewer.page.view_section`); the page
around it comes from :func:`~residual_trace.viewer.page.viewer_page`. Every value drawn comes
from a table the verb writes (named in each function), quantised as
:mod:`residual_trace.viewer.page` says, except the perturbation view's attention patterns,
which the run keeps for its figure.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from residual_trace.figures.tokens import clean_token
from residual_trace.viewer.page import PAGE_BUDGET, clean_json, fit, pack, view_section

#: Bytes kept for the page's script, styles, labels and notes (the rest is for arrays).
_OVERHEAD = 150_000

#: The measures of ``mixing_pairs`` the decompose view offers: (column, label, about).
PAIR_MEASURES = (
    (
        "attention",
        "attention weights",
        "a_ij: raw attention weight of target i on source j "
        "(column attention, the mean over heads, or one head's from attention_heads).",
    ),
    (
        "share",
        "Attn-N (norm-based share)",
        "|F_i(x_j)| as a share of row i: the norm of source "
        "j's term in target i's attention output, the residual added on the diagonal, through the "
        "norm after the sum where there is one (column share).",
    ),
    (
        "globenc",
        "GlobEnc (this block)",
        "N-Enc of Modarressi et al.: the norm of each source's "
        "term through both norms of the layer, each row divided by its sum, before rollout "
        "(column globenc).",
    ),
    (
        "alti",
        "ALTI (this block)",
        "c_ij of Ferrando et al.: how much the L1 distance of target "
        "i's output shrinks by source j's term, rows summing to 1, before rollout (column alti).",
    ),
    (
        "vz",
        "Value Zeroing (this block)",
        "S_ij of Mohebbi et al.: cosine distance of target "
        "i's block output when source j's values are zeroed, rows summing to 1 (column vz).",
    ),
)


def _square(frame: pd.DataFrame, column: str, n: int) -> np.ndarray:
    grid = np.full((n, n), np.nan)
    grid[frame["target"].to_numpy(), frame["source"].to_numpy()] = frame[column].to_numpy()
    return grid


def _tokens(frame: pd.DataFrame, position: str, token: str) -> list[str]:
    rows = frame.drop_duplicates(position).sort_values(position)
    return [clean_token(str(t)) for t in rows[token]]


def _text_entries(
    table: pd.DataFrame, texts: Sequence[str], kept: list[int], position: str, token: str
) -> list[dict[str, Any]]:
    """``{id, text, tokens}`` of each kept text, its tokens read from ``table``."""
    groups = dict(iter(table[table["text_id"].isin(kept)].groupby("text_id")))
    return [
        {"id": t, "text": texts[t], "tokens": _tokens(groups[t], position, token)} for t in kept
    ]


def decompose_view(
    pairs: pd.DataFrame,
    texts: Sequence[str],
    text_ids: Sequence[int],
    head_weights: pd.DataFrame | None = None,
    budget: int = PAGE_BUDGET,
) -> str:
    """Token x token maps of ``mixing_pairs`` (and ``attention_heads``) for ``text_ids``.

    One unit per text and block: every measure of :data:`PAIR_MEASURES` and, with
    ``head_weights``, each head's attention weights.
    """
    pairs = pairs[pairs["text_id"].isin(text_ids)]
    ranges = {c: _range(pairs[c]) for c, _, _ in PAIR_MEASURES}
    heads_by_unit = {}
    if head_weights is not None:
        ranges["head"] = _range(head_weights["attention"])
        heads_by_unit = dict(iter(head_weights.groupby(["text_id", "block"])))
    units = [
        _pair_unit(int(t), int(b), frame, heads_by_unit.get((t, b)), ranges)
        for (t, b), frame in pairs.groupby(["text_id", "block"])
    ]
    fitted = fit(units, budget - _OVERHEAD)
    maps = [item for payload in fitted.payloads for item in payload]
    kept = sorted({m["text"] for m in maps})
    data = {
        "kind": "decompose",
        "texts": _text_entries(pairs, texts, kept, "target", "target_token"),
        "blocks": sorted({int(b) for b in pairs["block"]}),
        "heads": [] if head_weights is None else sorted({int(h) for h in head_weights["head"]}),
        "measures": [
            {
                "key": c,
                "label": label,
                "short": c,
                "about": about,
                "lo": ranges[c][0],
                "hi": ranges[c][1],
            }
            for c, label, about in PAIR_MEASURES
        ],
        "maps": maps,
    }
    note = fitted.note("text x block map")
    if head_weights is None:
        note += " Per-head attention weights: run with --per-head."
    return view_section(clean_json(data), "Context mixing, token by token", note)


def _pair_unit(
    text_id: int,
    block: int,
    frame: pd.DataFrame,
    heads: pd.DataFrame | None,
    ranges: dict[str, tuple[float, float]],
) -> Callable[[int], list[dict[str, Any]]]:
    """One text and block of the decompose view: each measure's map, then each head's."""
    n = int(frame["target"].max()) + 1

    def build(bits: int) -> list[dict[str, Any]]:
        out = [
            {"text": text_id, "block": block, "measure": column,
             "arr": pack(_square(frame, column, n), bits, *ranges[column])}
            for column, _, _ in PAIR_MEASURES
        ]  # fmt: skip
        for head, part in [] if heads is None else heads.groupby("head"):
            grid = _square(part, "attention", n)
            out.append({"text": text_id, "block": block, "measure": f"head{int(head)}",
                        "arr": pack(grid, bits, *ranges["head"])})  # fmt: skip
        return out

    return build


def _range(values: pd.Series) -> tuple[float, float]:
    finite = values.to_numpy(dtype=float)
    finite = finite[np.isfinite(finite)]
    if not finite.size:
        return 0.0, 1.0
    return min(0.0, float(finite.min())), max(float(finite.max()), 1e-12)


#: The columns of ``heads.csv`` the perturbation view carries for each head.
_HEAD_COLUMNS = ["block", "head", "head_name", "follow_index", "follow_index_lo",
                 "follow_index_hi", "noise_floor", "verdict", "sim_token", "sim_position",
                 "n_texts"]  # fmt: skip


def perturb_view(
    heads: pd.DataFrame,
    example: Any,
    perturbation: str,
    budget: int = PAGE_BUDGET,
) -> str:
    """The block x head grid of ``heads.csv`` and each kept head's two patterns side by side.

    ``example`` is the run's :class:`~residual_trace.tracer.perturb.AttentionExample`: its
    patterns are the drawn text's, original and perturbed (the heads with the largest
    |index| first, while they fit the budget).
    """
    rows = heads[heads["perturbation"] == perturbation]
    order = rows.assign(size=rows["follow_index"].abs().fillna(-1)).sort_values(
        "size", ascending=False, kind="stable"
    )
    keys = [(int(b), int(h)) for b, h in zip(order["block"], order["head"], strict=True)]
    units = [_pattern_unit(example, key) for key in keys if key in example.original]
    fitted = fit(units, budget - _OVERHEAD)
    data = {
        "kind": "perturb",
        "label": re.sub(r" seed \d+", "", str(example.label)),  # the seed is in run.json
        "tokens": [clean_token(t) for t in example.tokens],
        "perturbed_tokens": [clean_token(t) for t in example.perturbed_tokens],
        "blocks": sorted({int(b) for b in rows["block"]}),
        "n_heads": int(rows["head"].max()) + 1,
        "heads_table": rows[_HEAD_COLUMNS].to_dict("records"),
        "patterns": sorted(fitted.payloads, key=lambda p: (p["block"], p["head"])),
        "about": (
            "Token-following index of every head (heads.csv, this perturbation): +1 when the "
            "pattern moves with the tokens, -1 when it stays with the positions. Pick a head to "
            "see its attention on the drawn text before and after the perturbation."
        ),
    }
    title = f"Attention under perturbation ({perturbation})"
    return view_section(clean_json(data), title, fitted.note("head"))


def _pattern_unit(example: Any, key: tuple[int, int]) -> Callable[[int], dict[str, Any]]:
    def build(bits: int) -> dict[str, Any]:
        return {"block": key[0], "head": key[1],
                "original": {"arr": pack(example.original[key], bits, 0.0, 1.0)},
                "perturbed": {"arr": pack(example.perturbed[key], bits, 0.0, 1.0)}}  # fmt: skip

    return build


#: The lens view's colourings: (column of lens.csv, label, short name, fixed range or None).
LENS_COLOURS = (
    ("top_prob", "probability of the top token", "top_prob", (0.0, 1.0)),
    ("kl_final", "KL(model output || lens), nats", "kl_final", None),
    ("entropy", "entropy of the lens, nats", "entropy", None),
)


def lens_view(lens: pd.DataFrame, texts: Sequence[str], budget: int = PAGE_BUDGET) -> str:
    """``lens.csv``'s top token of every position at every layer, per text and lens."""
    lens = lens[lens["site"] == "post"]
    layers = sorted({int(layer) for layer in lens["layer"]})
    vocab: dict[str, int] = {}
    ranges = {c: fixed or _range(lens[c]) for c, _, _, fixed in LENS_COLOURS}

    def unit(text_id: int, name: str, frame: pd.DataFrame) -> Callable[[int], dict[str, Any]]:
        frame = frame.sort_values(["position", "layer"])
        n = int(frame["position"].max()) + 1

        def build(bits: int) -> dict[str, Any]:
            top = [vocab.setdefault(clean_token(str(t)), len(vocab)) for t in frame["top_token"]]
            return {
                "text": text_id,
                "lens": name,
                "top": top,
                "arrs": [
                    {
                        "colour": c,
                        "arr": pack(
                            frame[c].to_numpy(float).reshape(n, len(layers)), bits, *ranges[c]
                        ),
                    }
                    for c, _, _, _ in LENS_COLOURS
                ],
            }

        return build

    units = [
        unit(int(t), str(name), frame) for (t, name), frame in lens.groupby(["text_id", "lens"])
    ]
    fitted = fit(units, budget - _OVERHEAD)
    kept = sorted({g["text"] for g in fitted.payloads})
    data = {
        "kind": "lens",
        "texts": _text_entries(lens, texts, kept, "position", "token"),
        "layers": layers,
        "vocab": list(vocab),
        "grids": fitted.payloads,
        "colours": [
            {"key": c, "label": label, "short": short, "lo": ranges[c][0], "hi": ranges[c][1]}
            for c, label, short, _ in LENS_COLOURS
        ],
        "about": "Each cell: the token the lens puts first when it reads that position's state at "
        "that layer (lens.csv, site post); hover for the value of the colouring.",
    }
    return view_section(
        clean_json(data), "Lens: the top token at every layer", fitted.note("text x lens grid")
    )


_SITE_LABELS = {
    "resid": "residual stream (layer)",
    "attn": "attention output (block)",
    "mlp": "MLP output (block)",
    "head": "attention heads",
}


def patch_view(patch: pd.DataFrame, pairs: pd.DataFrame, budget: int = PAGE_BUDGET) -> str:
    """``patch.csv``'s effect of every cell, per pair, site and sample (condition patch)."""
    cells = patch[patch["condition"] == "patch"]

    def unit(key: tuple[Any, ...], frame: pd.DataFrame) -> Callable[[int], dict[str, Any]]:
        pair_id, site, sample = int(key[0]), str(key[1]), int(key[2])
        grid, rows, cols, titles = _patch_grid(frame, site)

        def build(bits: int) -> dict[str, Any]:
            return {
                "pair": pair_id,
                "site": site,
                "sample": sample,
                "row_labels": rows,
                "col_labels": cols,
                "row_title": titles[0],
                "col_title": titles[1],
                "arr": pack(grid, bits),
            }

        return build

    groups = cells.groupby(["pair_id", "site", "sample"], sort=True)
    fitted = fit([unit(key, frame) for key, frame in groups], budget - _OVERHEAD)
    columns = ["pair_id", "clean", "corrupt", "metric", "metric_clean", "metric_corrupt"]
    info = pairs[columns].rename(columns={"pair_id": "id"}).to_dict("records")
    data = {
        "kind": "patch",
        "pairs": info,
        "site_labels": _SITE_LABELS,
        "maps": fitted.payloads,
        "about": "Each cell: the normalised effect of restoring that state, (patched - corrupt) / "
        "(clean - corrupt), from patch.csv; 0 restores nothing, 1 the clean run's metric.",
    }
    return view_section(
        clean_json(data), "Patching: where the information lives", fitted.note("pair x site map")
    )


def _patch_grid(
    frame: pd.DataFrame, site: str
) -> tuple[np.ndarray, list[str], list[str], tuple[str, str]]:
    """The effects of one pair, site and sample as rows x columns, with labels and titles."""
    if site == "head":
        return _head_grid(frame)
    index = "layer" if site == "resid" else "block"
    positions = sorted({int(p) for p in frame["position"]})
    steps = sorted({int(v) for v in frame[index]})
    grid = np.full((len(positions), len(steps)), np.nan)
    for p, s, e in zip(frame["position"], frame[index], frame["effect"], strict=True):
        grid[positions.index(int(p)), steps.index(int(s))] = e
    tokens = frame.drop_duplicates("position").set_index("position")["token"]
    kinds = frame.drop_duplicates("position").set_index("position")["position_kind"]
    rows = [
        f"{p} {clean_token(str(tokens[p]))}{' *' if str(kinds[p]).startswith('subject') else ''}"
        for p in positions
    ]
    return grid, rows, [str(s) for s in steps], ("clean token (* differs)", index)


def _head_grid(frame: pd.DataFrame) -> tuple[np.ndarray, list[str], list[str], tuple[str, str]]:
    """Head patching: rows are (position, block), or blocks alone when heads span every position."""
    where = frame["position"].fillna(-1).astype(int).to_numpy()
    positions = sorted(set(where.tolist()))
    blocks = sorted({int(b) for b in frame["block"]})
    heads = sorted({int(h) for h in frame["head"]})
    grid = np.full((len(positions) * len(blocks), len(heads)), np.nan)
    rows_of = {
        (p, b): i * len(blocks) + j for i, p in enumerate(positions) for j, b in enumerate(blocks)
    }
    for p, b, h, e in zip(where, frame["block"], frame["head"], frame["effect"], strict=True):
        grid[rows_of[(int(p), int(b))], heads.index(int(h))] = e
    tokens = dict(zip(where.tolist(), frame["token"].fillna("").astype(str), strict=True))
    rows = [
        str(b) if p < 0 else f"{p} {clean_token(tokens[p])}, block {b}"
        for p in positions
        for b in blocks
    ]
    title = "block" if positions == [-1] else "position, block"
    return grid, rows, [str(h) for h in heads], (title, "head")
