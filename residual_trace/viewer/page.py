"""The viewer's page: self-contained HTML (script and styles inline) and the packing of arrays.

Arrays travel quantised: each is scaled onto unsigned integers over its own ``[lo, hi]``
(16 bits, or 8 where 16 would exceed the size budget), gzip-compressed and base64-encoded;
the browser inflates them with its built-in ``DecompressionStream``. The largest code stands
for a missing value (NaN in the CSV, shown as ``n/a``). A value read back is within half a
step, ``(hi - lo) / (2**bits - 2) / 2``, of the CSV's.
"""

from __future__ import annotations

import base64
import gzip
import html
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import numpy as np

#: The most a viewer page may weigh, in bytes (its arrays are dropped, unit by unit, beyond).
PAGE_BUDGET = 5_000_000


def _asset(name: str) -> str:
    return resources.files("residual_trace.viewer").joinpath("assets", name).read_text("utf-8")


def pack(
    values: np.ndarray, bits: int = 16, lo: float | None = None, hi: float | None = None
) -> dict[str, Any]:
    """``values`` quantised onto ``bits``-bit codes over ``[lo, hi]`` (default: their range)."""
    values = np.asarray(values, dtype=np.float64)
    finite = values[np.isfinite(values)]
    low = float(finite.min()) if lo is None and finite.size else float(lo or 0.0)
    high = (
        float(finite.max()) if hi is None and finite.size else float(hi if hi is not None else 1.0)
    )
    if high <= low:
        high = low + 1.0
    top = 2**bits - 1
    codes = np.rint((np.clip(values, low, high) - low) / (high - low) * (top - 1))
    codes = np.where(np.isfinite(values), codes, top).astype("<u2" if bits == 16 else "u1")
    z = base64.b64encode(gzip.compress(codes.tobytes(), compresslevel=9, mtime=0)).decode()
    return {"shape": list(values.shape), "lo": low, "hi": high, "bits": bits, "z": z}


def unpack(packed: dict[str, Any]) -> np.ndarray:
    """The values :func:`pack` stored (as the page decodes them), NaN where missing."""
    raw = gzip.decompress(base64.b64decode(packed["z"]))
    bits = packed["bits"]
    codes = np.frombuffer(raw, dtype="<u2" if bits == 16 else "u1").astype(np.float64)
    top = 2**bits - 1
    step = (packed["hi"] - packed["lo"]) / (top - 1)
    values = np.where(codes == top, np.nan, packed["lo"] + codes * step)
    return values.reshape(packed["shape"])


@dataclass
class Fitted:
    """What :func:`fit` kept: the units' payloads, the bits used, and how many were left out."""

    payloads: list[Any] = field(default_factory=list)
    bits: int = 16
    left_out: int = 0

    def note(self, unit: str) -> str:
        """One sentence on the quantisation and anything left out, for the page."""
        step = "1/65,534" if self.bits == 16 else "1/254"
        text = (
            f"Values are quantised to {self.bits} bits over each array's range (step "
            f"{step} of the range; a hovered value is within half a step of the CSV's)."
        )
        if self.left_out:
            text += (
                f" To stay within {PAGE_BUDGET / 1e6:.0f} MB, {self.left_out} {unit}(s) are not "
                "drawn here (the CSVs hold them)."
            )
        return text


def fit(units: Sequence[Callable[[int], Any]], budget: int) -> Fitted:
    """Each unit's payload at 16 bits if all fit in ``budget`` bytes, else 8 bits, in order.

    ``units`` are callables from bits to a JSON-able payload; at 8 bits, units are taken in
    order while the running size stays within ``budget`` (the first always).
    """
    payloads = [unit(16) for unit in units]
    if sum(_size(p) for p in payloads) <= budget:
        return Fitted(payloads, 16, 0)
    kept: list[Any] = []
    used = 0
    for unit in units:
        payload = unit(8)
        size = _size(payload)
        if kept and used + size > budget:
            break
        kept.append(payload)
        used += size
    return Fitted(kept, 8, len(units) - len(kept))


def _size(payload: Any) -> int:
    return len(json.dumps(payload, separators=(",", ":")))


def view_section(data: dict[str, Any], title: str, note: str) -> str:
    """One view: its title, a note, and its data for the script (``data["kind"]`` names it)."""
    payload = json.dumps(data, separators=(",", ":"), allow_nan=False).replace("</", "<\\/")
    return (
        f'<section class="rt-view" data-kind="{html.escape(data["kind"])}">'
        f'<h3>{html.escape(title)}</h3><p class="rt-note">{html.escape(note)}</p>'
        f'<div class="rt-body"></div>'
        f'<script type="application/json" class="rt-data">{payload}</script></section>'
    )


def viewer_page(title: str, sections: Sequence[str], intro: str = "") -> str:
    """A whole page: ``sections`` (from :func:`view_section`) with the script and styles inline."""
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title>"
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
        "script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:\">"
        f"<style>{_asset('viewer.css')}</style></head>"
        f'<body class="rt-page"><h2>{html.escape(title)}</h2>'
        f'<p class="rt-note">{html.escape(intro)}</p>'
        + "".join(sections)
        + f"<script>{_asset('viewer.js')}</script></body></html>"
    )


def embedded_sections(sections: Sequence[str]) -> str:
    """``sections`` with the script and styles, to embed in another page (the report)."""
    return (
        f"<style>{_asset('viewer.css')}</style>"
        + "".join(sections)
        + f"<script>{_asset('viewer.js')}</script>"
    )


def clean_json(value: Any) -> Any:
    """``value`` with every non-finite float as ``None`` (JSON has no NaN)."""
    if isinstance(value, float):
        return value if np.isfinite(value) else None
    if isinstance(value, dict):
        return {k: clean_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean_json(v) for v in value]
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return clean_json(float(value))
    if isinstance(value, np.bool_):
        return bool(value)
    return value
