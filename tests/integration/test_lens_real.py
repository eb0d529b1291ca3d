"""``trace lens`` and ``trace train-lens`` on the packaged SmolLM2, against Hugging Face."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import residual_trace as rt
from residual_trace.experiments import bundled_sentences

pytestmark = pytest.mark.slow

PROMPTS = ["The Eiffel Tower is in the city of", "Rain fell on the old town and the river rose."]


@pytest.fixture(scope="module")
def smollm2():
    return rt.load_model("smollm2", device="cpu")


def test_logit_lens_equals_final_norm_and_lm_head_on_every_hidden_state(smollm2):
    """The reference: Hugging Face's own model on the same weights, ``output_hidden_states``.

    In transformers 5 the last entry of ``hidden_states`` is after the final norm; the last
    layer's raw state is the last decoder layer's output, read by a forward hook.
    """
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(smollm2.resolved.directory).eval()
    kept = {}
    hook = hf.model.layers[-1].register_forward_hook(
        lambda m, a, out: kept.update(top=(out[0] if isinstance(out, tuple) else out)[0])
    )
    table = rt.lens(smollm2, PROMPTS, include_special=True, geometry=False).lens
    for text_id, text in enumerate(PROMPTS):
        ids = smollm2.encode(text)
        with torch.no_grad():
            out = hf(torch.tensor([ids]), output_hidden_states=True)
        states = [h[0] for h in out.hidden_states[:-1]] + [kept["top"]]
        final = out.logits[0].double()
        p = torch.softmax(final, -1)
        rows = table[table["text_id"] == text_id]
        for layer, state in enumerate(states):
            with torch.no_grad():
                logits = hf.lm_head(hf.model.norm(state)).double()
            if layer == len(states) - 1:
                assert torch.allclose(logits, final, atol=1e-4)
            logp = torch.log_softmax(logits, -1)
            kl = (p * (torch.log_softmax(final, -1) - logp)).sum(-1).numpy()
            at = rows[rows["layer"] == layer].sort_values("position")
            own = logits.gather(1, torch.tensor(ids)[:, None])
            low = 1 + (logits > own + 1e-4).sum(-1).numpy()
            high = 1 + (logits > own - 1e-4).sum(-1).numpy()
            ranks = at["input_rank"].to_numpy()
            assert ((low <= ranks) & (ranks <= high)).all()
            np.testing.assert_allclose(at["kl_final"], kl, rtol=1e-4, atol=1e-4)
    hook.remove()


def test_a_short_training_beats_the_logit_lens_on_held_out_text(smollm2):
    """Six steps of 128 tokens (a fifth of the default budget) on bundled sentences."""
    texts = bundled_sentences()[39:99]
    result = rt.train_lens(smollm2, texts, steps=6, tokens_per_step=128, heldout=1 / 6)
    summary = result.tables["heldout_summary"].pivot(index="layer", columns="lens", values="kl")
    better = (summary["tuned"] < summary["logit"]).to_numpy()
    assert better.mean() >= 0.9, summary
    training = result.tables["training"]
    first, last = training[training["step"] == 1], training[training["step"] == 6]
    assert last["kl"].mean() < first["kl"].mean()
