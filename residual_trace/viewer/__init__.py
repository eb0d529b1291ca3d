"""The interactive viewer: one self-contained HTML page per run (``viewer.html``).

No script, style or font comes from the network: everything is inline, and the page's
content-security policy forbids any request. :mod:`~residual_trace.viewer.views` turns a
verb's tables into views; :mod:`~residual_trace.viewer.page` packs their arrays and writes the
page.
"""

from residual_trace.viewer.page import PAGE_BUDGET, embedded_sections, pack, unpack, viewer_page
from residual_trace.viewer.views import decompose_view, lens_view, patch_view, perturb_view

__all__ = [
    "PAGE_BUDGET",
    "decompose_view",
    "embedded_sections",
    "lens_view",
    "pack",
    "patch_view",
    "perturb_view",
    "unpack",
    "viewer_page",
]
