"""``trace lens`` against Hugging Face on every family, and the tuned-lens format both ways.

The reference reads each residual state with Hugging Face hooks (a block's input, the last
block's output, and the state between attention and MLP from the sublayer modules named in
``tests/families.py``), then decodes it with the Hugging Face model's own final norm (found by
matching tensors, not names) and output head, float32 as the model runs. The reference at the
last layer is first checked against the model's own ``logits``; no residual-trace code is used.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

import residual_trace as rt
from residual_trace.errors import UserError
from tests.families import FAMILIES, Family, save_family
from tests.unit.test_families import Recorder, _first, _hf, _norm_modules

TEXTS = ["The cat sat on the mat.", "Rain fell on the old town and the river rose."]
NAMES = list(FAMILIES)


@pytest.fixture(scope="module")
def lens_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lens-families")
    return {name: save_family(root, name) for name in NAMES}


def _states(hf: torch.nn.Module, family: Family, ids: list[int]) -> dict[str, Any]:
    """Residual states per layer, mid states per block and the logits, by HF hooks."""
    n_blocks = len(hf.get_submodule(family.block.split(".{block}")[0]))
    recorder = Recorder(hf)
    for block in range(n_blocks):
        for path in (family.block, family.attn_raw, family.attn_after):
            if path is not None:
                recorder.watch(path.format(block=block))
    for name in _norm_modules(hf):
        if name not in recorder.inputs:
            recorder.watch(name)
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0].float()
    recorder.close()
    blocks = [family.block.format(block=b) for b in range(n_blocks)]
    states = [recorder.inputs[b][0].float() for b in blocks]
    states.append(recorder.outputs[blocks[-1]][0].float())
    mids = []
    for b in range(n_blocks):
        if family.norm_site == "post":
            mids.append(recorder.outputs[family.attn_after.format(block=b)][0].float())
        else:
            sub = family.attn_after or family.attn_raw
            mids.append(states[b] + recorder.outputs[sub.format(block=b)][0].float())
    final_norm = None
    for name in _norm_modules(hf):
        given = recorder.inputs.get(name)
        same = given is not None and given.numel() == states[-1].numel()
        if same and torch.allclose(given.reshape(states[-1].shape).float(), states[-1], atol=1e-6):
            final_norm = hf.get_submodule(name)
    return {"states": states, "mids": mids, "logits": logits, "final_norm": final_norm}


def _decode(hf: torch.nn.Module, family: Family, norm: Any, state: torch.Tensor) -> torch.Tensor:
    """The reference lens: the model's own head on ``state`` (float32)."""
    with torch.no_grad():
        if family.encoder:
            base = hf.base_model
            head = next(c for _, c in hf.named_children() if c is not base)
            return _first(head(state[None]))[0].float()
        x = _first(norm(state[None]))[0] if norm is not None else state
        logits = hf.get_output_embeddings()(x).float()
        cap = getattr(hf.config, "final_logit_softcapping", None)
        return torch.tanh(logits / cap) * cap if cap else logits


def _check_rows(rows: pd.DataFrame, logits: torch.Tensor, final: torch.Tensor, ids: list[int]):
    """Ranks (up to float32 near-ties), top token, probabilities and KL against a reference."""
    logp = torch.log_softmax(logits.double(), -1)
    p_final = torch.softmax(final.double(), -1)
    kl = (p_final * (torch.log_softmax(final.double(), -1) - logp)).sum(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    rows = rows.sort_values("position")
    assert rows["position"].tolist() == list(range(len(ids)))
    own = logits.gather(1, torch.tensor(ids)[:, None])
    low = 1 + (logits > own + 1e-4).sum(-1)
    high = 1 + (logits > own - 1e-4).sum(-1)
    ranks = torch.tensor(rows["input_rank"].to_numpy())
    assert bool(((low <= ranks) & (ranks <= high)).all())
    top = logits.max(-1).values
    chosen = logits.gather(1, torch.tensor(rows["top_token_id"].to_numpy())[:, None])[:, 0]
    assert torch.allclose(chosen, top, atol=1e-4)  # the top token, up to near-ties
    assert np.allclose(rows["kl_final"], kl.numpy(), rtol=1e-4, atol=1e-5)
    assert np.allclose(rows["entropy"], entropy.numpy(), rtol=1e-4, atol=1e-5)
    probs = logp.exp().gather(1, torch.tensor(ids)[:, None])[:, 0].numpy()
    assert np.allclose(rows["input_prob"], probs, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("name", NAMES)
def test_lens_equals_hugging_face_head_on_every_state(name, lens_dirs):
    family = FAMILIES[name]
    model = rt.load_model(str(lens_dirs[name]), device="cpu")
    result = rt.lens(model, TEXTS, mid=not family.parallel, include_special=True)
    hf = _hf(lens_dirs[name], family)
    lens = "mlm" if family.encoder else "logit"
    for text_id, text in enumerate(TEXTS):
        ids = model.encode(text)
        ref = _states(hf, family, ids)
        final = _decode(hf, family, ref["final_norm"], ref["states"][-1])
        # the reference at the last layer is the model's own output
        assert torch.allclose(final, ref["logits"], atol=1e-5, rtol=1e-5)
        table = result.lens[(result.lens["text_id"] == text_id) & (result.lens["lens"] == lens)]
        for site, states in (("post", ref["states"]), ("mid", ref["mids"])):
            if site == "mid" and family.parallel:
                assert not (table["site"] == "mid").any()
                continue
            for layer, state in enumerate(states):
                rows = table[(table["site"] == site) & (table["layer"] == layer)]
                logits = _decode(hf, family, ref["final_norm"], state)
                _check_rows(rows, logits, final, ids)
        post = table[table["site"] == "post"]
        if not family.encoder:  # the next token's rank under the lens at the last layer
            last = post[post["layer"] == model.n_blocks].sort_values("position")
            nxt = torch.tensor(ids[1:])
            own = final[:-1].gather(1, nxt[:, None])
            expect = 1 + (final[:-1] > own).sum(-1)
            got = last["next_rank"].to_numpy()
            assert pd.isna(got[-1]) and np.array_equal(got[:-1].astype(int), expect.numpy())
        else:
            assert post["next_rank"].isna().all() and post["next_prob"].isna().all()


def test_logit_lens_at_the_top_is_the_models_output(lens_dirs):
    from residual_trace.models.readout import readout

    model = rt.load_model(str(lens_dirs["gemma2"]), device="cpu")  # soft-capped logits
    ids = model.encode(TEXTS[1])
    batch = torch.tensor([ids])
    top = model.capture(batch, torch.ones_like(batch)).resid[-1, 0]
    with torch.no_grad():
        out = model.bridge.original_model(batch).logits[0].float()
    assert torch.equal(readout(model, "logit")(top), out)
    assert model.bridge.original_model.config.final_logit_softcapping  # the cap is exercised


def test_summary_against_the_table_and_its_nulls(lens_dirs):
    model = rt.load_model(str(lens_dirs["llama"]), device="cpu")
    result = rt.lens(model, TEXTS)
    table, summary = result.lens, result.summary
    rows = table[~table["is_special"]]
    for layer in (0, model.n_blocks):
        at = rows[rows["layer"] == layer]
        row = summary[(summary["layer"] == layer) & (summary["site"] == "post")].iloc[0]
        assert row["n_tokens"] == len(at)
        assert row["identifiable"] == pytest.approx((at["input_rank"] == 1).mean())
        with_next = at[at["next_rank"].notna()]
        assert row["next_top1"] == pytest.approx((with_next["next_rank"] == 1).mean())
        assert row["kl_final"] == pytest.approx(at["kl_final"].mean())
        inside = row["kl_final_lo"] <= row["kl_final"] <= row["kl_final_hi"]
        assert inside or layer == model.n_blocks
    # the nulls by hand: the texts' token counts smoothed by 0.5, and the most frequent
    # next token
    from residual_trace.models.readout import readout

    ids = [model.encode(t) for t in TEXTS]
    counts = np.full(model.d_vocab, 0.5)
    for text in ids:
        for i in text:
            counts[i] += 1
    log_u = np.log(counts / counts.sum())
    kls, next_ids = [], []
    for text in ids:
        batch = torch.tensor([text])
        top = model.capture(batch, torch.ones_like(batch)).resid[-1, 0]
        logp = torch.log_softmax(readout(model, "logit")(top).double(), -1).numpy()
        kl = (np.exp(logp) * (logp - log_u)).sum(-1)
        kls += [kl[k] for k, i in enumerate(text) if i not in model.special_ids]
        next_ids += [text[k + 1] for k in range(len(text) - 1) if text[k] not in model.special_ids]
    flat = [i for text in ids for i in text[1:]]
    mode = max(set(flat), key=flat.count)
    row = summary[(summary["layer"] == 0) & (summary["site"] == "post")].iloc[0]
    assert row["kl_unigram"] == pytest.approx(np.mean(kls), rel=1e-5)
    assert row["next_top1_null"] == pytest.approx(np.mean(np.array(next_ids) == mode))


def test_minilm_has_no_trained_head_and_is_refused():
    with pytest.raises(UserError, match="no trained output head"):
        rt.lens("minilm", ["The cat sat."])
    with pytest.raises(UserError, match="encoder"):
        rt.lens("minilm", ["The cat sat."], lenses=("logit",))


def test_mid_is_refused_for_parallel_blocks(lens_dirs):
    model = rt.load_model(str(lens_dirs["pythia"]), device="cpu")
    with pytest.raises(UserError, match="parallel"):
        rt.lens(model, TEXTS, mid=True)


# -- the tuned lens and its format --------------------------------------------------------


def _write_as_tuned_lens_does(folder: Path, n_blocks: int, d_model: int, seed: int) -> dict:
    """A lens folder written the way tuned_lens.nn.lenses.TunedLens.save writes one.

    A ``torch.nn.ModuleList`` of ``torch.nn.Linear`` translators, its ``state_dict`` saved to
    ``params.pt``, and the ``TunedLensConfig`` fields as ``config.json``.
    """
    torch.manual_seed(seed)
    translators = torch.nn.ModuleList(
        [torch.nn.Linear(d_model, d_model, bias=True) for _ in range(n_blocks)]
    )
    with torch.no_grad():
        for linear in translators:
            linear.weight.mul_(0.1)
    folder.mkdir(parents=True)
    torch.save(translators.state_dict(), folder / "params.pt")
    config = {
        "base_model_name_or_path": "tiny",
        "d_model": d_model,
        "num_hidden_layers": n_blocks,
        "bias": True,
        "base_model_revision": None,
        "unembed_hash": None,
        "lens_type": "linear_tuned_lens",
    }
    (folder / "config.json").write_text(json.dumps(config))
    return {"translators": translators, "config": config}


def test_tuned_lens_from_tuned_lens_format_equals_a_direct_computation(lens_dirs, tmp_path):
    from residual_trace.models.readout import readout

    model = rt.load_model(str(lens_dirs["llama"]), device="cpu")
    written = _write_as_tuned_lens_does(tmp_path / "lens", model.n_blocks, model.d_model, 3)
    result = rt.lens(model, TEXTS[:1], tuned_lens=tmp_path / "lens")
    assert set(result.lens["lens"]) == {"logit", "tuned"}
    ids = model.encode(TEXTS[0])
    batch = torch.tensor([ids])
    resid = model.capture(batch, torch.ones_like(batch)).resid[:, 0]
    head = readout(model, "logit")
    final = head(resid[-1])
    tuned = result.lens[result.lens["lens"] == "tuned"]
    for layer in range(model.n_blocks + 1):
        h = resid[layer]
        if layer < model.n_blocks:
            with torch.no_grad():
                h = h + written["translators"][layer](h)  # tuned-lens's transform_hidden
        rows = tuned[tuned["layer"] == layer]
        _check_rows(rows, head(h), final, ids)


def test_tuned_lens_at_identity_is_the_logit_lens(lens_dirs, tmp_path):
    from residual_trace.tracer.tuned_lens import TunedLens, save_tuned_lens

    model = rt.load_model(str(lens_dirs["qwen2"]), device="cpu")
    save_tuned_lens(TunedLens.identity(model.n_blocks, model.d_model, {
        "base_model_name_or_path": "tiny", "d_model": model.d_model,
        "num_hidden_layers": model.n_blocks, "bias": True, "lens_type": "linear_tuned_lens",
    }), tmp_path / "identity")  # fmt: skip
    table = rt.lens(model, TEXTS, tuned_lens=tmp_path / "identity").lens
    logit = table[table["lens"] == "logit"].reset_index(drop=True)
    tuned = table[table["lens"] == "tuned"].reset_index(drop=True)
    columns = ["input_rank", "top_token_id", "kl_final", "entropy", "top_prob"]
    pd.testing.assert_frame_equal(logit[columns], tuned[columns])


def test_our_lens_loads_as_tuned_lens_loads_it(lens_dirs, tmp_path):
    """What ``save_tuned_lens`` writes, read back the way tuned-lens reads a lens folder."""
    from residual_trace.tracer.tuned_lens import TunedLens, lens_config, save_tuned_lens

    model = rt.load_model(str(lens_dirs["llama"]), device="cpu")
    weight = model.bridge.original_model.get_output_embeddings().weight
    config = lens_config("tiny-llama", model.n_blocks, model.d_model, weight, None)
    lens = TunedLens(
        weight=torch.randn(model.n_blocks, model.d_model, model.d_model) * 0.1,
        bias=torch.randn(model.n_blocks, model.d_model),
        config=config,
    )
    save_tuned_lens(lens, tmp_path / "ours")
    # tuned_lens.nn.lenses.TunedLens.from_unembed_and_pretrained: config, then
    # layer_translators.load_state_dict(th.load(params.pt))
    read = json.loads((tmp_path / "ours" / "config.json").read_text())
    fields = {"base_model_name_or_path", "d_model", "num_hidden_layers", "bias",
              "base_model_revision", "unembed_hash", "lens_type"}  # fmt: skip
    assert set(read) == fields and read["lens_type"] == "linear_tuned_lens"
    width = read["d_model"]
    linears = [
        torch.nn.Linear(width, width, bias=read["bias"]) for _ in range(read["num_hidden_layers"])
    ]
    translators = torch.nn.ModuleList(linears)
    translators.load_state_dict(torch.load(tmp_path / "ours" / "params.pt"))  # strict
    h = torch.randn(5, model.d_model)
    with torch.no_grad():
        for layer in range(model.n_blocks):
            theirs = h + translators[layer](h)
            assert torch.allclose(theirs, lens.translate(h, layer), atol=1e-5)
    # tuned-lens's unembed hash: sha256 of numpy's array_str at precision 1
    import hashlib

    array = weight.detach().float().numpy()
    expected = hashlib.sha256(str.encode(np.array_str(array, precision=1))).hexdigest()
    assert read["unembed_hash"] == expected


def test_bad_tuned_lens_folders_are_one_line_errors(lens_dirs, tmp_path):
    with pytest.raises(UserError, match="tuned needs --tuned-lens"):
        rt.lens("minilm", ["x"], lenses=("tuned",))
    with pytest.raises(UserError, match="not a folder"):
        rt.lens("minilm", ["x"], tuned_lens=tmp_path / "missing")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    with pytest.raises(UserError, match=r"no params\.pt"):
        rt.lens("minilm", ["x"], tuned_lens=tmp_path / "half")
    model = rt.load_model(str(lens_dirs["llama"]), device="cpu")
    _write_as_tuned_lens_does(tmp_path / "deep", model.n_blocks + 1, model.d_model, 0)
    with pytest.raises(UserError, match="trained for 3 layers"):
        rt.lens(model, TEXTS, tuned_lens=tmp_path / "deep")


def test_chunking_and_batching_change_nothing(lens_dirs):
    from residual_trace.tracer.chunking import budget_override

    model = rt.load_model(str(lens_dirs["gpt2"]), device="cpu")
    texts = [*TEXTS, "Yes."]
    whole = rt.lens(model, texts, mid=True, batch_size=8).lens
    with budget_override(1 << 16):  # a few positions per vocabulary chunk
        chunked = rt.lens(model, texts, mid=True, batch_size=1).lens
    # a batch's padding changes float32 rounding in the forward pass (1e-6), nothing else
    pd.testing.assert_frame_equal(whole, chunked, check_exact=False, rtol=1e-4, atol=1e-6)
    for column in ("top_token_id", "input_rank", "next_rank", "position", "layer"):
        assert whole[column].equals(chunked[column])


def test_the_geometric_answer_is_trace_layers_identifiable(lens_dirs):
    model = rt.load_model(str(lens_dirs["gpt2"]), device="cpu")
    summary = rt.lens(model, TEXTS, mid=True).summary
    layers = rt.layers(model, TEXTS).summary.set_index("layer")["identifiable"]
    post = summary[summary["site"] == "post"].set_index("layer")["nn_identifiable"]
    assert np.allclose(post.sort_index().to_numpy(), layers.sort_index().to_numpy())
    assert summary[summary["site"] == "mid"]["nn_identifiable"].isna().all()
    plain = rt.lens(model, TEXTS, geometry=False).summary
    assert plain["nn_identifiable"].isna().all()


def test_half_precision_reads_the_models_own_half_precision_output(lens_dirs):
    """In bfloat16 the weights and the forward run in bfloat16; the lens at the top is still
    the model's own output, and the middle layers stay close to the float32 reading."""
    from residual_trace.models.readout import readout

    half = rt.load_model(str(lens_dirs["llama"]), device="cpu", dtype="bfloat16")
    full = rt.load_model(str(lens_dirs["llama"]), device="cpu")
    ids = half.encode(TEXTS[0])
    batch = torch.tensor([ids])
    top = half.capture(batch, torch.ones_like(batch)).resid[-1, 0]
    with torch.no_grad():
        out = half.bridge.original_model(batch).logits[0].float()
    assert torch.equal(readout(half, "logit")(top), out)
    a = rt.lens(half, TEXTS, geometry=False).lens
    b = rt.lens(full, TEXTS, geometry=False).lens
    assert np.isfinite(a["kl_final"]).all()
    assert np.allclose(a["entropy"], b["entropy"], atol=0.05, rtol=0.05)


def test_the_tuned_lens_package_reads_our_lens_and_we_read_its(lens_dirs, tmp_path, monkeypatch):
    """Both directions against tuned-lens 0.2.0 itself (installed without its dependencies).

    tuned-lens 0.2.0 checks for TransformerLens 3's ``HookedTransformer``, which
    TransformerLens 4 removed: the check is turned off, nothing else is patched.
    """
    import tuned_lens.model_surgery as surgery
    from transformers import AutoModelForCausalLM
    from tuned_lens.nn.lenses import TunedLens as TheirLens

    monkeypatch.setattr(surgery, "_transformer_lens_available", False)
    model = rt.load_model(str(lens_dirs["llama"]), device="cpu")
    hf = AutoModelForCausalLM.from_pretrained(lens_dirs["llama"]).eval()
    rt.train_lens(model, TEXTS, steps=2, tokens_per_step=16).save(tmp_path / "ours")
    read_ours = TheirLens.from_model_and_pretrained(hf, str(tmp_path / "ours"))
    written = TheirLens.from_model(hf)
    with torch.no_grad():
        for translator in written.layer_translators:
            translator.weight.normal_(0, 0.05)
            translator.bias.normal_(0, 0.1)
    written.save(tmp_path / "theirs")
    for folder, theirs in (("ours", read_ours), ("theirs", written)):
        table = rt.lens(model, TEXTS, tuned_lens=tmp_path / folder, include_special=True).lens
        tuned = table[table["lens"] == "tuned"]
        for text_id, text in enumerate(TEXTS):
            with torch.no_grad():
                hidden = hf(torch.tensor([model.encode(text)]), output_hidden_states=True)
            for layer in range(model.n_blocks):
                with torch.no_grad():
                    logits = theirs.forward(hidden.hidden_states[layer][0], layer).float()
                rows = tuned[(tuned["text_id"] == text_id) & (tuned["layer"] == layer)]
                rows = rows.sort_values("position")
                probs = torch.softmax(logits, -1).max(-1).values.numpy()
                assert np.allclose(rows["top_prob"], probs, rtol=1e-4, atol=1e-6), folder
