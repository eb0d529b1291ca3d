"""Attention-vs-MLP decomposition: exact reconstruction, TransformerLens agreement where it is
right (pre-LN), and where it is wrong (post-LN BERT)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

from residual_trace.tracer.decompose import (
    RECONSTRUCTION_TOLERANCE,
    PostNorm,
    ReconstructionError,
    decompose_table,
    split_block,
)
from tests.reference import hidden_states

KINDS = ["bert", "gpt2", "llama"]
TEXTS = ["The dog chased the cat.", "The committee rejected the proposal after a long debate."]


@pytest.mark.parametrize("kind", KINDS)
def test_parts_reconstruct_every_layer(kind, tiny_models, tiny_dirs):
    model = tiny_models[kind]
    local, cumulative = decompose_table(model, TEXTS, batch_size=2)
    assert (local["recon_error"] < RECONSTRUCTION_TOLERANCE).all()
    parts = local[["proj_resid", "proj_attn", "proj_mlp", "proj_bias"]].sum(axis=1)
    np.testing.assert_allclose(parts, local["proj_post"], atol=1e-4)
    # proj_post against an independent Hugging Face forward: h . W_E[t] / |W_E[t]|
    W_E = model.W_E.numpy()
    for text_id, text in enumerate(TEXTS):
        ids = model.encode(text)
        states, _ = hidden_states(tiny_dirs[kind], kind, ids)
        unit = W_E[ids] / np.linalg.norm(W_E[ids], axis=1, keepdims=True)
        rows = local[local["text_id"] == text_id]
        assert sorted(rows["block"].unique()) == list(range(model.n_blocks))
        for block in range(model.n_blocks):
            # block b reads residual layer b and writes layer b + 1
            got = rows[rows["block"] == block].sort_values("position")
            np.testing.assert_allclose(
                got["proj_post"], (states[block + 1] * unit).sum(1), atol=1e-4, rtol=1e-4
            )
            np.testing.assert_allclose(
                got["proj_pre"], (states[block] * unit).sum(1), atol=1e-4, rtol=1e-4
            )
    # cumulative shares of the squared norm add up to one at every layer
    np.testing.assert_allclose(cumulative.groupby("layer")["share"].sum(), 1.0, atol=1e-4)
    assert sorted(cumulative["layer"].unique()) == list(range(1, model.n_blocks + 1))
    assert set(cumulative["source"]) == {"embed", "bias"} | {
        f"L{b}_{kind}" for kind in ("attn", "mlp") for b in range(model.n_blocks)
    }
    # source_block: the block of an L{b}_attn / L{b}_mlp source, missing for embed and bias
    for source, block in zip(cumulative["source"], cumulative["source_block"], strict=True):
        if source in ("embed", "bias"):
            assert block is pd.NA, source
        else:
            assert block == int(source[1:].split("_")[0]), source
    # a source written by block b reaches residual layers b + 1 onwards only
    written = cumulative.dropna(subset=["source_block"])
    assert (written["layer"] >= written["source_block"] + 1).all()


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_pre_ln_split_equals_transformer_lens_decompose_resid(kind, tiny_models):
    model = tiny_models[kind]
    text = TEXTS[1]
    _, cumulative = decompose_table(model, [text])
    ids = torch.tensor([model.encode(text)])
    with torch.inference_mode():
        _, cache = model.bridge.run_with_cache(ids)
    stack, labels = cache.decompose_resid(layer=model.n_blocks, return_labels=True)
    special = torch.isin(ids[0], torch.tensor(sorted(model.special_ids)))
    unit = torch.nn.functional.normalize(model.W_E[ids[0]], dim=-1)
    theirs = {label: stack[i, 0] for i, label in enumerate(labels)}
    embedding = sum(v for k, v in theirs.items() if "embed" in k)
    ours = cumulative[cumulative["layer"] == model.n_blocks].set_index("source")
    expected = {"embed": embedding}
    for block in range(model.n_blocks):
        expected[f"L{block}_attn"] = theirs[f"{block}_attn_out"]
        expected[f"L{block}_mlp"] = theirs[f"{block}_mlp_out"]
    for source, part in expected.items():
        proj = (part * unit).sum(-1)[~special].mean().item()
        norm = part.norm(dim=-1)[~special].mean().item()
        assert ours.loc[source, "proj"] == pytest.approx(proj, abs=1e-4), source
        assert ours.loc[source, "norm"] == pytest.approx(norm, rel=1e-4), source
    assert ours.loc["bias", "norm"] == 0.0  # no norm bias parts in a pre-LN model


def test_transformer_lens_decompose_resid_misses_post_ln_bert_and_ours_does_not(tiny_models):
    model = tiny_models["bert"]
    ids = torch.tensor([model.encode(TEXTS[1])])
    with torch.inference_mode():
        _, cache = model.bridge.run_with_cache(ids)
    stack = cache.decompose_resid(layer=model.n_blocks)
    final = cache[f"blocks.{model.n_blocks - 1}.hook_resid_post"]
    their_error = ((stack.sum(0) - final).norm(dim=-1) / final.norm(dim=-1)).max().item()
    assert their_error > 0.1  # silently wrong: no warning, a large miss
    local, _ = decompose_table(model, [TEXTS[1]])
    assert local["recon_error"].max() < RECONSTRUCTION_TOLERANCE


def test_wrong_hook_site_fails_loudly(tiny_models, monkeypatch):
    """Using LN1's output as the attention delta (TransformerLens's reading) must raise."""
    model = tiny_models["bert"]
    wrong = dataclasses.replace(model.spec, attn_delta="blocks.{block}.hook_attn_out")
    monkeypatch.setattr(model, "spec", wrong)
    with pytest.raises(ReconstructionError, match="misses resid_post"):
        decompose_table(model, TEXTS)


def test_post_ln_split_by_hand():
    """LN(x + a) with a known divisor: each part centred, scaled by gamma / s, beta apart."""
    x = torch.tensor([[[1.0, 3.0]]])
    a = torch.tensor([[[2.0, 0.0]]])
    m = torch.tensor([[[0.0, 4.0]]])
    gamma, beta = torch.tensor([2.0, 1.0]), torch.tensor([0.5, -0.5])
    u = x + a  # [3, 3]: variance 0
    s1 = (u.var(-1, keepdim=True, unbiased=False) + 1.0).sqrt()  # eps = 1 keeps s finite
    ln1 = PostNorm(weight=gamma, bias=beta, scale=s1)
    mid = gamma * (u - u.mean(-1, keepdim=True)) / s1 + beta
    v = mid + m
    s2 = (v.var(-1, keepdim=True, unbiased=False) + 1.0).sqrt()
    ln2 = PostNorm(weight=gamma, bias=beta, scale=s2)
    post = gamma * (v - v.mean(-1, keepdim=True)) / s2 + beta
    parts = split_block(x, a, m, norms=(ln1, ln2))
    torch.testing.assert_close(parts.total(), post)
    # x = [1, 3] centred is [-1, 1]; through LN1 (s1 = 1): gamma * [-1, 1] = [-2, 1]
    torch.testing.assert_close(ln1.carry(x), torch.tensor([[[-2.0, 1.0]]]))


def test_batches_do_not_change_the_split(tiny_models):
    model = tiny_models["llama"]
    texts = [*TEXTS, "Yes."]
    one, _ = decompose_table(model, texts, batch_size=1)
    three, _ = decompose_table(model, texts, batch_size=3)
    numeric = one.select_dtypes("number").columns
    pd.testing.assert_frame_equal(
        one[numeric].drop(columns="recon_error"),
        three[numeric].drop(columns="recon_error"),
        atol=1e-5,
        rtol=0,
    )


@pytest.mark.parametrize("kind", KINDS)
def test_heads_add_up_to_the_attention_part(kind, tiny_models):
    from residual_trace.tracer import encode_texts, iter_batches
    from residual_trace.tracer.decompose import decompose_batch

    model = tiny_models[kind]
    batch = next(iter_batches(encode_texts(model, TEXTS, 64), 2, model.pad_id))
    with torch.inference_mode():
        result = decompose_batch(model, batch, per_head=True)
    heads, local = result.heads, result.local
    assert heads is not None
    assert sorted(heads["head"].unique()) == [-1, *range(model.n_heads)]  # -1: output bias
    assert sorted(heads["block"].unique()) == list(range(model.n_blocks))
    # TransformerLens naming: L{block}H{head}, and L{block}b_O for the output bias
    expected_names = [
        f"L{b}b_O" if h == -1 else f"L{b}H{h}"
        for b, h in zip(heads["block"], heads["head"], strict=True)
    ]
    assert heads["head_name"].tolist() == expected_names
    summed = heads.groupby(["text_id", "position", "block"])["proj_head"].sum()
    merged = local.set_index(["text_id", "position", "block"]).join(summed)
    np.testing.assert_allclose(merged["proj_head"], merged["proj_attn"], atol=1e-4)
    bias_rows = heads[heads["head"] == -1]
    for block, rows in bias_rows.groupby("block"):
        _, b_O = model.output_weights(int(block))
        has_bias = b_O is not None and bool(b_O.abs().max() > 0)  # Llama has none
        assert bool((rows["head_norm_rel"] > 0).all()) == has_bias


def test_gpt2_heads_match_hugging_face(tiny_models, tiny_dirs):
    """Each head's output from Hugging Face weights and attentions, projected on the token."""
    from transformers import AutoModel, AutoTokenizer

    from residual_trace.tracer import encode_texts, iter_batches
    from residual_trace.tracer.decompose import decompose_batch

    model = tiny_models["gpt2"]
    text = TEXTS[1]
    batch = next(iter_batches(encode_texts(model, [text], 64), 1, model.pad_id))
    with torch.inference_mode():
        heads = decompose_batch(model, batch, per_head=True).heads
    hf = AutoModel.from_pretrained(tiny_dirs["gpt2"], attn_implementation="eager").eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_dirs["gpt2"])
    ids = [tokenizer.bos_token_id, *tokenizer(text)["input_ids"]]
    with torch.no_grad():
        out = hf(torch.tensor([ids]), output_hidden_states=True, output_attentions=True)
    W_E = hf.wte.weight.detach().double().numpy()
    unit = W_E[ids] / np.linalg.norm(W_E[ids], axis=1, keepdims=True)
    for index, block in enumerate(hf.h):
        with torch.no_grad():
            normed = block.ln_1(out.hidden_states[index][0]).double().numpy()
        d = normed.shape[1]
        values = normed @ block.attn.c_attn.weight.detach().double().numpy()[:, 2 * d :]
        values += block.attn.c_attn.bias.detach().double().numpy()[2 * d :]
        W_O = block.attn.c_proj.weight.detach().double().numpy()  # Conv1D: [d_in, d_out]
        A = out.attentions[index][0].double().numpy()
        d_head = d // A.shape[0]
        for head in range(A.shape[0]):
            part = slice(head * d_head, (head + 1) * d_head)
            output = A[head] @ values[:, part] @ W_O[part]
            got = heads[(heads["block"] == index) & (heads["head"] == head)]
            np.testing.assert_allclose(
                got.sort_values("position")["proj_head"], (output * unit).sum(1), atol=1e-4
            )
