"""A booted TransformerBridge with the few things the tracer needs: the only TransformerLens user.

The bridge returns raw Hugging Face numerics (compatibility mode, which folds and centres
weights, stays off). :meth:`TracedModel.capture` registers forward hooks on exactly the
hook points it needs and stops the forward right after the last block, so the LM/MLM head,
which the drift measures never read, is not computed (for MiniLM it is as costly as the
encoder itself).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol, runtime_checkable

import torch

from residual_trace import defaults
from residual_trace._typing import (
    AttentionMask,
    EmbeddingMatrix,
    Float,
    PatternStack,
    ResidStack,
    Tensor,
    TokenIds,
)
from residual_trace.errors import UserError
from residual_trace.models.architectures import ArchSpec, derive_spec
from residual_trace.models.block_rest import BlockRest
from residual_trace.models.resolve import ResolvedModel, _quiet_transformers, resolve


@runtime_checkable
class BlockStream(Protocol):
    """A per-block reduction run inside the forward pass (see :meth:`TracedModel.run_hooks`)."""

    def names(self, block: int) -> list[str]:
        """The hooks block ``block`` needs (all fire while that block runs, or before)."""
        ...

    def reduce(self, block: int, tensors: dict[str, Tensor]) -> None:
        """Reduce block ``block``'s activations (float32) to what must be kept."""
        ...


class _StopForward(Exception):
    """Raised from the last hook we need: nothing after it is computed."""


@dataclass
class Capture:
    """What one forward pass left behind, for one padded batch.

    Attributes:
        resid: residual stream at every layer (0 = block 0's input, k = block k-1's
            output), ``[n_blocks + 1, batch, pos, d_model]``.
        patterns: attention patterns per block ``[n_blocks, batch, head, q, k]`` (rows
            sum to 1 over unmasked keys), or ``None`` when not requested.
    """

    resid: ResidStack
    patterns: PatternStack | None


@dataclass(frozen=True)
class NormAffine:
    """A norm module as an affine map once its divisor is fixed, measured by calling it.

    ``norm(x) = gain * c(x) / s + bias`` with ``c`` centring (LayerNorm) or the identity
    (RMSNorm) and ``s`` the divisor of that position. ``gain`` is the *effective* gain (for
    Gemma's RMSNorm, 1 + weight), read off the module's own output, not its parameters.
    """

    gain: Float[Tensor, " d_model"]
    bias: Float[Tensor, " d_model"]
    centres: bool

    def carry(self, part: Tensor, scale: Tensor) -> Tensor:
        """The share of ``part`` (``[..., d_model]``) in the norm's output, without the bias."""
        if self.centres:
            part = part - part.mean(-1, keepdim=True)
        return self.gain * part / scale


#: Dtypes ``--dtype`` accepts.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

#: Device maps ``--device-map`` accepts (accelerate's strategies).
DEVICE_MAPS = defaults.DEVICE_MAPS


def pick_device(device: str) -> torch.device:
    """``auto`` (CUDA when available), ``cpu`` or ``cuda``; a clear error otherwise."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available here (use auto or cpu)")
    if device not in {"cpu", "cuda"}:
        raise UserError(f"--device {device}: expected auto, cpu or cuda")
    return torch.device(device)


def _stream_groups(
    stream: BlockStream | None, n_blocks: int
) -> tuple[dict[int, list[str]], dict[str, list[int]]]:
    """The hooks ``stream`` wants per block, and the blocks that want each hook."""
    groups: dict[int, list[str]] = {}
    if stream is not None:
        groups = {b: list(dict.fromkeys(stream.names(b))) for b in range(n_blocks)}
    members: dict[str, list[int]] = {}
    for block, group in groups.items():
        for name in group:
            members.setdefault(name, []).append(block)
    return groups, members


class TracedModel:
    """A hooked TransformerBridge plus its tokenizer, architecture data and input embeddings.

    Build one with :func:`load_model`. Attributes:

    - ``name``, ``resolved`` (where the weights came from, their hash), ``model_type``;
    - ``spec``: the :class:`ArchSpec` with this architecture's hook sites;
    - ``n_blocks`` (blocks; the residual has ``n_blocks + 1`` layers), ``d_model``,
      ``n_heads``, ``d_vocab``, ``max_positions``;
    - ``W_E``: the input token-embedding matrix ``[d_vocab, d_model]`` (no positions).
    """

    def __init__(
        self,
        bridge: Any,
        resolved: ResolvedModel,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
        device_map: str | None = None,
    ) -> None:
        """Wrap a booted bridge; use :func:`load_model` rather than this."""
        self.bridge = bridge
        self.resolved = resolved
        self.name = resolved.name
        self.device = device
        self.dtype = dtype
        self.device_map = device_map
        self.tokenizer = bridge.tokenizer
        if self.tokenizer is None:
            raise UserError(f"model '{self.name}' has no tokenizer in {resolved.directory}")
        hf_config = bridge.original_model.config
        self.model_type: str = hf_config.model_type
        self.n_blocks: int = int(bridge.cfg.n_layers)
        self.d_model: int = int(bridge.cfg.d_model)
        self.n_heads: int = int(bridge.cfg.n_heads)
        self.max_positions: int = int(
            getattr(hf_config, "max_position_embeddings", None)
            or getattr(hf_config, "n_positions", None)
            or 512
        )
        self.unk_id: int | None = None
        self.special_ids: frozenset[int] = frozenset(
            int(i) for i in self.tokenizer.all_special_ids if i is not None
        )
        self.pad_id: int = int(
            self.tokenizer.pad_token_id
            if self.tokenizer.pad_token_id is not None
            else (self.tokenizer.eos_token_id or 0)
        )
        self._affines: dict[str, NormAffine] = {}
        self._hooks_paused = False
        #: the output head's weights the checkpoint lacks (Hugging Face initialised them at
        #: random); set by :func:`load_model` from the loader's own report
        self.head_missing: tuple[str, ...] = ()
        self.spec: ArchSpec = derive_spec(bridge, self._probe, dtype)
        #: the unknown token ([UNK]) where it is its own token: a stand-in for text the
        #: tokenizer has no piece for, flagged ``is_unk``, not structural; ``None`` where
        #: the same id also serves as structure (GPT-2's <|endoftext|> is BOS and UNK)
        self.unk_id = self._unknown_token()
        #: structural tokens ([CLS], [SEP], BOS, EOS, padding, [MASK]); [UNK] is not one
        self.special_ids = self.special_ids - {self.unk_id}
        weight = bridge.original_model.get_input_embeddings().weight
        #: the input token embeddings as the first block sees them (Gemma's sqrt(d_model)
        #: scale applied), float32
        self.W_E: EmbeddingMatrix = weight.detach().to(device=device, dtype=torch.float32)
        if self.spec.embed_scale != 1.0:
            self.W_E = self.W_E * self.spec.embed_scale
        self.d_vocab: int = int(self.W_E.shape[0])

    def _unknown_token(self) -> int | None:
        """The tokenizer's unknown-token id, unless that id is not a real unknown token.

        It is not when it also frames texts (added around them or prepended), pads or masks
        them (tokenizers name it BOS/EOS loosely), or when the tokenizer never emits it
        (byte-level BPE reads any text: its "unknown" token is a document separator, a
        structural token).
        """
        unk = self.tokenizer.unk_token_id
        if unk is None:
            return None
        rare = self.tokenizer("\U0001f9ff \ua66e \u0fd5", add_special_tokens=False)["input_ids"]
        if int(unk) not in rare:
            return None
        content = set(self.tokenizer("a", add_special_tokens=False)["input_ids"])
        framing = set(self.encode("a")) - content
        others = {self.pad_id, self.tokenizer.mask_token_id, self.tokenizer.cls_token_id}
        others |= {self.tokenizer.sep_token_id}
        return None if int(unk) in framing | (others - {None}) else int(unk)

    def _probe(self, names: list[str]) -> dict[str, Tensor]:
        """Run the first block on a short text and keep ``names`` (for :func:`derive_spec`)."""
        ids = self.tokenizer("The cat sat on the mat.", add_special_tokens=True)["input_ids"]
        batch = torch.tensor([ids[:16]], dtype=torch.long)
        store = self.run_hooks(
            batch, torch.ones_like(batch), names, stop_at="blocks.0.hook_resid_post"
        )
        store["__ids__"] = batch.to(self.device)
        return store

    # -- tokens -------------------------------------------------------------------------
    def encode(self, text: str, max_length: int | None = None) -> list[int]:
        """Token ids of ``text`` with the model's special tokens ([CLS]/[SEP], or a BOS).

        With ``max_length``, the tokenizer truncates so that the special tokens survive.
        """
        bos = self.tokenizer.bos_token_id
        prepend = self.spec.prepend_bos and bos is not None
        kwargs: dict[str, Any] = {"add_special_tokens": True}
        if max_length is not None:
            kwargs.update(truncation=True, max_length=max_length - int(prepend))
        ids = [int(i) for i in self.tokenizer(text, **kwargs)["input_ids"]]
        if prepend and (not ids or ids[0] != bos):
            ids = [int(bos), *ids]
        return ids[:max_length] if max_length is not None else ids

    def token_offsets(self, text: str, ids: Sequence[int]) -> list[tuple[int, int] | None]:
        """The character span in ``text`` of each token of ``ids``.

        ``ids`` is ``model.encode(text)``, possibly truncated; the span is ``None`` for special
        and prepended tokens. Needs a fast tokenizer (one with an offset mapping).
        """
        if not getattr(self.tokenizer, "is_fast", False):
            raise UserError(
                f"model '{self.name}': its tokenizer has no character offsets (not a fast "
                "tokenizer), so words cannot be located in a text"
            )
        encoded = self.tokenizer(
            text,
            add_special_tokens=True,
            return_offsets_mapping=True,
            return_special_tokens_mask=True,
        )
        got, spans = encoded["input_ids"], encoded["offset_mapping"]
        special = encoded["special_tokens_mask"]
        shift = 1 if ids and got and int(got[0]) != int(ids[0]) and self.spec.prepend_bos else 0
        result: list[tuple[int, int] | None] = []
        for k, token in enumerate(ids):
            j = k - shift
            aligned = 0 <= j < len(got) and int(got[j]) == int(token) and not special[j]
            result.append((int(spans[j][0]), int(spans[j][1])) if aligned else None)
        return result

    @property
    def uncased(self) -> bool:
        """Whether the tokenizer lower-cases its input ("The" and "the" give the same ids)."""
        ids = self.tokenizer(["The Dog", "the dog"], add_special_tokens=False)["input_ids"]
        return bool(ids[0] == ids[1])

    def is_unk(self, ids: Sequence[int]) -> list[bool]:
        """Which of ``ids`` are the unknown token."""
        return [self.unk_id is not None and int(i) == self.unk_id for i in ids]

    def token_strings(self, ids: Sequence[int]) -> list[str]:
        """The tokenizer's strings of ``ids`` (with its markers, e.g. ``Ġ``)."""
        return [str(t) for t in self.tokenizer.convert_ids_to_tokens(list(ids))]

    # -- norms ----------------------------------------------------------------------------
    def norm_affine(self, path: str) -> NormAffine:
        """The norm module at bridge path ``path`` as gain, bias and centring (cached).

        They are measured by calling the module on inputs whose mean and scale are known.
        """
        if path not in self._affines:
            module = self.bridge.get_submodule(path)
            inner = getattr(module, "_original_component", module)
            param = next(iter(inner.parameters()), None)
            dtype = param.dtype if param is not None else self.dtype
            where = param.device if param is not None else self.device
            d = self.d_model
            # +-64 alternating: mean-square 4096, so eps (<= 1e-5) shifts the divisor by
            # < 1e-9 relative; every value is exact in bfloat16 and float16
            signs = torch.where(torch.arange(d) % 2 == 0, 1.0, -1.0)
            probes = torch.stack([torch.zeros(d), torch.full((d,), 64.0), 64.0 * signs])
            with torch.inference_mode():
                out = inner(probes[:, None, :].to(device=where, dtype=dtype))
            out = (out[0] if isinstance(out, tuple) else out)[:, 0].to(torch.float64).cpu()
            zero, flat, alternating = out
            centres = bool(torch.allclose(flat, zero, atol=1e-3 * float(flat.abs().max() + 1)))
            x = probes[2].double()
            c = x - x.mean() if centres else x
            scale = c.pow(2).mean().sqrt()
            bias = zero if centres else torch.zeros(d, dtype=torch.float64)
            gain = (alternating - bias) * scale / c
            self._affines[path] = NormAffine(
                gain=gain.to(device=self.device, dtype=torch.float32),
                bias=bias.to(device=self.device, dtype=torch.float32),
                centres=centres,
            )
        return self._affines[path]

    def reader_norm_gain(self, layer: int) -> Float[Tensor, " d_model"] | None:
        """Effective elementwise gain of the norm that reads residual layer ``layer``.

        ``None`` when no norm reads it (post-LN models, whose states are normalised already,
        and OLMo 2, whose sublayers read the raw stream).
        """
        affine = self.reader_norm(layer)
        return None if affine is None else affine.gain

    def reader_norm(self, layer: int) -> NormAffine | None:
        """The norm that reads residual layer ``layer``, or ``None`` when no norm reads it.

        The norm is given as its effective gain, bias and whether it centres.
        """
        path = self.spec.reader_norm(layer, self.n_blocks)
        return None if path is None else self.norm_affine(path)

    def output_weights(
        self, block: int
    ) -> tuple[Float[Tensor, "head_index d_head d_model"], Float[Tensor, " d_model"] | None]:
        """``(W_O, b_O)`` of block ``block``'s attention.

        Head outputs z_h @ W_O[h] sum (+ b_O) to the attention sublayer's output.
        """
        attention = self.bridge.blocks[block].attn
        bias = attention.b_O
        return (
            attention.W_O.detach().to(device=self.device, dtype=torch.float32),
            None if bias is None else bias.detach().to(device=self.device, dtype=torch.float32),
        )

    @torch.inference_mode()
    def run_hooks(
        self,
        ids: TokenIds,
        attention_mask: AttentionMask,
        names: Sequence[str],
        stop_at: str | None = None,
        stream: BlockStream | None = None,
    ) -> dict[str, Tensor]:
        """One forward pass keeping the activations at ``names`` (float32).

        The forward stops right after the last block's output: hooks of the final norm or
        the LM head cannot be requested, and the head is never computed.

        With ``stream``, the activations ``stream.names(b)`` of each block ``b`` are handed
        to ``stream.reduce(b, tensors)`` as soon as the last of them fires, and dropped
        right after: what is quadratic in the length (attention patterns) is then never held
        for more than one block.
        """
        last = stop_at or self.spec.resid_hook(self.n_blocks)
        wanted = list(dict.fromkeys([*names, last]))
        store: dict[str, Tensor] = {}
        pending: dict[int, dict[str, Tensor]] = {}
        groups, members = _stream_groups(stream, self.n_blocks)

        def as_float(tensor: Tensor) -> Tensor:
            return tensor.to(device=self.device, dtype=torch.float32)

        def keeper(name: str) -> Callable[[Tensor, Any], None]:
            # Bridge hook points report canonical names (blocks.0.hook_in), not the alias
            # requested (blocks.0.hook_resid_pre): key the store by the requested name.
            def keep(tensor: Tensor, hook: Any) -> None:
                if self._hooks_paused:
                    return
                if name in wanted_set:
                    store[name] = tensor
                for block in members.get(name, ()):
                    group = pending.setdefault(block, {})
                    group[name] = as_float(tensor)
                    if len(group) == len(groups[block]):
                        assert stream is not None
                        stream.reduce(block, pending.pop(block))
                if name == last:
                    raise _StopForward

            return keep

        wanted_set = set(wanted)
        hooks = [(name, keeper(name)) for name in dict.fromkeys([*wanted, *members])]
        ids = ids.to(self.input_device)
        attention_mask = attention_mask.to(self.input_device)
        with self.bridge.hooks(fwd_hooks=hooks), contextlib.suppress(_StopForward):
            self.bridge(ids, attention_mask=attention_mask, return_type=None)
        missing = [n for n in wanted if n not in store]
        if missing or pending:
            lost = missing or [f"block {b}" for b in pending]
            raise RuntimeError(f"hooks did not fire for {self.model_type}: {lost[:3]}")
        return {name: as_float(store[name]) for name in names}

    @torch.inference_mode()
    def run_patched(
        self,
        ids: TokenIds,
        attention_mask: AttentionMask,
        edits: Mapping[str, Callable[[Tensor], Tensor]],
        keep: str,
    ) -> Tensor:
        """One forward pass with the activations at ``edits``' hooks replaced; ``keep``'s value.

        Each edit receives the activation its hook holds (the model's dtype and device) and
        returns what the rest of the forward pass reads instead (same shape). The pass stops
        right after ``keep`` fires (the head is never computed); its activation comes back
        float32 on :attr:`device`.
        """
        kept: list[Tensor] = []

        def editor(edit: Callable[[Tensor], Tensor]) -> Callable[[Tensor, Any], Tensor]:
            def apply(tensor: Tensor, hook: Any) -> Tensor:
                return edit(tensor)

            return apply

        def keeper(tensor: Tensor, hook: Any) -> None:
            kept.append(tensor.to(device=self.device, dtype=torch.float32))
            raise _StopForward

        hooks: list[tuple[str, Callable[[Tensor, Any], Tensor | None]]] = [
            (name, editor(edit)) for name, edit in edits.items()
        ]
        hooks.append((keep, keeper))
        ids = ids.to(self.input_device)
        attention_mask = attention_mask.to(self.input_device)
        with self.bridge.hooks(fwd_hooks=hooks), contextlib.suppress(_StopForward):
            self.bridge(ids, attention_mask=attention_mask, return_type=None)
        if not kept:
            raise RuntimeError(f"hook {keep} did not fire for {self.model_type}")
        return kept[0]

    @contextlib.contextmanager
    def hooks_paused(self) -> Iterator[None]:
        """Ignore :meth:`run_hooks`'s hooks while a stream re-runs the model's own modules.

        The re-run happens inside a forward pass; see
        :class:`~residual_trace.models.block_rest.BlockRest`.
        """
        before, self._hooks_paused = self._hooks_paused, True
        try:
            yield
        finally:
            self._hooks_paused = before

    def block_rest(self, block: int) -> BlockRest:
        """Block ``block`` after its attention sum, re-runnable position by position."""
        return BlockRest(self, block)

    @property
    def input_device(self) -> torch.device:
        """Where token ids go: the embedding's device (the first device of a device map)."""
        weight = self.bridge.original_model.get_input_embeddings().weight
        return torch.device(weight.device)

    def capture(
        self, ids: TokenIds, attention_mask: AttentionMask, patterns: bool = False
    ) -> Capture:
        """Run one padded batch and keep the residual stream (and patterns) of every layer."""
        resid_names = [self.spec.resid_hook(k) for k in range(self.n_blocks + 1)]
        pattern_names = (
            [self.spec.pattern_hook(b) for b in range(self.n_blocks)] if patterns else []
        )
        store = self.run_hooks(ids, attention_mask, [*resid_names, *pattern_names])
        resid = torch.stack([store[n] for n in resid_names])
        stacked = torch.stack([store[n] for n in pattern_names]) if patterns else None
        return Capture(resid=resid, patterns=stacked)


def load_model(
    name: str = "minilm",
    device: str = "auto",
    on_convert: Callable[[str], None] | None = None,
    dtype: str = "float32",
    device_map: str | None = None,
) -> TracedModel:
    """Resolve ``name`` and boot it as a hooked TransformerBridge, offline where possible.

    Args:
        name: ``minilm`` (default), ``smollm2``, a Hugging Face name (``bert-base-uncased``,
            ``gpt2``, ``org/name``) or a local checkpoint directory with its tokenizer.
        device: ``auto``, ``cpu`` or ``cuda`` (where the measures run; with ``device_map``
            the weights are spread by accelerate instead).
        on_convert: called with a message before a one-time conversion (GGUF) starts.
        dtype: ``float32`` (default), ``bfloat16`` or ``float16``: the weights and the
            forward pass; every measure is still computed in float32.
        device_map: ``auto``, ``balanced``, ``balanced_low_0`` or ``sequential``: split the
            model over the visible devices through accelerate.
    """
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype}: expected one of {', '.join(DTYPES)}")
    if device_map is not None and device_map not in DEVICE_MAPS:
        raise UserError(f"--device-map {device_map}: expected one of {', '.join(DEVICE_MAPS)}")
    torch_device = pick_device(device)
    resolved = resolve(name, on_convert=on_convert)  # before the slow import: fail fast
    from transformer_lens.model_bridge import TransformerBridge

    placement: dict[str, Any] = (
        {"device_map": device_map} if device_map is not None else {"device": str(torch_device)}
    )
    with _quiet_transformers(), _loading_reports() as reports:
        try:
            bridge = TransformerBridge.boot_transformers(
                str(resolved.directory), dtype=DTYPES[dtype], **placement
            )
        except UserError:
            raise
        except Exception as error:
            first = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise UserError(
                f"cannot load model '{name}' from {resolved.directory}: {first}"
            ) from None
    head_missing = tuple(k for what, keys in reports if what == HEAD_MISSING for k in keys)
    for what, keys in reports:
        if what == HEAD_MISSING:
            continue
        shown = ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
        raise UserError(
            f"--model {name}: the checkpoint {what} {shown}; refusing to run a model with "
            "randomly initialised or dropped layers (check config.json against the weights)"
        )
    bridge.eval()
    traced = TracedModel(bridge, resolved, torch_device, DTYPES[dtype], device_map)
    traced.head_missing = head_missing
    return traced


@contextlib.contextmanager
def _loading_reports() -> Iterator[list[tuple[str, list[str]]]]:
    """What is wrong with the weights of each model Hugging Face's loader loads.

    It comes from the loader's own report of missing, unexpected and mismatched weights
    (:func:`_weight_problems`, read as the loader reports, before the bridge wraps the
    modules).
    """
    import transformers.modeling_utils as modeling

    reports: list[tuple[str, list[str]]] = []
    original = getattr(modeling, "log_state_dict_report", None)
    if original is None:  # pragma: no cover - another transformers layout: nothing to read
        yield reports
        return

    def keep(model: Any, *args: Any, **kwargs: Any) -> Any:
        info = kwargs.get("loading_info", args[2] if len(args) > 2 else None)
        reports.extend(_weight_problems(model, info))
        head = _missing_head(model, info)
        if head:
            reports.append((HEAD_MISSING, head))
        return original(model, *args, **kwargs)

    modeling.log_state_dict_report = keep
    try:
        yield reports
    finally:
        modeling.log_state_dict_report = original


#: The loading report's tag for task-head weights the checkpoint lacks (not an error).
HEAD_MISSING = "lacks head weights"


def _missing_head(model: Any, info: Any) -> list[str]:
    """The task-head weights (outside the transformer body) the checkpoint lacks.

    A sentence-transformers checkpoint such as ``minilm`` has no MLM head: Hugging Face then
    initialises ``cls.*`` at random, which no drift measure reads but a lens would.
    """
    if info is None:
        return []
    base = getattr(model, "base_model", model)
    prefix = str(getattr(model, "base_model_prefix", "") or "")
    body = set(base.state_dict())
    return sorted(
        str(k)
        for k in getattr(info, "missing_keys", ())
        if (str(k).removeprefix(f"{prefix}.") if prefix else str(k)) not in body
    )


def _weight_problems(model: Any, info: Any) -> list[tuple[str, list[str]]]:
    """What stops a checkpoint's weights from covering the model its config describes.

    A missing weight of the transformer body (embeddings, blocks, norms) would be random, and
    an unexpected one means the config and the weights disagree (more layers, another
    layout). A missing task head (BERT's MLM head on a sentence-transformers checkpoint) and
    an unused pooler or classifier are harmless: no measure reads them.
    """
    if info is None:
        return []
    base = getattr(model, "base_model", model)
    prefix = str(getattr(model, "base_model_prefix", "") or "")
    body = set(base.state_dict())
    children = {child for child, _ in base.named_children()}

    def in_body(key: str) -> str | None:
        key = key.removeprefix(f"{prefix}.") if prefix else key
        return key if key in body or key.split(".")[0] in children else None

    missing = sorted(k for k in getattr(info, "missing_keys", ()) if in_body(k) in body)
    unexpected = sorted(k for k in getattr(info, "unexpected_keys", ()) if in_body(k))
    mismatched = [
        str(k[0] if isinstance(k, tuple) else k)
        for k in getattr(info, "mismatched_keys", None) or ()
    ]
    found = [
        ("lacks weights for", missing),
        ("has weights its config has no place for", unexpected),
        ("has weights of the wrong shape for", mismatched),
    ]
    return [(what, keys) for what, keys in found if keys]


def random_init_copy(model: TracedModel, seed: int) -> TracedModel:
    """The same architecture and tokenizer with seeded random weights.

    The weights follow Hugging Face's own initialisation: this is the ``random-init`` control
    of the probes. The global torch RNG is left as it was.
    """
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    config = model.bridge.original_model.config
    loader = AutoModelForMaskedLM if model.spec.family == "encoder" else AutoModelForCausalLM
    with torch.random.fork_rng(), _quiet_transformers():
        torch.manual_seed(seed)
        hf_model = loader.from_config(config).to(model.dtype)
        bridge = TransformerBridge.boot_transformers(
            str(model.resolved.directory),
            hf_model=hf_model,
            tokenizer=model.tokenizer,
            device=str(model.device),
            dtype=model.dtype,
        )
    bridge.eval()
    resolved = replace(
        model.resolved,
        name=f"{model.name} (random init, seed {seed})",
        source=f"{model.resolved.source}, weights re-initialised with seed {seed}",
        weights_sha256=f"random-init-seed-{seed}",
    )
    return TracedModel(bridge, resolved, model.device, model.dtype)
