"""Training a tuned lens as its authors do (Belrose et al. 2023, ``AlignmentResearch/tuned-lens``).

What we follow (``tuned_lens/scripts/train_loop.py`` and ``ingredients.py``):

- one affine translator per residual layer ``0..L-1``, added residually and initialised at
  zero, so training starts from the logit lens (``TunedLens.__init__``);
- the loss: KL(final || lens) at the same position (``LossChoice.KL``, token shift 0), with
  ``final`` the model's own output distribution, summed over layers, each layer's loss
  averaged over the step's tokens and back-propagated on its own (as they do, to save memory);
- SGD with Nesterov momentum 0.9, learning rate ``lr_scale * (1 - 0.9)`` with ``lr_scale``
  1, weight decay 1e-3, gradient norm clipped to 1, and a linear decay of the learning rate
  to 0 over the steps with no warm-up (their defaults for SGD).

What we change for CPU budgets: their default is 250 steps of 2**18 tokens (65M tokens, on
GPUs); ours is ``--steps`` of ``--tokens-per-step`` tokens (defaults 30 of 128 on a CPU,
which trains a lens for ``smollm2`` in a few minutes on two cores; more on request or on a
GPU), the model's own texts (one text per sequence, as every verb reads them) instead of
The Pile chunked into 2,048-token sequences, and float32 instead of their bfloat16 autocast.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from residual_trace.models import TracedModel
from residual_trace.models.readout import Readout
from residual_trace.progress import progress_bar
from residual_trace.tracer.batching import EncodedText, iter_batches
from residual_trace.tracer.tuned_lens import TunedLens

__all__ = ["TrainingPlan", "heldout_kl", "train_tuned_lens"]

#: tuned-lens's SGD defaults (``ingredients.Optimizer``).
MOMENTUM = 0.9
WEIGHT_DECAY = 1e-3
LR_SCALE = 1.0
CLIP = 1.0


@dataclass(frozen=True)
class TrainingPlan:
    """How long and on what a tuned lens trains.

    Attributes:
        steps: optimiser steps.
        tokens_per_step: tokens (of all texts in the step, special tokens included) each
            step's loss averages over; texts are drawn in a seeded order, epoch after epoch.
        batch_size: texts per forward pass inside a step.
        seed: the order the texts are drawn in.
    """

    steps: int
    tokens_per_step: int
    batch_size: int
    seed: int


def _step_texts(encoded: Sequence[EncodedText], plan: TrainingPlan) -> list[list[EncodedText]]:
    """The texts of each step: a seeded permutation, epoch after epoch, to the token budget."""
    rng = np.random.default_rng(plan.seed)
    order: list[int] = []
    steps: list[list[EncodedText]] = []
    for _ in range(plan.steps):
        chosen: list[EncodedText] = []
        tokens = 0
        while tokens < plan.tokens_per_step:
            if not order:
                order = list(rng.permutation(len(encoded)))
            item = encoded[order.pop()]
            chosen.append(item)
            tokens += len(item.ids)
        steps.append(chosen)
    return steps


def _kl(final_logp: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Mean over rows of KL(final || softmax(logits)) in nats."""
    logp = torch.log_softmax(logits, dim=-1)
    return (final_logp.exp() * (final_logp - logp)).sum(-1).mean()


def _states(
    model: TracedModel, items: Sequence[EncodedText], batch_size: int
) -> list[torch.Tensor]:
    """Every layer's states of ``items`` (valid positions only), ``[L + 1, n, d_model]`` each."""
    out = []
    with torch.inference_mode():
        for batch in iter_batches(items, batch_size, model.pad_id):
            resid = model.capture(batch.ids, batch.mask).resid
            out.append(resid[:, batch.mask.bool().to(resid.device)])
    return [s.clone() for s in out]  # normal tensors, usable in autograd


def train_tuned_lens(
    model: TracedModel,
    head: Readout,
    encoded: Sequence[EncodedText],
    lens: TunedLens,
    plan: TrainingPlan,
    progress: bool = False,
    on_step: Callable[[int, float, list[float]], None] | None = None,
) -> pd.DataFrame:
    """Train ``lens`` in place on ``encoded``; return the loss per step and layer.

    The table has one row per step x layer: ``step`` (from 1), ``layer``, ``kl`` (the
    step's mean KL(final || lens) in nats, before the update), ``lr``.
    """
    device = model.device
    weight = torch.nn.Parameter(lens.weight.to(device))
    bias = torch.nn.Parameter(lens.bias.to(device))
    opt = torch.optim.SGD(
        [weight, bias],
        lr=LR_SCALE * (1 - MOMENTUM),
        momentum=MOMENTUM,
        nesterov=True,
        weight_decay=WEIGHT_DECAY,
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: max(0.0, (plan.steps - step) / max(1, plan.steps))
    )
    rows: list[dict[str, float]] = []
    frozen = [p for p in model.bridge.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    bar = progress_bar(
        _step_texts(encoded, plan), total=plan.steps, desc="training lens", unit="step",
        enabled=progress,
    )  # fmt: skip
    try:
        for step, items in enumerate(bar, start=1):
            lr = float(opt.param_groups[0]["lr"])
            losses = _train_step(model, head, items, plan, weight, bias)
            torch.nn.utils.clip_grad_norm_([weight, bias], CLIP)
            opt.step()
            opt.zero_grad(set_to_none=False)
            schedule.step()
            rows += [
                {"step": step, "layer": layer, "kl": loss, "lr": lr}
                for layer, loss in enumerate(losses)
            ]
            if on_step is not None:
                on_step(step, lr, losses)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    lens.weight = weight.detach().cpu()
    lens.bias = bias.detach().cpu()
    return pd.DataFrame(rows, columns=["step", "layer", "kl", "lr"]).astype(
        {"step": np.int64, "layer": np.int64}
    )


def _train_step(
    model: TracedModel,
    head: Readout,
    items: Sequence[EncodedText],
    plan: TrainingPlan,
    weight: torch.Tensor,
    bias: torch.Tensor,
) -> list[float]:
    """One step's gradients (accumulated over its batches); the mean KL per layer."""
    batches = _states(model, items, plan.batch_size)
    n_total = sum(int(s.shape[1]) for s in batches)
    sums = [0.0] * model.n_blocks
    for states in batches:
        share = states.shape[1] / n_total
        with torch.no_grad():
            final_logp = torch.log_softmax(head.logits(states[-1]), dim=-1)
        for layer in range(model.n_blocks):
            h = states[layer]
            translated = h + h @ weight[layer].T + bias[layer]
            loss = _kl(final_logp, head.logits(translated))
            (loss * share).backward()
            sums[layer] += float(loss.detach()) * share
    return sums


def heldout_kl(
    model: TracedModel,
    head: Readout,
    encoded: Sequence[EncodedText],
    lens: TunedLens,
    batch_size: int,
) -> pd.DataFrame:
    """Per-position KL(final || lens) on texts the lens did not train on, logit and tuned.

    One row per text x position x layer (0..L-1) x lens (``logit``, ``tuned``): ``text_id``,
    ``position``, ``token_id``, ``is_special``, ``layer``, ``lens``, ``kl`` (nats).
    """
    special = np.fromiter(model.special_ids, dtype=np.int64)
    frames = []
    with torch.inference_mode():
        for batch in iter_batches(encoded, batch_size, model.pad_id):
            valid = batch.mask.bool().to(model.device)
            resid = model.capture(batch.ids, batch.mask).resid[:, valid]
            rows = torch.arange(valid.shape[0], device=valid.device)[:, None].expand_as(valid)
            pos = torch.arange(valid.shape[1], device=valid.device)[None, :].expand_as(valid)
            text_ids = np.array([t.text_id for t in batch.texts])[rows[valid].cpu().numpy()]
            token_ids = batch.ids.to(valid.device)[valid].cpu().numpy()
            final_logp = torch.log_softmax(head.logits(resid[-1]), dim=-1)
            for layer in range(model.n_blocks):
                h = resid[layer]
                for name, state in (("logit", h), ("tuned", lens.translate(h, layer))):
                    logp = torch.log_softmax(head.logits(state), dim=-1)
                    kl = (final_logp.exp() * (final_logp - logp)).sum(-1)
                    frames.append(
                        pd.DataFrame(
                            {
                                "text_id": text_ids,
                                "position": pos[valid].cpu().numpy(),
                                "token_id": token_ids,
                                "is_special": np.isin(token_ids, special),
                                "layer": layer,
                                "lens": name,
                                "kl": kl.cpu().numpy(),
                            }
                        )
                    )
    if not frames:
        columns = ["text_id", "position", "token_id", "is_special", "layer", "lens", "kl"]
        return pd.DataFrame(columns=columns)
    return pd.concat(frames, ignore_index=True)
