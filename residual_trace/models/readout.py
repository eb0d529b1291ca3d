"""The model's own output heads, applied to any residual state: what the lenses decode through.

Two readouts, both the checkpoint's own modules run in the model's dtype on its device, so
that at the last layer they give the model's output exactly:

- ``logit`` (decoders): the final norm, the unembedding (``lm_head``) and whatever the model
  applies to its logits after it (Gemma 2's final soft-capping ``c * tanh(z / c)``, Cohere's
  ``logit_scale``, Granite's ``logits_scaling``), read from the Hugging Face config;
- ``mlm`` (encoders): the masked-LM head of the checkpoint (``BertForMaskedLM``'s ``cls``:
  dense, activation, LayerNorm, decoder; RoBERTa's ``lm_head``), refused where the checkpoint
  lacks its weights (Hugging Face would have initialised them at random).

Examples:
    >>> from residual_trace.models.readout import softcap
    >>> import torch
    >>> round(float(softcap(torch.tensor([100.0]), 30.0)[0]), 4)
    29.9237
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch

from residual_trace._typing import Float, Tensor
from residual_trace.errors import UserError

if TYPE_CHECKING:
    from residual_trace.models.traced import TracedModel

#: The lenses a model's own head provides.
HeadKind = Literal["logit", "mlm"]


def softcap(logits: Tensor, cap: float) -> Tensor:
    """Gemma 2's final logit soft-capping: ``cap * tanh(logits / cap)``."""
    return torch.tanh(logits / cap) * cap


@dataclass(frozen=True)
class Readout:
    """One output head of a model, as a function from states to logits.

    Attributes:
        kind: ``logit`` or ``mlm``.
        head: the module mapping a state ``[..., d_model]`` to logits ``[..., d_vocab]``
            (for ``logit`` without the final norm, which ``norm`` holds).
        norm: the final norm (``logit`` only).
        softcap: Gemma 2's final soft-capping constant, if any.
        scale: a factor the model multiplies its logits by (Cohere's ``logit_scale``,
            ``1 / logits_scaling`` for Granite); 1 elsewhere.
        dtype: the dtype the modules run in (the model's).
        device: where the modules' weights are.
    """

    kind: HeadKind
    head: Any
    norm: Any
    softcap: float | None
    scale: float
    dtype: torch.dtype
    device: torch.device

    @torch.inference_mode()
    def __call__(self, states: Float[Tensor, "n d_model"]) -> Float[Tensor, "n d_vocab"]:
        """Logits of ``states`` (float32), computed in the model's dtype as the model does."""
        return self.logits(states)

    def logits(self, states: Float[Tensor, "n d_model"]) -> Float[Tensor, "n d_vocab"]:
        """:meth:`__call__` outside inference mode, so that gradients reach ``states``."""
        x = states.to(device=self.device, dtype=self.dtype)
        if self.norm is not None:
            x = self.norm(x)
        logits = self.head(x)
        if isinstance(logits, tuple):
            logits = logits[0]
        logits = logits.float()
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap is not None:
            logits = softcap(logits, self.softcap)
        return logits

    @torch.inference_mode()
    def columns(self, states: Float[Tensor, "n d_model"], ids: list[int]) -> Float[Tensor, "n k"]:
        """The logits of the tokens ``ids`` only (float32), equal to ``self(states)[:, ids]``.

        A linear unembedding computes just those rows of its weight (no vocabulary-sized
        temporary); any other head computes every logit and selects.
        """
        if not isinstance(self.head, torch.nn.Linear):
            return self(states)[:, ids]
        x = states.to(device=self.device, dtype=self.dtype)
        if self.norm is not None:
            x = self.norm(x)
        index = torch.tensor(ids, device=self.head.weight.device)
        bias = None if self.head.bias is None else self.head.bias[index]
        logits = torch.nn.functional.linear(x, self.head.weight[index], bias).float()
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap is not None:
            logits = softcap(logits, self.softcap)
        return logits


def _device_of(module: Any, fallback: torch.device) -> torch.device:
    param = next(iter(module.parameters()), None)
    return fallback if param is None else torch.device(param.device)


def _logit_post(config: Any) -> tuple[float | None, float]:
    """The soft-capping constant and the scale the model applies to its logits."""
    cap = getattr(config, "final_logit_softcapping", None)
    scale = float(getattr(config, "logit_scale", None) or 1.0)
    granite = getattr(config, "logits_scaling", None)
    if granite:
        scale /= float(granite)
    return (float(cap) if cap else None), scale


def logit_readout(model: TracedModel) -> Readout:
    """The decoder's final norm and unembedding (its own ``lm_head``), as :class:`Readout`.

    Raises:
        UserError: for an encoder (its output head is the MLM head: use the ``mlm`` lens).
    """
    if model.spec.family == "encoder":
        raise UserError(
            f"--lens logit: {model.name} is an encoder; its output head is its MLM head "
            "(use --lens mlm)"
        )
    hf = model.bridge.original_model
    head = hf.get_output_embeddings()
    if head is None:
        raise UserError(f"--lens logit: {model.name} has no output embedding (lm_head)")
    if model.head_missing:
        raise _untrained(model, "logit")
    norm = model.bridge.get_submodule(model.spec.final_norm) if model.spec.final_norm else None
    cap, scale = _logit_post(hf.config)
    return Readout(
        kind="logit",
        head=head,
        norm=norm,
        softcap=cap,
        scale=scale,
        dtype=model.dtype,
        device=_device_of(head, model.device),
    )


def _untrained(model: TracedModel, lens: str) -> UserError:
    shown = ", ".join(model.head_missing[:2])
    more = f" and {len(model.head_missing) - 2} more" if len(model.head_missing) > 2 else ""
    default = " (the default lens of an encoder)" if lens == "mlm" else ""
    return UserError(
        f"--lens {lens}{default}: the checkpoint of {model.name} has no trained output head "
        "(it lacks "
        f"{shown}{more}); refusing to decode through randomly initialised weights"
    )


def mlm_readout(model: TracedModel) -> Readout:
    """The encoder's masked-LM head (BERT's ``cls``, RoBERTa's ``lm_head``), as :class:`Readout`.

    Raises:
        UserError: for a decoder, a checkpoint without a masked-LM head, or one whose head
            weights are missing.
    """
    if model.spec.family != "encoder":
        raise UserError(
            f"--lens mlm: {model.name} is a decoder; its output head is read by --lens logit"
        )
    hf = model.bridge.original_model
    base = getattr(hf, "base_model", None)
    heads = [child for _, child in hf.named_children() if child is not base]
    if base is None or base is hf or len(heads) != 1:
        raise UserError(f"--lens mlm: {model.name} was not loaded with a masked-LM head")
    if model.head_missing:
        raise _untrained(model, "mlm")
    return Readout(
        kind="mlm",
        head=heads[0],
        norm=None,
        softcap=None,
        scale=1.0,
        dtype=model.dtype,
        device=_device_of(heads[0], model.device),
    )


def readout(model: TracedModel, kind: HeadKind) -> Readout:
    """:func:`logit_readout` or :func:`mlm_readout`."""
    return logit_readout(model) if kind == "logit" else mlm_readout(model)


def default_head(model: TracedModel) -> HeadKind:
    """The lens a model's own output is read through: ``mlm`` for encoders, else ``logit``."""
    return "mlm" if model.spec.family == "encoder" else "logit"


def unembedding_weight(model: TracedModel) -> Float[Tensor, "d_vocab d_model"]:
    """The unembedding matrix (``lm_head.weight``), for tuned-lens's ``unembed_hash``."""
    head = model.bridge.original_model.get_output_embeddings()
    weight = getattr(head, "weight", None)
    if weight is None:
        weight = head.original_component.weight
    return weight.detach()
