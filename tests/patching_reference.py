"""An independent reference for activation patching: plain PyTorch hooks on the Hugging Face
model (no TransformerLens, no residual-trace code), one forward pass per cell.

- ``resid`` layer ``l``: a forward pre-hook on block ``l`` replacing its input at a position;
- ``attn`` / ``mlp`` block ``b``: a forward hook on the sublayer module (the family's
  ``attn_raw`` / ``mlp_raw``) replacing its output at a position (sandwich and post-norms act
  per position after it, so this equals patching what the sublayer adds);
- ``head`` (block ``b``, head ``h``): a forward pre-hook on the attention's output
  projection replacing the head's slice of its input (the head's mixed values).

The metric is read from the Hugging Face model's own logits (``model(ids).logits``) or, for
``state-cos``, from the last block's output.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from tests.families import Family


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _at(tensor: torch.Tensor, position: int) -> tuple:
    """Index of one position: OPT flattens its MLP's input to [batch * pos, d]."""
    return (position,) if tensor.dim() == 2 else (0, position)


def output_projection(hf: torch.nn.Module, family: Family, block: int) -> torch.nn.Module:
    """The module that reads the heads' concatenated mixed values."""
    attn = hf.get_submodule(family.attn_raw.format(block=block))
    if isinstance(attn, torch.nn.Linear):  # BERT's attention.output.dense itself
        return attn
    for name in ("o_proj", "c_proj", "out_proj", "dense"):
        if hasattr(attn, name):
            return getattr(attn, name)
    raise AssertionError(f"no output projection under {family.attn_raw}")


def _module(hf: torch.nn.Module, family: Family, site: str, index: int) -> torch.nn.Module:
    if site == "resid":
        return hf.get_submodule(family.block.format(block=index))
    if site == "head":
        return output_projection(hf, family, index)
    path = family.attn_raw if site == "attn" else family.mlp_raw
    return hf.get_submodule(path.format(block=index))


def record(hf, family, site, blocks, ids) -> dict[int, torch.Tensor]:
    """The activation each site's hook replaces, per block, in a run of ``ids``."""
    got: dict[int, torch.Tensor] = {}
    handles = []
    for b in blocks:
        module = _module(hf, family, site, b)
        if site in ("resid", "head"):

            def pre(module, args, kwargs, b=b):
                given = args[0] if args else kwargs["hidden_states"]
                got[b] = given.detach().clone()

            handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        else:

            def post(module, args, output, b=b):
                got[b] = _first(output).detach().clone()

            handles.append(module.register_forward_hook(post))
    with torch.no_grad():
        hf(torch.tensor([ids]))
    for handle in handles:
        handle.remove()
    return got


def patched_outputs(
    hf: torch.nn.Module,
    family: Family,
    site: str,
    blocks: Sequence[int],
    positions: Sequence[int],
    head: int,
    d_head: int,
    source_ids: list[int],
    target_ids: list[int],
    source: dict[int, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The target run's last-position logits and last block output, with the cell restored.

    The cell: ``site`` at each of ``blocks``, at ``positions`` (and head ``head``), taken from
    the run of ``source_ids`` (or from ``source``, what :func:`record` kept of it).
    """
    if source is None:
        source = record(hf, family, site, blocks, source_ids)
    handles = []
    for b in blocks:
        module = _module(hf, family, site, b)
        value = source[b]
        if site in ("resid", "head"):

            def pre(module, args, kwargs, value=value):
                given = (args[0] if args else kwargs["hidden_states"]).clone()
                for p in positions:
                    if site == "head":
                        cut = slice(head * d_head, (head + 1) * d_head)
                        given[(*_at(given, p), cut)] = value[(*_at(value, p), cut)]
                    else:
                        given[_at(given, p)] = value[_at(value, p)]
                if args:
                    return (given, *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": given}

            handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        else:

            def post(module, args, output, value=value):
                out = _first(output).clone()
                for p in positions:
                    out[_at(out, p)] = value[_at(value, p)]
                return (out, *output[1:]) if isinstance(output, tuple) else out

            handles.append(module.register_forward_hook(post))
    last: list[torch.Tensor] = []
    n_blocks = len(hf.get_submodule(family.block.split(".{block}")[0]))
    final = hf.get_submodule(family.block.format(block=n_blocks - 1))
    handles.append(final.register_forward_hook(lambda m, a, o: last.append(_first(o)) and None))
    with torch.no_grad():
        logits = hf(torch.tensor([target_ids])).logits[0].double()
    for handle in handles:
        handle.remove()
    return logits, last[0][0].double()


def plain_outputs(hf: torch.nn.Module, family: Family, ids: list[int]):
    """The logits and last block output of an unpatched run."""
    return patched_outputs(hf, family, "resid", [], [], -1, 0, ids, ids)
