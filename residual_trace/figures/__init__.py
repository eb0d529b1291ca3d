"""Pure figure functions over tidy tables (no model, no pyplot global state)."""

from residual_trace.figures.drift import (
    drift_heatmap_figure,
    identifiable_share_figure,
    token_drift_figure,
)

__all__ = ["drift_heatmap_figure", "identifiable_share_figure", "token_drift_figure"]
