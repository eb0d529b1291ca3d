"""Defaults and choices that more than one part of the tool shares, each declared once.

The options classes, the command line, the report config and the measures' own keyword
defaults all read these names, so that a default cannot drift between them. Choice tuples
are derived from their ``Literal`` types. This module imports nothing heavy.

Examples:
    >>> DTYPES, FIGURE_FORMATS
    (('float32', 'bfloat16', 'float16'), ('png', 'svg', 'pdf'))
"""

from __future__ import annotations

from typing import Literal, get_args

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_DEVICE",
    "DEFAULT_DTYPE",
    "DEFAULT_FIGURE_FORMAT",
    "DEFAULT_MODEL",
    "DEFAULT_SEED",
    "DEVICES",
    "DEVICE_MAPS",
    "DTYPES",
    "FIGURE_FORMATS",
    "MOVING_MODES",
    "PERTURB_MODES",
    "Device",
    "DeviceMap",
    "Dtype",
    "FigureFormat",
    "PerturbMode",
]

#: Where a model runs (``auto``: CUDA when available, else the CPU).
Device = Literal["auto", "cpu", "cuda"]
#: The precision of the weights and forward passes (the measures stay float32).
Dtype = Literal["float32", "bfloat16", "float16"]
#: How accelerate splits a model over the visible devices.
DeviceMap = Literal["auto", "balanced", "balanced_low_0", "sequential"]
#: The file format of saved figures.
FigureFormat = Literal["png", "svg", "pdf"]
#: How ``trace perturb`` perturbs a text (the first two move tokens; the others change them
#: in place).
PerturbMode = Literal["swap", "shuffle", "embed-shuffle", "random-token"]

DEVICES: tuple[Device, ...] = get_args(Device)
DTYPES: tuple[Dtype, ...] = get_args(Dtype)
DEVICE_MAPS: tuple[DeviceMap, ...] = get_args(DeviceMap)
FIGURE_FORMATS: tuple[FigureFormat, ...] = get_args(FigureFormat)
PERTURB_MODES: tuple[PerturbMode, ...] = get_args(PerturbMode)
#: The perturbation modes that move tokens to other positions (the token-following index is
#: defined for them only).
MOVING_MODES: tuple[PerturbMode, ...] = ("swap", "shuffle")

#: The packaged model every command runs on unless told otherwise.
DEFAULT_MODEL = "minilm"
DEFAULT_DEVICE: Device = "auto"
DEFAULT_DTYPE: Dtype = "float32"
DEFAULT_FIGURE_FORMAT: FigureFormat = "png"
#: Seed of every random choice (bootstrap intervals, samples, controls).
DEFAULT_SEED = 0
#: Texts per forward pass (results do not depend on it).
DEFAULT_BATCH_SIZE = 16
