"""Tuned lenses (Belrose et al. 2023) in the tuned-lens package's own file format.

A tuned lens holds one affine translator per residual layer ``l = 0..L-1``; the state of
layer ``l`` is read as ``unembed(h + W_l h + b_l)`` (the translator is added residually, as
the tuned-lens package does, so ``W_l = 0, b_l = 0`` is the identity and the lens is then the
logit lens). The last layer ``L`` has no translator: it is the model's output.

The format (``tuned_lens.nn.lenses.TunedLens.save``): a folder with

- ``config.json``: ``base_model_name_or_path``, ``d_model``, ``num_hidden_layers``, ``bias``,
  ``base_model_revision``, ``unembed_hash``, ``lens_type`` (``linear_tuned_lens``);
- ``params.pt``: the ``state_dict`` of a ``torch.nn.ModuleList`` of ``torch.nn.Linear``,
  keys ``"{l}.weight"`` (``[d_model, d_model]``, applied as ``h @ W.T``) and ``"{l}.bias"``.

Lenses written by the tuned-lens package (and those its authors publish) load here, and the
lenses :func:`save_tuned_lens` writes load in it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from residual_trace._typing import Float, Tensor
from residual_trace.errors import UserError

__all__ = ["TunedLens", "load_tuned_lens", "save_tuned_lens", "unembed_hash"]

CONFIG_FILE = "config.json"
PARAMS_FILE = "params.pt"
LENS_TYPE = "linear_tuned_lens"


def unembed_hash(weight: Tensor) -> str:
    """tuned-lens's hash of an unembedding matrix (``utils.tensor_hash``, precision 1)."""
    array = weight.detach().cpu().float().numpy()
    return hashlib.sha256(str.encode(np.array_str(array, precision=1))).hexdigest()


@dataclass
class TunedLens:
    """One affine translator per residual layer ``0..L-1`` (float32).

    Attributes:
        weight: ``[L, d_model, d_model]``; layer ``l`` reads ``h + h @ weight[l].T + bias[l]``.
        bias: ``[L, d_model]`` (zeros for a lens trained without bias).
        config: the ``config.json`` fields (kept and written back as they were).
    """

    weight: Float[Tensor, "layer d_model d_model"]
    bias: Float[Tensor, "layer d_model"]
    config: dict[str, Any]

    @classmethod
    def identity(cls, n_layers: int, d_model: int, config: dict[str, Any]) -> TunedLens:
        """The lens at its initialisation: every translator the identity (the logit lens)."""
        return cls(
            weight=torch.zeros(n_layers, d_model, d_model),
            bias=torch.zeros(n_layers, d_model),
            config=config,
        )

    @property
    def n_layers(self) -> int:
        """Translators (the model's blocks, ``num_hidden_layers``)."""
        return int(self.weight.shape[0])

    def translate(self, states: Float[Tensor, "n d_model"], layer: int) -> Tensor:
        """``h + h @ W_l.T + b_l`` for layer ``layer`` (< ``n_layers``), float32."""
        w = self.weight[layer].to(states.device)
        b = self.bias[layer].to(states.device)
        return states + states @ w.T + b


def _state_dict(lens: TunedLens) -> dict[str, Tensor]:
    state: dict[str, Tensor] = {}
    for layer in range(lens.n_layers):
        state[f"{layer}.weight"] = lens.weight[layer].detach().clone().contiguous()
        if lens.config.get("bias", True):
            state[f"{layer}.bias"] = lens.bias[layer].detach().clone().contiguous()
    return state


def save_tuned_lens(lens: TunedLens, folder: Path) -> None:
    """Write ``lens`` as the tuned-lens package does (``config.json`` and ``params.pt``)."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(_state_dict(lens), folder / PARAMS_FILE)
    (folder / CONFIG_FILE).write_text(json.dumps(lens.config) + "\n", encoding="utf-8")


def _read_config(folder: Path) -> dict[str, Any]:
    if not folder.is_dir():
        raise UserError(
            f"--tuned-lens {folder}: not a folder (it needs {CONFIG_FILE} and params.pt)"
        )
    for name in (CONFIG_FILE, PARAMS_FILE):
        if not (folder / name).is_file():
            raise UserError(f"--tuned-lens {folder}: no {name} (not a tuned-lens folder)")
    try:
        config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise UserError(f"--tuned-lens {folder}: cannot read {CONFIG_FILE}: {error}") from None
    if not isinstance(config, dict):
        raise UserError(f"--tuned-lens {folder}: {CONFIG_FILE} is not a JSON object")
    lens_type = config.get("lens_type", LENS_TYPE)
    if lens_type != LENS_TYPE:
        raise UserError(f"--tuned-lens {folder}: lens_type {lens_type!r}, expected {LENS_TYPE}")
    return config


def _read_params(folder: Path) -> dict[str, Tensor]:
    try:
        state = torch.load(folder / PARAMS_FILE, map_location="cpu", weights_only=True)
    except Exception as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise UserError(f"--tuned-lens {folder}: cannot read {PARAMS_FILE}: {first}") from None
    if not isinstance(state, dict):
        raise UserError(f"--tuned-lens {folder}: {PARAMS_FILE} holds no state dict")
    return state


def load_tuned_lens(folder: Path, n_blocks: int, d_model: int) -> TunedLens:
    """Read a tuned-lens folder and check it fits a model of ``n_blocks`` and ``d_model``.

    Raises:
        UserError: one line for a missing file, another lens type, or a lens trained for a
            model of another depth or width.
    """
    folder = Path(folder)
    config = _read_config(folder)
    state = _read_params(folder)
    layers = config.get("num_hidden_layers")
    width = config.get("d_model")
    if layers != n_blocks or width != d_model:
        raise UserError(
            f"--tuned-lens {folder}: trained for {layers} layers of width {width}, but the "
            f"model has {n_blocks} blocks of width {d_model}"
        )
    weights, biases = [], []
    for layer in range(n_blocks):
        w = state.get(f"{layer}.weight")
        if w is None or tuple(w.shape) != (d_model, d_model):
            shape = None if w is None else tuple(w.shape)
            raise UserError(
                f"--tuned-lens {folder}: {PARAMS_FILE} has no {layer}.weight of shape "
                f"({d_model}, {d_model}) (found {shape})"
            )
        b = state.get(f"{layer}.bias")
        weights.append(w.float())
        biases.append(torch.zeros(d_model) if b is None else b.float().reshape(d_model))
    return TunedLens(weight=torch.stack(weights), bias=torch.stack(biases), config=config)


def lens_config(
    name: str, n_blocks: int, d_model: int, unembedding: Tensor, revision: str | None
) -> dict[str, Any]:
    """A ``config.json`` as tuned-lens's ``TunedLens.from_model`` writes it."""
    return {
        "base_model_name_or_path": name,
        "d_model": d_model,
        "num_hidden_layers": n_blocks,
        "bias": True,
        "base_model_revision": revision,
        "unembed_hash": unembed_hash(unembedding),
        "lens_type": LENS_TYPE,
    }
