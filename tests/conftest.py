"""Shared fixtures: tiny seeded checkpoints on disk, loaded through the real resolution path."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from residual_trace.experiments import bundled_sentences
from tests.helpers import save_tiny_bert, save_tiny_decoder

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _seed() -> None:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-models")
    return {
        "bert": save_tiny_bert(root),
        "gpt2": save_tiny_decoder(root, "gpt2"),
        "llama": save_tiny_decoder(root, "llama"),
    }


@pytest.fixture(scope="session")
def tiny_models(tiny_dirs: dict[str, Path]) -> dict[str, object]:
    from residual_trace import load_model

    return {kind: load_model(str(path), device="cpu") for kind, path in tiny_dirs.items()}


@pytest.fixture(scope="session")
def sentences() -> list[str]:
    texts = bundled_sentences()
    # short and long, with repeated tokens, a one-word text and punctuation
    return [texts[0], "Rain fell.", texts[len(texts) // 2], "Yes.", texts[200], texts[-1]]
