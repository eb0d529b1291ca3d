"""Every verb with figures, run small on one packaged model (the figure and console checks)."""

from __future__ import annotations

from typing import Any

import residual_trace as rt

TEXTS = [
    "The cat sat on the mat.",
    "A dog barked at the mailman, loudly.",
    "She walked to the old shop in the rain.",
    "Paris is the capital of France.",
]
FACT_PAIRS = [
    (
        "The Eiffel Tower is in the city of",
        "The Louvre Museum is in the city of",
        " Paris",
        " Rome",
    ),
]


def verb_runs(name: str) -> dict[str, Any]:
    """``{verb: Result}`` for ``name`` (``minilm`` or ``smollm2``), small inputs, quiet."""
    model = rt.load_model(name, device="cpu")
    decoder = model.spec.family == "decoder"
    runs: dict[str, Any] = {
        "layers": rt.layers(model, TEXTS, quiet=True),
        "decompose": rt.decompose(model, TEXTS, per_head=True, quiet=True),
        "perturb": rt.perturb(model, TEXTS, mode="shuffle", quiet=True),  # the report's mode
        "probe": rt.probe(
            model, mappers=("ridge",), folds=3, max_concepts=120, layers=(0, 2, 4), quiet=True
        ),
    }
    if decoder:
        # the perturbation that keeps the structure and drops the tokens has figures of its own
        runs["perturb-random-token"] = rt.perturb(model, TEXTS, mode="random-token", quiet=True)
        clean, corrupt, answer, wrong = FACT_PAIRS[0]
        runs["lens"] = rt.lens(model, TEXTS, quiet=True)
        runs["train-lens"] = rt.train_lens(model, TEXTS, steps=1, tokens_per_step=16, quiet=True)
        runs["patch"] = rt.patch(
            model,
            clean=[clean],
            corrupt=[corrupt],
            answer=answer,
            wrong=wrong,
            sites=("resid", "head"),  # attn and mlp draw as resid does (one function)
            quiet=True,
        )
    else:
        runs["patch"] = rt.patch(
            model,
            clean=["The cat sat on the mat."],
            corrupt=["The dog sat on the mat."],
            metric="state-cos",
            at="0",
            quiet=True,
        )
    return runs
