"""What differs between architecture families, as data: derived from the bridge, then checked.

Everything outside :mod:`residual_trace.models` is architecture-blind: it asks an
:class:`ArchSpec` for hook names and structural facts. No family is typed in here. The facts
come from what the TransformerBridge already knows (its ``parallel_attn_mlp`` flag, its
normalisation type, whether attention is bidirectional, which norm modules a block has) and
from one short probe forward through the first block (:func:`derive_spec`), which checks the
identity the decomposition relies on:

- *additive* blocks (pre-norm GPT-2, Llama, Qwen, Mistral, Phi-3, OPT; parallel GPT-NeoX,
  GPT-J, Phi; norm-after-sublayer Gemma 2/3 and OLMo 2): block output = block input +
  what the attention sublayer adds + what the MLP adds (for Gemma 2/3 and OLMo 2 "what it
  adds" is the output of the norm applied to the sublayer's output);
- *post-LN* blocks (BERT, RoBERTa): mid = LN1(input + attention output), output =
  LN2(mid + MLP output).

An architecture whose first block satisfies neither is refused with a one-line error, as is
one whose bridge lacks a hook the measures read.

Examples:
    >>> spec = ArchSpec(model_type="gpt2", family="decoder", norm_placement="pre",
    ...                 prepend_bos=True)
    >>> spec.resid_hook(0), spec.resid_hook(6)
    ('blocks.0.hook_resid_pre', 'blocks.5.hook_resid_post')
    >>> spec.reader_norm(3, n_blocks=6), spec.reader_norm(6, n_blocks=6)
    ('blocks.3.ln1', 'ln_final')
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch

from residual_trace._typing import Tensor
from residual_trace.errors import UserError

NormPlacement = Literal["pre", "post", "sandwich", "output"]

#: What each norm placement means, for run.json and the README.
NORM_PLACEMENTS: dict[str, str] = {
    "pre": "a norm reads the residual stream before each sublayer; the stream is additive",
    "post": "LayerNorm after each sublayer's residual sum (BERT, RoBERTa)",
    "sandwich": "a norm before and after each sublayer (Gemma 2/3); the stream is additive",
    "output": "a norm on each sublayer's output only (OLMo 2); the stream is additive",
}

#: Relative error below which the probe accepts an identity between two hook tensors.
PROBE_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-8}
PROBE_TOLERANCE_LOW_PRECISION = 3e-2


@dataclass(frozen=True)
class ArchSpec:
    """Structural facts and hook sites of one model.

    Attributes:
        model_type: the Hugging Face ``config.model_type``.
        family: ``encoder`` (bidirectional attention) or ``decoder`` (causal).
        norm_placement: see :data:`NORM_PLACEMENTS`.
        prepend_bos: prepend the tokenizer's BOS token when the tokenizer does not add it
            (the TransformerLens convention for decoders: position 0 is an attention sink).
        parallel: attention and MLP both read the block input (GPT-NeoX, GPT-J, Phi).
        norm_kind: ``layernorm`` (centres, then scales) or ``rmsnorm`` (scales only).
        embed_scale: the factor the model multiplies token embeddings by (sqrt(d_model) for
            Gemma, 1 elsewhere), measured on the probe.
        tied_unembed: the unembedding shares the input embedding's weights.
        attn_delta, mlp_delta: hooks holding what each sublayer contributes to the block
            output (for post-LN: to the sum its LayerNorm reads).
        attn_raw: hook holding the attention sublayer's raw output, sum over heads of
            z_h @ W_O[h] (+ b_O), before any norm after it.
        attn_pattern, attn_values, attn_z: per-head pattern ``[batch head q k]``, values
            ``[batch pos kv_head d_head]`` and mixed values ``[batch pos head d_head]``.
        reader_norm_template: norm module that reads residual layer ``k`` (the next block's
            first norm); ``None`` when sublayers read the raw stream or states are normalised.
        final_norm: the final norm module, which reads the last layer (``None`` for post-LN).
        post_norms: post-LN only, the norms after the attention and MLP residual sums.
        output_norms: sandwich/output only, the norms applied to each sublayer's output.
    """

    model_type: str
    family: Literal["encoder", "decoder"]
    norm_placement: NormPlacement
    prepend_bos: bool
    parallel: bool = False
    norm_kind: Literal["layernorm", "rmsnorm"] = "layernorm"
    embed_scale: float = 1.0
    tied_unembed: bool = False
    attn_pattern: str = "blocks.{block}.attn.hook_pattern"
    attn_values: str = "blocks.{block}.attn.hook_v"
    attn_z: str = "blocks.{block}.attn.hook_z"
    attn_delta: str = "blocks.{block}.hook_attn_out"
    mlp_delta: str = "blocks.{block}.hook_mlp_out"
    attn_raw: str = "blocks.{block}.attn.o.hook_out"
    reader_norm_template: str | None = "blocks.{block}.ln1"
    final_norm: str | None = "ln_final"
    post_norms: tuple[str, str] | None = None
    output_norms: tuple[str, str] | None = None

    @property
    def norm_centres(self) -> bool:
        """Whether the model's norms subtract the mean (LayerNorm) or not (RMSNorm)."""
        return self.norm_kind == "layernorm"

    @property
    def reads_normalised(self) -> bool:
        """Whether a norm sits between the residual stream and the sublayers that read it.

        If so, a ``*_normed`` drift variant differs from the raw one.
        """
        return self.reader_norm_template is not None

    @staticmethod
    def resid_hook(layer: int) -> str:
        """Hook of residual layer ``layer``: 0 is block 0's input, k is block k-1's output."""
        if layer < 0:
            raise ValueError(f"layer must be >= 0, got {layer}")
        if layer == 0:
            return "blocks.0.hook_resid_pre"
        return f"blocks.{layer - 1}.hook_resid_post"

    def pattern_hook(self, block: int) -> str:
        """The hook of block ``block``'s attention pattern ``[batch, head, query, key]``."""
        return self.attn_pattern.format(block=block)

    def delta_hooks(self, block: int) -> tuple[str, str]:
        """Hooks holding block ``block``'s attention and MLP contributions (the deltas)."""
        return self.attn_delta.format(block=block), self.mlp_delta.format(block=block)

    def raw_attn_hook(self, block: int) -> str:
        """The hook of block ``block``'s raw attention output (before any norm after it)."""
        return self.attn_raw.format(block=block)

    def post_norm_modules(self, block: int) -> tuple[str, str] | None:
        """The two post-sublayer LayerNorms of block ``block`` (post-LN models only)."""
        if self.post_norms is None:
            return None
        first, second = self.post_norms
        return first.format(block=block), second.format(block=block)

    def output_norm_modules(self, block: int) -> tuple[str, str] | None:
        """The norms on block ``block``'s attention and MLP outputs (sandwich/output only)."""
        if self.output_norms is None:
            return None
        first, second = self.output_norms
        return first.format(block=block), second.format(block=block)

    def mid_sources(self, block: int) -> tuple[str, ...]:
        """The hooks whose sum is block ``block``'s state between its attention and its MLP.

        For additive blocks that is the block input plus what the attention adds; for
        post-LN blocks the attention's LayerNorm output (what the MLP reads).

        Raises:
            UserError: for parallel blocks, whose attention and MLP both read the input.
        """
        if self.parallel:
            raise UserError(
                f"--mid: {self.model_type} runs attention and MLP in parallel (both read the "
                "block input), so no state lies between them"
            )
        if self.post_norms is not None:
            return (f"{self.post_norms[0].format(block=block)}.hook_out",)
        return (self.resid_hook(block), self.attn_delta.format(block=block))

    def reader_norm(self, layer: int, n_blocks: int) -> str | None:
        """The norm module that reads residual layer ``layer`` (0..n_blocks), if any."""
        if layer == n_blocks:
            return self.final_norm
        if self.reader_norm_template is None:
            return None
        return self.reader_norm_template.format(block=layer)  # layer k is block k's input

    def describe(self) -> dict[str, Any]:
        """The structural facts, for ``run.json``."""
        return {
            "architecture": self.model_type,
            "family": self.family,
            "norm_placement": self.norm_placement,
            "norm_kind": self.norm_kind,
            "parallel_sublayers": self.parallel,
            "embed_scale": self.embed_scale,
            "tied_unembed": self.tied_unembed,
            "prepend_bos": self.prepend_bos,
        }


#: Probe runs the first block and returns the requested hook tensors (float64 where the
#: model runs in float32 or wider, the model's dtype otherwise).
Probe = Callable[[list[str]], dict[str, Tensor]]


def _refuse(model_type: str, why: str) -> UserError:
    return UserError(f"architecture '{model_type}' is not supported: {why}")


def _relative(a: Tensor, b: Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


#: Hooks every measure reads: without them nothing can be traced.
REQUIRED_HOOKS = {
    "blocks.0.hook_resid_pre": "residual stream",
    "blocks.0.hook_resid_post": "residual stream",
    "blocks.0.attn.hook_pattern": "attention pattern",
    "blocks.0.attn.hook_v": "attention value",
    "blocks.0.attn.hook_z": "per-head attention output",
    "blocks.0.attn.o.hook_out": "attention output projection",
    "blocks.0.hook_attn_out": "attention output",
    "blocks.0.hook_mlp_out": "MLP output",
}


def _refuse_unsupported(bridge: Any, model_type: str) -> None:
    """Refuse, in one line, what cannot be traced at all.

    That is two residual streams, no blocks, or a hook the decomposition needs that the
    bridge does not expose.
    """
    if getattr(bridge.original_model.config, "is_encoder_decoder", False):
        raise _refuse(model_type, "encoder-decoder models have two residual streams")
    if int(getattr(bridge.cfg, "n_layers", 0) or 0) < 1:
        raise _refuse(model_type, "the bridge found no transformer blocks")
    for name, what in REQUIRED_HOOKS.items():
        if name not in bridge.hook_dict:
            raise _refuse(model_type, f"TransformerLens's bridge exposes no {what} hook ({name})")


def _probe_hooks(hooks: Any) -> list[str]:
    """The hooks of block 0 that the probe forward reads (those the bridge has)."""
    names = [
        "embed.hook_out",
        "blocks.0.hook_resid_pre",
        "blocks.0.hook_resid_post",
        "blocks.0.hook_attn_out",
        "blocks.0.hook_mlp_out",
        "blocks.0.attn.o.hook_out",
    ]
    for norm in ("ln1", "ln2", "ln1_post", "ln2_post"):
        if f"blocks.0.{norm}.hook_in" in hooks:
            names += [f"blocks.0.{norm}.hook_in", f"blocks.0.{norm}.hook_out"]
    return [n for n in names if n in hooks]


def _output_norm_spec(
    got: dict[str, Tensor], has_ln1: bool, tolerance: float, common: dict[str, Any]
) -> ArchSpec:
    """The spec of blocks whose sublayer outputs pass through their own norms.

    Such are Gemma 2/3's sandwich and OLMo 2's output norms; the spec is returned once the
    probe shows each sublayer output is its norm's output.
    """
    deltas = (("ln1_post", "blocks.0.hook_attn_out"), ("ln2_post", "blocks.0.hook_mlp_out"))
    for norm, delta in deltas:
        out = got.get(f"blocks.0.{norm}.hook_out")
        if out is None or _relative(out, got[delta]) >= tolerance:
            raise _refuse(common["model_type"], f"the sublayer output is not the {norm} output")
    return ArchSpec(
        norm_placement="sandwich" if has_ln1 else "output",
        reader_norm_template="blocks.{block}.ln1" if has_ln1 else None,
        output_norms=("blocks.{block}.ln1_post", "blocks.{block}.ln2_post"),
        **common,
    )


def derive_spec(bridge: Any, probe: Probe, dtype: torch.dtype) -> ArchSpec:
    """The :class:`ArchSpec` of a booted bridge, checked on one probe forward.

    Raises:
        UserError: one line naming what is not supported and why.
    """
    hf_config = bridge.original_model.config
    cfg = bridge.cfg
    model_type = str(getattr(hf_config, "model_type", "unknown"))
    _refuse_unsupported(bridge, model_type)
    hooks = bridge.hook_dict
    block = bridge.blocks[0]
    has = {name: name in dict(block.named_children()) for name in ("ln1", "ln2")}
    has_output_norms = all(n in dict(block.named_children()) for n in ("ln1_post", "ln2_post"))
    family: Literal["encoder", "decoder"] = (
        "encoder" if getattr(cfg, "attention_dir", "causal") == "bidirectional" else "decoder"
    )
    rms = str(getattr(cfg, "normalization_type", "LN")).startswith("RMS")
    norm_kind: Literal["layernorm", "rmsnorm"] = "rmsnorm" if rms else "layernorm"
    tolerance = PROBE_TOLERANCE.get(dtype, PROBE_TOLERANCE_LOW_PRECISION)
    got = probe(_probe_hooks(hooks))
    pre, post = got["blocks.0.hook_resid_pre"], got["blocks.0.hook_resid_post"]
    attn, mlp = got["blocks.0.hook_attn_out"], got["blocks.0.hook_mlp_out"]
    common: dict[str, Any] = {
        "model_type": model_type,
        "family": family,
        "prepend_bos": family == "decoder",
        "parallel": bool(getattr(cfg, "parallel_attn_mlp", False)),
        "norm_kind": norm_kind,
        "embed_scale": _embed_scale(bridge, got),
        "tied_unembed": bool(getattr(hf_config, "tie_word_embeddings", False)),
    }
    if _relative(pre + attn + mlp, post) < tolerance:
        if has_output_norms:
            return _output_norm_spec(got, has["ln1"], tolerance, common)
        if not has["ln1"]:
            raise _refuse(model_type, "its blocks have no norm the bridge names ln1")
        return ArchSpec(norm_placement="pre", **common)
    delta = got["blocks.0.attn.o.hook_out"]
    if (
        all(has.values())
        and "blocks.0.ln2.hook_out" in got
        and _relative(got["blocks.0.ln1.hook_in"], pre + delta) < tolerance
        and _relative(got["blocks.0.ln2.hook_out"], post) < tolerance
    ):
        return ArchSpec(
            norm_placement="post",
            attn_delta="blocks.{block}.attn.o.hook_out",
            reader_norm_template=None,
            final_norm=None,
            post_norms=("blocks.{block}.ln1", "blocks.{block}.ln2"),
            **{**common, "prepend_bos": False},
        )
    raise _refuse(
        model_type,
        "its block output is neither the sum of the block input and its sublayer outputs "
        "nor a post-LayerNorm of them, so it cannot be decomposed exactly",
    )


def _embed_scale(bridge: Any, got: dict[str, Tensor]) -> float:
    """The factor between the token-embedding module's output and the embedding matrix's rows.

    It is sqrt(d_model) for Gemma, and 1 when the output is not a multiple of the rows.
    """
    embedded = got.get("embed.hook_out")
    ids = got.get("__ids__")
    if embedded is None or ids is None:
        return 1.0
    weight = bridge.original_model.get_input_embeddings().weight.detach()
    rows = weight[ids.to(weight.device)].double()
    embedded = embedded.double()
    scale = float((embedded * rows).sum() / (rows * rows).sum().clamp_min(1e-12))
    collinear = float((embedded - scale * rows).norm() / embedded.norm().clamp_min(1e-12)) < 1e-2
    return scale if collinear and abs(scale - 1.0) > 1e-3 else 1.0
