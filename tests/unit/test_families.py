"""Conformance matrix: one tiny seeded checkpoint per architecture family, every verb run on
it, the numbers checked against Hugging Face on the same weights.

The references below use only Hugging Face modules (found through the paths in
``tests/families.py``) and float64 NumPy: no residual-trace or TransformerLens code. Adding a
family is one row in ``tests/families.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import residual_trace as rt
from tests.families import FAMILIES, Family, save_family
from tests.unit.test_api import WORDS

TEXTS = ["The cat sat on the mat.", "Rain fell on the old town and the river rose."]
NAMES = list(FAMILIES)

#: Families where a structural fact changes the mixing measure, with the HF names of the
#: value and output projections inside the attention module: parallel blocks (phi, gptj),
#: a norm after the sublayer (gemma2, gemma3, olmo2), grouped-query attention (the rest).
MIXING = {
    "llama": ("v_proj", "o_proj"),
    "mistral": ("v_proj", "o_proj"),
    "qwen2": ("v_proj", "o_proj"),
    "qwen3": ("v_proj", "o_proj"),
    "gemma2": ("v_proj", "o_proj"),
    "gemma3": ("v_proj", "o_proj"),
    "olmo2": ("v_proj", "o_proj"),
    "phi": ("v_proj", "dense"),
    "gptj": ("v_proj", "out_proj"),
}


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {name: save_family(root, name) for name in NAMES}


_MODELS: dict[str, Any] = {}


@pytest.fixture
def family_model(family_dirs: dict[str, Path], request: pytest.FixtureRequest) -> Any:
    name = request.node.callspec.params["name"]
    if name not in _MODELS:
        _MODELS[name] = rt.load_model(str(family_dirs[name]), device="cpu")
    return _MODELS[name]


# -- an independent Hugging Face reference ------------------------------------------------


def _hf(directory: Path, family: Family) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    loader = AutoModelForMaskedLM if family.encoder else AutoModelForCausalLM
    return loader.from_pretrained(directory, attn_implementation="eager").eval()


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


class Recorder:
    """Forward hooks on Hugging Face modules, keeping inputs and outputs per call."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.inputs: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        self.handles: list[Any] = []

    def watch(self, path: str) -> None:
        module = self.model.get_submodule(path)

        def hook(module: Any, args: tuple, kwargs: dict, output: Any) -> None:
            given = args[0] if args else kwargs.get("hidden_states")
            self.inputs[path] = given.detach().double()
            self.outputs[path] = _first(output).detach().double()

        self.handles.append(module.register_forward_hook(hook, with_kwargs=True))

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def _norm_modules(model: torch.nn.Module) -> list[str]:
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.LayerNorm) or "Norm" in type(module).__name__
    ]


def hf_reference(model: torch.nn.Module, family: Family, ids: list[int]) -> dict[str, Any]:
    """States of every layer (block inputs, then the last block's raw output), attentions,
    the sublayer modules' outputs, and every norm module's input and output."""
    n_blocks = len(model.get_submodule(family.block.split(".{block}")[0]))
    recorder = Recorder(model)
    paths = [family.block, family.attn_raw, family.mlp_raw, family.attn_after, family.mlp_after]
    for block in range(n_blocks):
        for path in paths:
            if path is not None:
                recorder.watch(path.format(block=block))
    for name in _norm_modules(model):
        if name not in recorder.inputs:
            recorder.watch(name)
    with torch.no_grad():
        out = model(torch.tensor([ids]), output_attentions=True, output_hidden_states=True)
    recorder.close()
    blocks = [family.block.format(block=b) for b in range(n_blocks)]
    states = [recorder.inputs[b][0] for b in blocks] + [recorder.outputs[blocks[-1]][0]]
    return {
        "states": states,
        "attentions": [a[0].double() for a in out.attentions],
        "hidden_states": [h[0].double() for h in out.hidden_states],
        "recorder": recorder,
        "n_blocks": n_blocks,
    }


def _get(recorder: Recorder, path: str, n: int, kind: str = "out") -> torch.Tensor:
    store = recorder.outputs if kind == "out" else recorder.inputs
    return store[path].reshape(n, -1)  # OPT's fc2 runs on (batch * pos, d)


def _reader_norm(model: torch.nn.Module, ref: dict[str, Any], layer: int) -> Any:
    """The first norm module that reads residual layer ``layer`` (its input equals the
    state), or None: found by comparing tensors, not by name."""
    state = ref["states"][layer]
    recorder: Recorder = ref["recorder"]
    for name in _norm_modules(model):
        given = recorder.inputs.get(name)
        if (
            given is not None
            and given.numel() == state.numel()
            and torch.allclose(given.reshape(state.shape), state, rtol=0, atol=1e-6)
        ):
            return model.get_submodule(name)
    return None


def _cos(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1)).clamp_min(1e-300)


def _normed(norm: Any, x: torch.Tensor) -> torch.Tensor:
    """What the norm makes of x without its bias: gain * c(x) / s (x float64)."""
    param = next(norm.parameters())
    with torch.no_grad():
        out = _first(norm(x[None].to(param.dtype))).double()[0]
        zero = _first(norm(torch.zeros_like(x[None]).to(param.dtype))).double()[0]
    return out - zero


# -- the matrix ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_structure_is_derived(name, family_model):
    family, spec = FAMILIES[name], family_model.spec
    assert spec.family == ("encoder" if family.encoder else "decoder")
    assert spec.norm_placement == family.norm_site
    assert spec.parallel == family.parallel
    assert spec.model_type == family.model_type


@pytest.mark.parametrize("name", NAMES)
def test_states_patterns_and_drift_match_hugging_face(name, family_model, family_dirs):
    family, model = FAMILIES[name], family_model
    hf = _hf(family_dirs[name], family)
    W_E = hf.get_input_embeddings().weight.detach().double()
    drift = rt.layers(model, TEXTS, quiet=True).tables["drift"]
    for text_id, text in enumerate(TEXTS):
        ids = model.encode(text)
        ref = hf_reference(hf, family, ids)
        batch = torch.tensor([ids])
        captured = model.capture(batch, torch.ones_like(batch), patterns=True)
        assert captured.patterns is not None
        rows = drift[drift["text_id"] == text_id]
        e = W_E[ids]
        for layer, state in enumerate(ref["states"]):
            ours = captured.resid[layer, 0].double()
            error = float((ours - state).norm() / state.norm())
            assert error < 1e-4, f"{name} layer {layer}: relative error {error:.1e}"
            if layer < len(ref["states"]) - 1:  # HF's last hidden state follows the final norm
                hidden = ref["hidden_states"][layer]
                assert float((ours - hidden).norm() / hidden.norm()) < 1e-4
            at = rows[rows["layer"] == layer].sort_values("position")
            np.testing.assert_allclose(at["cos_input"], _cos(state, e), atol=1e-4)
            np.testing.assert_allclose(at["cos_layer0"], _cos(state, ref["states"][0]), atol=1e-4)
            norm = _reader_norm(hf, ref, layer)
            assert (norm is None) == (model.spec.reader_norm(layer, model.n_blocks) is None)
            expected = (
                _cos(state, e) if norm is None else _cos(_normed(norm, state), _normed(norm, e))
            )
            np.testing.assert_allclose(at["cos_input_normed"], expected, atol=1e-4)
        for block, attention in enumerate(ref["attentions"]):
            ours = captured.patterns[block, 0].double()
            np.testing.assert_allclose(ours.numpy(), attention.numpy(), atol=1e-5)


def _carry(norm: torch.nn.Module, part: torch.Tensor, given: torch.Tensor) -> torch.Tensor:
    """A LayerNorm's share of ``part`` when its input was ``given``: gamma * c(part) / s."""
    eps = float(getattr(norm, "eps", 1e-12))
    s = (given.var(-1, unbiased=False, keepdim=True) + eps).sqrt()
    return norm.weight.detach().double() * (part - part.mean(-1, keepdim=True)) / s


@pytest.mark.parametrize("name", NAMES)
def test_decomposition_parts_match_hugging_face(name, family_model, family_dirs):
    family, model = FAMILIES[name], family_model
    hf = _hf(family_dirs[name], family)
    W_E = hf.get_input_embeddings().weight.detach().double()
    result = rt.decompose(model, TEXTS, per_head=True, quiet=True)
    table, heads = result.tables["decompose"], result.tables["heads"]
    assert float(table["recon_error"].max()) < 1e-4
    for text_id, text in enumerate(TEXTS):
        ids = model.encode(text)
        n = len(ids)
        ref = hf_reference(hf, family, ids)
        rec: Recorder = ref["recorder"]
        unit = W_E[ids] / W_E[ids].norm(dim=-1, keepdim=True)
        for block in range(ref["n_blocks"]):
            x = ref["states"][block]
            a_raw = _get(rec, family.attn_raw.format(block=block), n)
            m_raw = _get(rec, family.mlp_raw.format(block=block), n)
            if family.norm_site == "pre":
                attn, mlp, delta = a_raw, m_raw, a_raw
            elif family.norm_site in ("sandwich", "output"):
                assert family.attn_after is not None and family.mlp_after is not None
                attn = _get(rec, family.attn_after.format(block=block), n)
                mlp = _get(rec, family.mlp_after.format(block=block), n)
                delta = attn
            else:  # post-LN: carry each part through LN1 and LN2 with their own divisors
                assert family.attn_after is not None and family.mlp_after is not None
                ln1 = hf.get_submodule(family.attn_after.format(block=block))
                ln2 = hf.get_submodule(family.mlp_after.format(block=block))
                u = _get(rec, family.attn_after.format(block=block), n, "in")
                w = _get(rec, family.mlp_after.format(block=block), n, "in")
                attn = _carry(ln2, _carry(ln1, a_raw, u), w)
                mlp = _carry(ln2, m_raw, w)
                delta = a_raw
            rows = table[(table["text_id"] == text_id) & (table["block"] == block)]
            rows = rows.sort_values("position")
            scale = float(x.norm(dim=-1).max())
            for column, expected in (
                ("proj_attn", (attn * unit).sum(-1)),
                ("proj_mlp", (mlp * unit).sum(-1)),
                ("attn_norm_rel", delta.norm(dim=-1) / x.norm(dim=-1)),
            ):
                np.testing.assert_allclose(
                    rows[column], expected, atol=1e-4 * max(scale, 1.0), err_msg=column
                )
            per_head = heads[(heads["text_id"] == text_id) & (heads["block"] == block)]
            summed = per_head.groupby("position")["proj_head"].sum().sort_index()
            np.testing.assert_allclose(summed, rows["proj_attn"], atol=1e-4 * max(scale, 1.0))


@pytest.mark.parametrize("name", list(MIXING))
def test_mixing_matches_an_independent_reference(name, family_model, family_dirs):
    """F_i(x_j) = sum_h A_h[i, j] v_h(x_j) W_O[h] from the HF value and output projections
    (kv heads shared by query-head groups); Kobayashi's ratios with the context summed as a
    vector; AttnResLn-N carries the terms through the norm on the attention output where
    there is one (gain * F / s_i, with Gemma's gain 1 + w) and the residual joins uncarried."""
    family, model = FAMILIES[name], family_model
    hf = _hf(family_dirs[name], family)
    v_name, o_name = MIXING[name]
    mixing = rt.decompose(model, TEXTS, quiet=True).tables["mixing"]
    n_heads = model.n_heads
    for text_id, text in enumerate(TEXTS):
        ids = model.encode(text)
        n = len(ids)
        ref = hf_reference(hf, family, ids)
        alti_rollout = globenc_rollout = torch.eye(n, dtype=torch.float64)
        for block in range(ref["n_blocks"]):
            attn_path = family.attn_raw.format(block=block)
            recorder = Recorder(hf)
            recorder.watch(f"{attn_path}.{v_name}")
            with torch.no_grad():
                hf(torch.tensor([ids]))
            recorder.close()
            values = recorder.outputs[f"{attn_path}.{v_name}"][0]  # [n, kv * d_head]
            W_O = hf.get_submodule(f"{attn_path}.{o_name}").weight.detach().double()
            d_head = W_O.shape[1] // n_heads
            kv = values.shape[-1] // d_head
            A = ref["attentions"][block]  # [head, i, j]
            F = torch.zeros(n, n, W_O.shape[0], dtype=torch.float64)
            for h in range(n_heads):
                v = values[:, (h // (n_heads // kv)) * d_head : (h // (n_heads // kv) + 1) * d_head]
                f = v @ W_O[:, h * d_head : (h + 1) * d_head].T  # [j, d_model]
                F += A[h][:, :, None] * f[None]
            eye = torch.eye(n, dtype=torch.bool)
            x = ref["states"][block]

            def ratio(
                terms: torch.Tensor, residual: torch.Tensor, eye: torch.Tensor = eye, n: int = n
            ) -> np.ndarray:
                # Kobayashi: |sum_{j != i} t_ij| / (|sum_{j != i} t_ij| + |t_ii + residual|)
                context = terms.masked_fill(eye[:, :, None], 0).sum(1).norm(dim=-1)
                own = (terms[torch.arange(n), torch.arange(n)] + residual).norm(dim=-1)
                return (context / (context + own)).numpy()

            rows = mixing[(mixing["text_id"] == text_id) & (mixing["block"] == block)]
            rows = rows.sort_values("position")
            np.testing.assert_allclose(rows["mix_attn_n"], ratio(F, 0 * x), atol=1e-4)
            np.testing.assert_allclose(rows["mix_attnres_n"], ratio(F, x), atol=1e-4)
            if family.attn_after is not None:
                norm = hf.get_submodule(family.attn_after.format(block=block))
                weight = norm.weight.detach().double()
                gain = 1.0 + weight if name.startswith("gemma") else weight
                eps = float(getattr(norm, "eps", getattr(norm, "variance_epsilon", 1e-6)))
                raw = _get(ref["recorder"], attn_path, n)
                s = (raw.pow(2).mean(-1, keepdim=True) + eps).sqrt()
                normed = gain * F / s[:, None]  # the residual bypasses this norm
                np.testing.assert_allclose(rows["mix_attnresln_n"], ratio(normed, x), atol=1e-4)
                T = normed.clone()
                y = x + gain * raw / s  # the stream after the normed attention output
            else:
                assert rows["mix_attnresln_n"].isna().all()  # pre-norm: no norm after the sum
                T = F.clone()
                y = x + _get(ref["recorder"], attn_path, n)  # the attention module's output
            # ALTI and GlobEnc: the residual joins the token's own term; no family here has
            # a norm after a residual sum, so GlobEnc's N_ij is |T_i(x_j)|
            T[torch.arange(n), torch.arange(n)] += x
            c = (y.abs().sum(-1)[:, None] - (y[:, None, :] - T).abs().sum(-1)).clamp_min(0)
            alti_rollout = (c / c.sum(-1, keepdim=True)) @ alti_rollout
            globenc_rollout = T.norm(dim=-1) @ globenc_rollout
            for column, R in (("mix_alti", alti_rollout), ("mix_globenc", globenc_rollout)):
                expected = 1.0 - R.diagonal() / R.sum(-1)
                np.testing.assert_allclose(rows[column], expected, atol=1e-4, err_msg=column)


def _structure_reference(attention: np.ndarray, special: np.ndarray) -> dict[str, np.ndarray]:
    """Per-head means over the non-special query rows of one text's HF attention [h, n, n]:
    entropy (bits), own-position, previous-position and special-token mass."""
    n = attention.shape[-1]
    rows = ~special
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = np.where(attention > 0, np.log2(attention), 0.0)
    entropy = -(attention * logs).sum(-1)
    previous = np.zeros(attention.shape[:2])
    previous[:, 1:] = attention[:, np.arange(1, n), np.arange(n - 1)]
    has_previous = rows.copy()
    has_previous[0] = False
    return {
        "entropy": entropy[:, rows].mean(-1),
        "diag_mass": np.diagonal(attention, axis1=1, axis2=2)[:, rows].mean(-1),
        "prev_mass": previous[:, has_previous].mean(-1),
        "special_mass": attention[:, :, special].sum(-1)[:, rows].mean(-1),
    }


@pytest.mark.parametrize("name", NAMES)
def test_every_verb_runs(name, family_model, family_dirs, tmp_path):
    from transformers import AutoTokenizer

    model = family_model
    perturb = rt.perturb(model, TEXTS, mode="shuffle", samples=1, quiet=True)
    assert sorted(perturb.tables["summary"]["block"].unique()) == list(range(model.n_blocks))
    heads = perturb.tables["heads"]
    assert heads["head_name"].str.fullmatch(r"L\d+H\d+").all()
    # perturb's structure measures of the original patterns, against HF's attentions
    family = FAMILIES[name]
    hf = _hf(family_dirs[name], family)
    specials = set(AutoTokenizer.from_pretrained(family_dirs[name]).all_special_ids)
    per_text = []
    for text in TEXTS:
        ids = model.encode(text)
        with torch.no_grad():
            attentions = hf(torch.tensor([ids]), output_attentions=True).attentions
        special = np.array([i in specials for i in ids])
        per_text.append([_structure_reference(a[0].double().numpy(), special) for a in attentions])
    assert set(heads["n_texts"]) == {len(TEXTS)}
    for (kind, block), rows in heads.groupby(["perturbation", "block"]):
        rows = rows.sort_values("head")
        for column in ("entropy", "diag_mass", "prev_mass", "special_mass"):
            expected = np.mean([text[block][column] for text in per_text], axis=0)
            np.testing.assert_allclose(
                rows[column], expected, atol=1e-4, err_msg=f"{kind} {column}"
            )
    norms = tmp_path / "norms.csv"
    rng = np.random.default_rng(0)
    lines = ["word,A,B"] + [f"{w},{rng.uniform(0, 5):.3f},{rng.uniform(0, 5):.3f}" for w in WORDS]
    norms.write_text("\n".join(lines) + "\n")
    probe = rt.probe(
        model,
        norms=f"wide:{norms}",
        layers=(0, model.n_blocks),
        mappers=("ridge",),
        folds=2,
        conditions=("system", "random-init"),
        use_cache=False,
        quiet=True,
    )
    assert np.isfinite(probe.tables["scores"]["value"]).all()
    assert set(probe.tables["scores"]["condition"]) == {"system", "random-init"}
    record = rt.layers(model, TEXTS, quiet=True).run_record([], "png")["model"]
    assert record["norm_placement"] == FAMILIES[name].norm_site
    assert record["parallel_sublayers"] == FAMILIES[name].parallel
    assert record["dtype"] == "float32"


def test_report_compares_families_of_every_structure(family_dirs, tmp_path):
    """One report over a parallel (pythia), a sandwich (gemma2), an output-norm (olmo2) and a
    post-LN (roberta) model: every part runs, and the document names each model."""
    from residual_trace.experiments.report import ReportOptions, run_report

    chosen = ["pythia", "gemma2", "olmo2", "roberta"]
    models = {}
    for name in chosen:
        if name not in _MODELS:
            _MODELS[name] = rt.load_model(str(family_dirs[name]), device="cpu")
        models[str(family_dirs[name])] = _MODELS[name]
    options = ReportOptions(
        models=list(models),
        max_texts=4,
        perturb_samples=1,
        probe_max_concepts=30,
        probe_folds=2,
        probe_mappers=["ridge"],
        device="cpu",
    )
    result = run_report(options, warn=lambda m: None, models=models)
    assert len(result.parts) == 4 * len(options.experiments)
    assert all(part.ran for part in result.parts)
    result.save(tmp_path / "report")
    html = (tmp_path / "report" / "report.html").read_text()
    for name in chosen:
        assert f"tiny-{name}" in html


def _save_other(root: Path, name: str) -> Path:
    """Architectures outside the matrix, built the same way (seeded, tiny, BPE tokenizer)."""
    import transformers

    from tests.helpers import tiny_bpe_tokenizer

    configs: dict[str, tuple[str, str, dict[str, Any]]] = {
        "falcon": ("FalconConfig", "FalconForCausalLM", {"parallel_attn": True}),
        "mixtral": (
            "MixtralConfig",
            "MixtralForCausalLM",
            {"num_key_value_heads": 2, "num_local_experts": 4, "num_experts_per_tok": 2},
        ),
        "t5": (
            "T5Config",
            "T5ForConditionalGeneration",
            {"d_model": 64, "d_ff": 128, "num_layers": 2, "num_heads": 4, "d_kv": 16},
        ),
    }
    config_name, model_name, extra = configs[name]
    target = root / f"other-{name}"
    target.mkdir()
    vocab = tiny_bpe_tokenizer(target)
    torch.manual_seed(3)
    config = getattr(transformers, config_name)(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        **extra,
    )
    getattr(transformers, model_name)(config).save_pretrained(target)
    return target


@pytest.mark.parametrize("name", ["falcon", "mixtral"])
def test_an_architecture_outside_the_matrix_works_when_its_structure_holds(name, tmp_path):
    """Falcon (parallel) and Mixtral (mixture of experts) are typed in nowhere: their
    structure is derived, and the states match Hugging Face's."""
    from transformers import AutoModelForCausalLM

    directory = _save_other(tmp_path, name)
    model = rt.load_model(str(directory), device="cpu")
    assert model.spec.parallel == (name == "falcon")
    decomposed = rt.decompose(model, TEXTS, per_head=True, quiet=True)
    assert float(decomposed.tables["decompose"]["recon_error"].max()) < 1e-4
    hf = AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager").eval()
    ids = model.encode(TEXTS[0])
    with torch.no_grad():
        states = hf(torch.tensor([ids]), output_hidden_states=True).hidden_states
    batch = torch.tensor([ids])
    ours = model.capture(batch, torch.ones_like(batch)).resid
    for layer in range(len(states) - 1):  # HF's last entry is after the final norm
        expected = states[layer][0]
        assert float((ours[layer, 0] - expected).norm() / expected.norm()) < 1e-4


def test_an_encoder_decoder_is_refused_in_one_line(tmp_path):
    from click.testing import CliRunner

    from residual_trace.cli import trace

    directory = _save_other(tmp_path, "t5")
    result = CliRunner().invoke(trace, ["layers", "-m", str(directory), "-t", "A cat."])
    assert result.exit_code == 1
    message = result.output.strip()
    assert message.count("\n") == 0 and "Traceback" not in message
    assert "architecture 't5' is not supported: encoder-decoder" in message


@pytest.mark.parametrize("name", list(MIXING))
def test_value_zeroing_matches_brute_force(name, family_model, family_dirs):
    """Value Zeroing against the authors' procedure run on the Hugging Face model: for each
    block and token t, a forward in which that block's value projection outputs zero at t
    (every kv head, bias included), the block module's output against the unmodified one,
    cosine distance, rows normalised; then the rollout S_L ... S_1. Covers norms on the
    sublayer outputs (gemma2/3, olmo2), parallel blocks (phi, gptj) and RMSNorm with
    grouped-query attention (the rest)."""
    family, model = FAMILIES[name], family_model
    hf = _hf(family_dirs[name], family)
    v_name, _ = MIXING[name]
    result = rt.decompose(model, TEXTS, quiet=True)
    mixing, pairs = result.tables["mixing"], result.mixing_text_pairs  # text 0
    ids = model.encode(TEXTS[0])  # the default mixing_text
    n = len(ids)
    rollout = torch.eye(n, dtype=torch.float64)
    n_blocks = len(hf.get_submodule(family.block.split(".{block}")[0]))
    for block in range(n_blocks):
        block_path = family.block.format(block=block)
        value_path = f"{family.attn_raw.format(block=block)}.{v_name}"
        outputs: dict[str, torch.Tensor] = {}

        def keep(module: Any, args: Any, output: Any, outputs: dict = outputs) -> None:
            outputs["zeroed" if "original" in outputs else "original"] = _first(output).double()

        def zero(module: Any, args: Any, output: torch.Tensor, n: int = n) -> torch.Tensor:
            output = output.clone()
            for t in range(n):
                output[t, t] = 0.0
            return output

        handle = hf.get_submodule(block_path).register_forward_hook(keep)
        with torch.no_grad():
            hf(torch.tensor([ids]))
            zero_handle = hf.get_submodule(value_path).register_forward_hook(zero)
            hf(torch.tensor([ids] * n))
        handle.remove()
        zero_handle.remove()
        cos = torch.nn.functional.cosine_similarity(
            outputs["zeroed"], outputs["original"][0][None], dim=-1
        )
        distance = (1.0 - cos).clamp(0.0, 2.0).T  # [i, t]
        expected = distance / distance.sum(-1, keepdim=True)
        got = pairs[pairs["block"] == block].pivot(index="target", columns="source", values="vz")
        np.testing.assert_allclose(got.to_numpy(), expected.numpy(), atol=1e-4)
        rows = mixing[(mixing["text_id"] == 0) & (mixing["block"] == block)]
        rows = rows.sort_values("position")
        np.testing.assert_allclose(rows["mix_vz"], 1.0 - expected.diagonal(), atol=1e-4)
        rollout = expected @ rollout
        mixed = 1.0 - rollout.diagonal() / rollout.sum(-1)
        np.testing.assert_allclose(rows["mix_vz_rollout"], mixed, atol=1e-4)
