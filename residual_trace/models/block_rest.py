"""What a block does after its attention sublayer, as a function that can be re-run.

Value Zeroing (Mohebbi et al. 2023) asks how a block's output at position i changes when
token t's value vectors are zeroed. The attention weights do not change (queries and keys
are untouched), so the attention output at i loses exactly a_it-weighted v_t W_O:
o'_i = o_i - sum_h a^h_it v^h_t W^h_O. Everything after the attention sum is position-wise,
so the changed block output is :class:`BlockRest` applied to (x_i, o'_i): no other block,
and no attention, has to run again.

Per norm placement (``o`` is the raw attention output, incl. b_O; ``m`` the MLP):

- pre (GPT-2, Llama, Qwen, Mistral, OPT): mid = x + o; out = mid + m(ln2(mid));
- parallel (GPT-NeoX, GPT-J, Phi): out = x + o + m(ln(x)); the MLP reads the block input,
  which zeroing does not change, so its captured output is reused;
- post (BERT, RoBERTa): mid = LN1(x + o); out = LN2(mid + m(mid));
- sandwich (Gemma 2/3): mid = x + N1(o); out = mid + N2(m(ln2(mid)));
- output (OLMo 2): mid = x + N1(o); out = mid + N2(m(mid)).

The modules called are the model's own (through the bridge, with the forward hooks paused),
so each family's MLP (gated or not, its activation) is exactly the model's.
:meth:`BlockRest.check` compares the recomputed output with the block's real one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from residual_trace._typing import Float, Tensor

if TYPE_CHECKING:
    from residual_trace.models.traced import TracedModel

#: Attributes under which Hugging Face layers keep the activation of an MLP that has no
#: module of its own (BERT's ``intermediate.intermediate_act_fn``, OPT's ``activation_fn``).
_ACTIVATION_NAMES = ("intermediate_act_fn", "activation_fn", "act_fn", "act")


def _activation(layer: torch.nn.Module) -> Callable[[Tensor], Tensor]:
    for module in (layer, *layer.children()):
        for name in _ACTIVATION_NAMES:
            found = getattr(module, name, None)
            if callable(found) and not isinstance(found, type):
                return found
    raise RuntimeError(f"no activation found on {type(layer).__name__}")


class BlockRest:
    """Block ``block``'s output as a position-wise function of its input and attention output.

    :meth:`__call__` is ``(x, o, mlp_out) -> out``, all ``[rows, d_model]`` float32.

    ``mlp_out`` (the MLP's captured output) is read only by parallel blocks, whose MLP does
    not see the attention output; :attr:`hooks` names the hooks the call needs.
    """

    def __init__(self, model: TracedModel, block: int) -> None:
        """What follows block ``block``'s attention output, read from the model's spec."""
        self.model, self.block = model, block
        spec = model.spec
        self.placement = "parallel" if spec.parallel else spec.norm_placement
        bridge_block = model.bridge.blocks[block]
        self._modules: dict[str, Any] = {
            name: getattr(bridge_block, name)
            for name in ("ln1", "ln2", "ln1_post", "ln2_post", "mlp")
            if name in dict(bridge_block.named_children())
        }
        mlp = self._modules["mlp"]
        self._mlp: Callable[[Tensor], Tensor] = mlp
        if getattr(mlp, "name", "") is None:
            # containerless (BERT, OPT): the MLP is two Linear layers on the block itself
            act = _activation(mlp.original_component)
            up, down = getattr(mlp, "in"), mlp.out
            self._mlp = lambda h: down(act(up(h)))
        parameter = next(bridge_block.parameters())
        self._device, self._dtype = parameter.device, parameter.dtype

    @property
    def hooks(self) -> list[str]:
        """Hooks :meth:`__call__` reads besides the block input and attention output."""
        return [self.model.spec.delta_hooks(self.block)[1]] if self.placement == "parallel" else []

    def __call__(
        self,
        x: Float[Tensor, "rows d_model"],
        o: Float[Tensor, "rows d_model"],
        mlp_out: Float[Tensor, "rows d_model"] | None = None,
    ) -> Float[Tensor, "rows d_model"]:
        """The block's output from its attention output ``x`` (and what else it reads)."""
        if self.placement == "parallel":
            assert mlp_out is not None, "parallel blocks need the MLP's captured output"
            return x + o + mlp_out
        x_in = x[None].to(device=self._device, dtype=self._dtype)
        o_in = o[None].to(device=self._device, dtype=self._dtype)
        get, mlp = self._module, self._mlp
        with self.model.hooks_paused():
            if self.placement == "pre":
                mid = x_in + o_in
                out = mid + mlp(get("ln2")(mid))
            elif self.placement == "post":
                mid = get("ln1")(x_in + o_in)
                out = get("ln2")(mid + mlp(mid))
            elif self.placement == "sandwich":
                mid = x_in + get("ln1_post")(o_in)
                out = mid + get("ln2_post")(mlp(get("ln2")(mid)))
            else:  # output
                mid = x_in + get("ln1_post")(o_in)
                out = mid + get("ln2_post")(mlp(mid))
        return out[0].to(device=x.device, dtype=torch.float32)

    def _module(self, name: str) -> Callable[[Tensor], Tensor]:
        module = self._modules.get(name)
        if module is None:
            raise RuntimeError(f"block {self.block} has no {name} ({self.placement}-norm)")
        return module

    def check(self, recomputed: Tensor, actual: Tensor, tolerance: float) -> float | None:
        """The relative error of ``recomputed`` against the block's real output.

        ``None`` when it is within ``tolerance``.
        """
        error = float((recomputed - actual).norm() / actual.norm().clamp_min(1e-12))
        return None if error <= tolerance else error
