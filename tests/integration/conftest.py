"""Runs shared by the integration tests: every verb with figures on both packaged models."""

from __future__ import annotations

from typing import Any

import pytest

from tests.figure_runs import verb_runs


@pytest.fixture(scope="session")
def packaged_runs() -> dict[str, dict[str, Any]]:
    """``{model: {verb: Result}}`` for ``minilm`` and ``smollm2`` (small inputs)."""
    return {name: verb_runs(name) for name in ("minilm", "smollm2")}
