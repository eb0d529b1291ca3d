"""Where each architecture keeps its residual stream, sublayer deltas and norms: data, not code.

Everything outside :mod:`residual_trace.models` is architecture-blind; it asks an
:class:`ArchSpec` for hook names. Adding an architecture means adding one row to
:data:`ARCHITECTURES` (keyed by the Hugging Face ``config.model_type``) and a test that
checks it against Hugging Face ``output_hidden_states``.

Examples:
    >>> spec = ARCHITECTURES["bert"]
    >>> spec.resid_hook(0), spec.resid_hook(6)
    ('blocks.0.hook_resid_pre', 'blocks.5.hook_resid_post')
    >>> spec.reader_norm(3, n_layers=6) is None    # post-LN: states are already normalised
    True
    >>> ARCHITECTURES["llama"].reader_norm(30, n_layers=30)
    'ln_final'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from residual_trace.errors import UserError


@dataclass(frozen=True)
class ArchSpec:
    """Hook sites of one architecture family in the TransformerBridge.

    Attributes:
        family: ``encoder`` (bidirectional) or ``decoder`` (causal).
        norm_placement: ``post`` (BERT: normalise after each sublayer) or ``pre`` (GPT-2,
            Llama: normalise the input of each sublayer, residual stream stays additive).
        prepend_bos: prepend the tokenizer's BOS token when the tokenizer does not add it
            (the TransformerLens convention for decoders: position 0 is an attention sink).
        attn_pattern: hook holding the attention pattern ``[batch head q k]``.
        attn_values: hook holding the value vectors ``[batch pos kv_head d_head]`` (bias
            included; grouped-query models have fewer kv heads than query heads).
        attn_z: hook holding each head's mixed values ``[batch pos head d_head]``.
        attn_delta: hook holding the attention sublayer's own output (what it adds).
        mlp_delta: hook holding the MLP sublayer's own output.
        reader_norm_template: bridge module of the norm that *reads* layer ``k`` (the next
            block's first norm); ``None`` for post-LN models, whose states are normalised.
        final_norm: bridge module of the final norm that reads the last layer.
        norm_centres: whether that norm subtracts the mean (LayerNorm) or not (RMSNorm).
        post_norms: for post-LN models, the bridge modules of the norm after the attention
            sublayer and after the MLP (each with a ``hook_scale`` holding its divisor);
            ``None`` for pre-LN models, whose residual stream is additive.
    """

    family: Literal["encoder", "decoder"]
    norm_placement: Literal["pre", "post"]
    prepend_bos: bool
    attn_pattern: str = "blocks.{layer}.attn.hook_pattern"
    attn_values: str = "blocks.{layer}.attn.hook_v"
    attn_z: str = "blocks.{layer}.attn.hook_z"
    attn_delta: str = "blocks.{layer}.hook_attn_out"
    mlp_delta: str = "blocks.{layer}.hook_mlp_out"
    reader_norm_template: str | None = "blocks.{layer}.ln1"
    final_norm: str | None = "ln_final"
    norm_centres: bool = True
    post_norms: tuple[str, str] | None = None

    @staticmethod
    def resid_hook(layer: int) -> str:
        """Hook of residual layer ``layer``: 0 is block 0's input, k is block k-1's output."""
        if layer < 0:
            raise ValueError(f"layer must be >= 0, got {layer}")
        if layer == 0:
            return "blocks.0.hook_resid_pre"
        return f"blocks.{layer - 1}.hook_resid_post"

    def pattern_hook(self, block: int) -> str:
        return self.attn_pattern.format(layer=block)

    def delta_hooks(self, block: int) -> tuple[str, str]:
        """Hooks holding block ``block``'s attention and MLP sublayer outputs (the deltas)."""
        return self.attn_delta.format(layer=block), self.mlp_delta.format(layer=block)

    def post_norm_modules(self, block: int) -> tuple[str, str] | None:
        """The two post-sublayer norms of block ``block`` (post-LN models only)."""
        if self.post_norms is None:
            return None
        first, second = self.post_norms
        return first.format(layer=block), second.format(layer=block)

    def reader_norm(self, layer: int, n_layers: int) -> str | None:
        """The norm module that reads residual layer ``layer`` (0..n_layers), if any."""
        if self.reader_norm_template is None:
            return None
        if layer == n_layers:
            return self.final_norm
        return self.reader_norm_template.format(layer=layer)


ARCHITECTURES: dict[str, ArchSpec] = {
    # BERT, post-LN. hook_attn_out is LN1's output (a residual, not a delta): the delta is
    # attn.o.hook_out. See ENVIRONMENT.md, "BERT (post-LN) hook semantics".
    "bert": ArchSpec(
        family="encoder",
        norm_placement="post",
        prepend_bos=False,
        attn_delta="blocks.{layer}.attn.o.hook_out",
        reader_norm_template=None,
        final_norm=None,
        post_norms=("blocks.{layer}.ln1", "blocks.{layer}.ln2"),
    ),
    "gpt2": ArchSpec(family="decoder", norm_placement="pre", prepend_bos=True),
    "llama": ArchSpec(family="decoder", norm_placement="pre", prepend_bos=True, norm_centres=False),
}


def spec_for(model_type: str) -> ArchSpec:
    """The :class:`ArchSpec` for a Hugging Face ``model_type``, or a clear error."""
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        known = ", ".join(sorted(ARCHITECTURES))
        raise UserError(
            f"architecture '{model_type}' is not supported yet (supported: {known}); "
            "adding one is a row in residual_trace/models/architectures.py"
        ) from None
