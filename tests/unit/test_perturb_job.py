"""``trace perturb`` end to end: constructed models whose answers are known, an independent
reference (Hugging Face attentions and hidden states, SciPy's Jensen-Shannon distance), and
the command line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from scipy.spatial.distance import jensenshannon

from residual_trace import load_model
from residual_trace.cli import trace
from residual_trace.experiments.perturb import PerturbOptions
from residual_trace.tracer.alignment_summary import HEAD_COLUMNS
from residual_trace.tracer.perturb import PERTURBATION_COLUMNS, RESID_COLUMNS
from tests.helpers import tiny_bpe_tokenizer

#: Rotation step of the constructed positional code (radians per position); sequences stay
#: shorter than 2*pi / THETA so no two positions alias.
THETA = 0.35

TEXTS = [
    "The dog chased the cat.",
    "A big dog sat by the door.",
    "My dog likes long walks.",
    "The old dog slept all day.",
    "Her dog ran to the park.",
    "That dog barked at night.",
]


def _constructed_gpt2(root: Path) -> tuple[Path, int]:
    """A one-layer GPT-2 with two heads whose behaviour is known by construction.

    The embedding keeps positions and tokens in separate, zero-mean subspaces (so ln_1 only
    rescales): dims 0-3 hold a rotating position code, dims 32-63 the token. Head 0 rotates
    the query's position code back by one step, so it attends to the previous position
    whatever the tokens are. Head 1 has a constant query and keys that read a dimension only
    the token ' dog' has, so every query attends to wherever ' dog' is. The MLP and the
    attention output are zero.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    target = root / "constructed-gpt2"
    target.mkdir()
    vocab = tiny_bpe_tokenizer(target)
    from transformers import AutoTokenizer

    dog = AutoTokenizer.from_pretrained(target)(" dog")["input_ids"]
    assert len(dog) == 1
    config = GPT2Config(
        vocab_size=vocab,
        n_embd=64,
        n_layer=1,
        n_head=2,
        n_positions=16,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = GPT2LMHeadModel(config).eval()
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for param in model.parameters():
            param.zero_()
        tokens = torch.randn(vocab, 30, generator=generator)
        tokens -= tokens.mean(-1, keepdim=True)
        # every token part has the same norm as dog's (4, -4): ln_1 scales all rows alike
        tokens *= math.sqrt(32.0) / tokens.norm(dim=-1, keepdim=True)
        wte = model.transformer.wte.weight
        wte[:, 34:] = tokens
        wte[dog[0], 34:] = 0.0
        wte[dog[0], 32], wte[dog[0], 33] = 4.0, -4.0
        angles = THETA * torch.arange(16, dtype=torch.float32)
        code = torch.stack([angles.cos(), angles.sin(), -angles.cos(), -angles.sin()], -1)
        model.transformer.wpe.weight[:, :4] = 4.0 * code
        block = model.transformer.h[0]
        block.ln_1.weight.fill_(1.0)
        block.ln_2.weight.fill_(1.0)
        model.transformer.ln_f.weight.fill_(1.0)
        W = block.attn.c_attn.weight  # Conv1D: qkv = x @ W, [d_model, 3 d_model]
        b = block.attn.c_attn.bias
        # head 0 (query dims 0-31, key dims 64-95): q = s R(-theta) p_i, k = p_j
        c, s = math.cos(THETA), math.sin(THETA)
        rotate_back = torch.tensor([[c, -s], [s, c]])  # row vector p @ this = p rotated by -theta
        W[0:2, 0:2] = 60.0 * rotate_back
        W[0:2, 64:66] = torch.eye(2)
        # head 1 (query dims 32-63, key dims 96-127): q = const, k = x[32] - x[33]
        b[32] = 40.0
        W[32, 96], W[33, 96] = 1.0, -1.0
    model.save_pretrained(target)
    return target, int(dog[0])


@pytest.fixture(scope="module")
def constructed(tmp_path_factory):
    directory, dog = _constructed_gpt2(tmp_path_factory.mktemp("constructed"))
    return load_model(str(directory), device="cpu"), dog


def _quiet(message: str) -> None:
    """A ``warn`` that drops the one-line warnings."""


def _heads(result, kind: str) -> pd.DataFrame:
    heads = result.tables["heads"]
    return heads[heads["perturbation"] == kind].set_index(["block", "head"])


def _resid(result, kind: str) -> pd.DataFrame:
    resid = result.tables["resid"]
    return resid[resid["perturbation"] == kind]


def test_constructed_heads_score_their_known_answers(constructed):
    model, _ = constructed
    options = PerturbOptions(mode="shuffle", samples=6, quiet=True)
    result = options.run(model, TEXTS, warn=_quiet)
    heads = _heads(result, "shuffle")
    # the one block is block 0 (TransformerLens naming: heads L0H0, L0H1)
    positional, token = heads.loc[(0, 0)], heads.loc[(0, 1)]
    assert (positional["head_name"], token["head_name"]) == ("L0H0", "L0H1")
    # the construction really gave the intended heads
    assert positional["prev_mass"] > 0.99
    assert positional["follow_index"] == pytest.approx(-1.0, abs=0.02)
    assert positional["follow_index_hi"] < -0.95 and positional["verdict"] == "position"
    assert token["follow_index"] > 0.99 and token["follow_index_lo"] > 0.98
    assert token["sim_token"] > 0.99 and token["verdict"] == "token"
    assert token["verdict"] == "token"
    # unperturbed input scores at the noise floor: both alignments agree, floor is tiny
    # the unperturbed text, re-run in another batch, reproduces the original: the noise
    # floor (how far the index moves when the re-run stands in for the original) is tiny
    rerun = _heads(result, "identity")
    assert (rerun["sim_position"] > 1 - 1e-3).all() and (rerun["follow_index"] == 0).all()
    assert (heads["noise_floor"] < 1e-3).all()


def test_swapping_named_words_moves_only_the_token_head(constructed):
    model, _ = constructed
    notes: list[str] = []
    options = PerturbOptions(swap=("dog", "the"), quiet=True)
    result = options.run(model, [*TEXTS, "No animal here."], warn=notes.append)
    heads = _heads(result, "swap")
    assert heads.loc[(0, 1), "follow_index"] > 0.99
    assert heads.loc[(0, 0), "follow_index"] < -0.95
    # texts without both words (' the' lower-case) are skipped, with a warning naming them
    assert result.skipped == [2, 3, 5, 6]
    assert any("4 text(s) skipped" in n and "2, 3, 5, 6" in n for n in notes)
    assert result.notes == notes  # the result keeps the warnings it gave
    assert (heads["n_texts"] == 3).all()


# -- independent reference -------------------------------------------------------------------


def _reference_alignment(
    original: np.ndarray, perturbed: np.ndarray, perm: np.ndarray, causal: bool
) -> tuple[float, float, float]:
    """Token- and position-aligned similarity, row by row with SciPy (module docstring of
    residual_trace.tracer.alignment: informative rows only, causal keys kept where
    both alignments allow them)."""
    n = len(perm)
    token_sims, position_sims, indices = [], [], []
    for i in range(n):
        keys = [j for j in range(n) if not causal or (j <= i and perm[j] <= perm[i])]
        if len(keys) < 2:
            continue
        ref = original[i, keys]
        tok = perturbed[perm[i], perm[keys]]
        pos = perturbed[i, keys]
        if min(ref.sum(), tok.sum(), pos.sum()) < 0.5:
            continue
        ref, tok, pos = ref / ref.sum(), tok / tok.sum(), pos / pos.sum()
        between = jensenshannon(tok, pos, base=2)
        if between < 0.1:
            continue
        to_token, to_position = jensenshannon(ref, tok, base=2), jensenshannon(ref, pos, base=2)
        token_sims.append(1 - to_token)
        position_sims.append(1 - to_position)
        indices.append((to_position - to_token) / between)
    if not token_sims:
        return math.nan, math.nan, math.nan
    return float(np.mean(token_sims)), float(np.mean(position_sims)), float(np.mean(indices))


def _sharpened(source: Path, target: Path, kind: str) -> Path:
    """The tiny model with its query and key weights scaled up 10x: randomly initialised
    attention is nearly uniform, which gives the alignment nothing to tell apart."""
    import shutil

    from transformers import AutoModel, AutoModelForCausalLM

    shutil.copytree(source, target)
    loader = AutoModel if kind == "bert" else AutoModelForCausalLM
    hf = loader.from_pretrained(source)
    with torch.no_grad():
        if kind == "bert":
            for layer in hf.encoder.layer:
                layer.attention.self.query.weight *= 10.0
                layer.attention.self.key.weight *= 10.0
        else:
            for block in hf.transformer.h:
                block.attn.c_attn.weight[:, : 2 * hf.config.n_embd] *= 10.0
    hf.save_pretrained(target)
    return target


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_swap_matches_hugging_face_and_scipy(kind, tiny_dirs, tmp_path):
    from transformers import AutoModel, AutoModelForCausalLM

    directory = _sharpened(tiny_dirs[kind], tmp_path / f"sharp-{kind}", kind)
    model = load_model(str(directory), device="cpu")
    original_text, swapped_text = "The dog chased the cat.", "The cat chased the dog."
    result = PerturbOptions(swap=("dog", "cat"), quiet=True).run(
        model, [original_text], warn=_quiet
    )
    result.save(tmp_path / kind)  # compare what is written
    table = pd.read_csv(tmp_path / kind / "perturbations.csv")
    table = table[table["perturbation"] == "swap"].set_index(["block", "head"])

    loader = AutoModel if kind == "bert" else AutoModelForCausalLM
    hf = loader.from_pretrained(directory, attn_implementation="eager").eval()
    ids = model.encode(original_text)
    swapped = model.encode(swapped_text)
    tokens = model.token_strings(ids)
    first = next(i for i, t in enumerate(tokens) if "dog" in t)
    second = next(i for i, t in enumerate(tokens) if "cat" in t)
    perm = np.arange(len(ids))
    perm[first], perm[second] = second, first
    assert [swapped[perm[i]] for i in range(len(ids))] == ids  # the swap, built independently
    with torch.no_grad():
        a = hf(torch.tensor([ids]), output_attentions=True, output_hidden_states=True)
        b = hf(torch.tensor([swapped]), output_attentions=True, output_hidden_states=True)
    causal = kind == "gpt2"
    compared = 0
    for block, (att_a, att_b) in enumerate(zip(a.attentions, b.attentions, strict=True)):
        for head in range(model.n_heads):
            sim_token, sim_position, index = _reference_alignment(
                att_a[0, head].double().numpy(), att_b[0, head].double().numpy(), perm, causal
            )
            row = table.loc[(block, head)]  # HF's attentions[b] is block b
            assert row["head_name"] == f"L{block}H{head}"
            assert row["sim_token"] == pytest.approx(sim_token, abs=1e-4, nan_ok=True)
            assert row["sim_position"] == pytest.approx(sim_position, abs=1e-4, nan_ok=True)
            assert row["follow_index"] == pytest.approx(index, abs=1e-3, nan_ok=True)
            compared += int(np.isfinite(index))
    assert compared >= model.n_blocks * model.n_heads // 2  # most heads had evidence
    # the residual stream: cosine to the same token's state (moved) vs the same position's
    resid = _resid(result, "swap").set_index("layer")
    moved = [first, second]
    layers = len(a.hidden_states) - (0 if kind == "bert" else 1)  # HF's last is after ln_f
    for layer in range(layers):
        h, g = a.hidden_states[layer][0].double(), b.hidden_states[layer][0].double()
        cos = torch.nn.functional.cosine_similarity
        token = cos(g[perm[moved]], h[moved], dim=-1).mean().item()
        same = cos(g[moved], h[moved], dim=-1).mean().item()
        assert resid.loc[layer, "cos_token"] == pytest.approx(token, abs=1e-4)
        assert resid.loc[layer, "cos_position"] == pytest.approx(same, abs=1e-4)


def test_llama_states_follow_tokens_exactly_at_the_embeddings(tiny_models):
    """Llama adds no position embedding: layer 0 is the token's row, wherever it goes."""
    options = PerturbOptions(mode="shuffle", samples=3, quiet=True)
    result = options.run(tiny_models["llama"], TEXTS[:3], warn=_quiet)
    resid = _resid(result, "shuffle")
    layer0 = resid[resid["layer"] == 0]
    np.testing.assert_allclose(layer0["cos_token"], 1.0, atol=1e-6)
    assert (layer0["cos_position"] < 0.9).all()


def test_embed_shuffle_keeps_special_rows_and_restores_the_model(tiny_models):
    model = tiny_models["bert"]
    ids = torch.tensor([model.encode(TEXTS[0])])
    before = model.capture(ids, torch.ones_like(ids), patterns=True)
    options = PerturbOptions(mode="embed-shuffle", samples=2, quiet=True)
    result = options.run(model, TEXTS[:3], warn=_quiet)
    after = model.capture(ids, torch.ones_like(ids), patterns=True)
    torch.testing.assert_close(before.resid, after.resid, rtol=0, atol=0)
    heads = _heads(result, "embed-shuffle")
    assert heads["follow_index"].isna().all() and (heads["verdict"] == "n/a").all()
    assert (heads["sim_position"] < 0.999).all() and (heads["sim_position"] > 0).all()
    assert (heads["n_obs"] == 3 * 2).all()
    # the layer-0 states of the content tokens changed completely, the positions did not move
    resid = _resid(result, "embed-shuffle")
    layer0 = resid[resid["layer"] == 0]
    assert layer0["cos_token"].isna().all() and (layer0["cos_position"] < 0.9).all()


def test_random_tokens_keep_positions_and_special_tokens(tiny_models, tmp_path):
    options = PerturbOptions(mode="random-token", samples=3, quiet=True)
    result = options.run(tiny_models["gpt2"], TEXTS[:2], warn=_quiet)
    result.save(tmp_path / "r")
    table = pd.read_csv(tmp_path / "r" / "perturbations.csv")
    assert set(table["perturbation"]) == {"identity", "random-token"}
    assert table.groupby("perturbation")["sample"].max().to_dict() == {
        "identity": 0,
        "random-token": 2,
    }
    heads = _heads(result, "random-token")
    assert heads["follow_index"].isna().all() and heads["sim_position"].between(0, 1).all()


def test_same_seed_same_numbers_other_seed_other_perturbations(tiny_models, tmp_path):
    def run(seed: int, name: str) -> pd.DataFrame:
        options = PerturbOptions(mode="shuffle", samples=3, seed=seed, quiet=True)
        options.run(tiny_models["bert"], TEXTS[:3], warn=_quiet).save(tmp_path / name)
        return pd.read_csv(tmp_path / name / "perturbations.csv")

    first, again, other = run(0, "a"), run(0, "b"), run(1, "c")
    pd.testing.assert_frame_equal(first, again)
    assert not first["label"].equals(other["label"])


# -- command line ----------------------------------------------------------------------------


def _cli(args: list[str]):
    return CliRunner().invoke(trace, args, catch_exceptions=False)


def test_perturb_cli_writes_every_output(tiny_dirs, tmp_path):
    out = tmp_path / "cli"
    result = _cli(
        [
            "perturb",
            "-m",
            str(tiny_dirs["bert"]),
            "--text",
            "The dog chased the cat.",
            "--text",
            "A cat saw a dog.",
            "--swap",
            "dog",
            "cat",
            "--show-head",
            "L1H1",  # block 1 (the second), head 1
            "--out",
            str(out),
        ]
    )
    assert result.exit_code == 0, result.output
    assert "most position-following heads" in result.output
    for name in ("perturbations", "resid", "heads", "summary", "resid_summary"):
        assert (out / f"{name}.csv").is_file()
    for name in ("index_heatmap", "layers", "attention"):
        assert (out / f"{name}.png").stat().st_size > 10_000
    heads = pd.read_csv(out / "heads.csv")
    assert list(heads.columns) == list(HEAD_COLUMNS)
    assert len(heads) == 2 * 2 * 4  # identity + swap, 2 blocks x 4 heads
    assert list(pd.read_csv(out / "perturbations.csv").columns) == list(PERTURBATION_COLUMNS)
    assert list(pd.read_csv(out / "resid.csv").columns) == list(RESID_COLUMNS)
    record = json.loads((out / "run.json").read_text())
    assert record["command"] == "perturb" and record["options"]["swap"] == ["dog", "cat"]
    assert record["options"]["show_heads"] == ["L1H1"]
    assert record["n_perturbations"] == 2
    assert not list(tmp_path.glob(".cli.tmp-*"))


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--mode", "shuffle", "--swap", "a", "b"], "swap (--swap): goes with mode swap"),
        (["--swap", "dog", "dog"], "two different words"),
        (["--swap", "dog", "horse"], "'horse' is not a word of the text"),
        (["--samples", "0"], "samples (--samples): must be between 1 and 100,000, got 0"),
        (["--mode", "shuffle", "--all-pairs"], "all_pairs (--all-pairs): goes with mode swap"),
        (["--show-head", "x"], "expected L<block>H<head>"),
        (["--show-head", "L9H0"], "has blocks 0..1"),
        (["--show-head", "L0H4"], "heads 0..3"),
        (["--show-text", "3"], "only 1 text(s) given"),
        (["--mode", "sideways"], "Invalid value for '--mode'"),
    ],
)
def test_perturb_errors(tiny_dirs, tmp_path, args, fragment):
    out = tmp_path / "bad"
    base = ["perturb", "-m", str(tiny_dirs["bert"]), "-t", "The dog chased the cat.", "-o"]
    result = CliRunner().invoke(trace, [*base, str(out), *args])
    assert result.exit_code != 0
    assert fragment in result.output
    assert "Traceback" not in result.output and not out.exists()


def test_nothing_to_perturb_is_an_error(tiny_dirs, tmp_path):
    result = CliRunner().invoke(
        trace,
        ["perturb", "-m", str(tiny_dirs["bert"]), "-t", "go go go", "-o", str(tmp_path / "n")],
    )
    assert result.exit_code == 1
    assert "no text could be perturbed" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize(
    ("head", "fragment"),
    [
        ("1.2", "expected L<block>H<head>"),  # the old LAYER.HEAD style is refused, not guessed
        ("L9H0", "head L9H0: the model has blocks 0..1 and heads 0..3"),
    ],
)
def test_show_head_errors_are_one_line_and_write_nothing(tiny_dirs, tmp_path, head, fragment):
    out = tmp_path / "bad"
    args = ["perturb", "-m", str(tiny_dirs["bert"]), "-t", "The dog chased the cat."]
    result = CliRunner().invoke(trace, [*args, "--show-head", head, "-o", str(out)])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ")
    assert fragment in lines[0] and head in lines[0]
    assert not out.exists() and not any(tmp_path.iterdir())


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_embed_shuffle_input_is_the_permuted_embedding_matrix_exactly(kind, tiny_models):
    from residual_trace.tracer.perturbations import (
        embed_shuffle,
        embedding_order,
        embedding_rows,
        shuffled_embeddings,
    )

    model = tiny_models[kind]
    keep = sorted(model.special_ids)
    ids = model.encode(TEXTS[0])
    with shuffled_embeddings(model, seed=5, keep=keep):  # the weights really permuted
        tensor = torch.tensor([ids])
        permuted = model.capture(tensor, torch.ones_like(tensor), patterns=True)
    mapped = embed_shuffle(ids, embedding_order(embedding_rows(model), 5, keep))
    assert [i for i, m in zip(ids, mapped.ids, strict=True) if i in model.special_ids] == [
        m for i, m in zip(ids, mapped.ids, strict=True) if i in model.special_ids
    ]
    tensor = torch.tensor([mapped.ids])
    fed = model.capture(tensor, torch.ones_like(tensor), patterns=True)
    torch.testing.assert_close(fed.resid, permuted.resid, rtol=0, atol=0)
    torch.testing.assert_close(fed.patterns, permuted.patterns, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["shuffle", "embed-shuffle", "random-token"])
def test_perturb_tables_do_not_depend_on_how_runs_are_grouped(mode, tiny_models):
    # batch size 1: every perturbed run in its own forward pass beside a fresh re-run of the
    # unperturbed text; batch size 16: all of a text's runs in one forward pass
    model = tiny_models["gpt2"]
    tables = [
        PerturbOptions(mode=mode, samples=3, batch_size=size, quiet=True)
        .run(model, TEXTS[:3], warn=_quiet)
        .tables
        for size in (1, 16)
    ]
    per_text = {"perturbations": model.n_blocks * model.n_heads, "resid": model.n_blocks + 1}
    for key, rows in per_text.items():
        one, many = tables[0][key], tables[1][key]
        keys = [c for c in one.columns if one[c].dtype == object or c in ("sample", "block")]
        pd.testing.assert_frame_equal(one[keys], many[keys])  # same rows, same order
        identity_rows = [(t["perturbation"] == "identity").sum() for t in (one, many)]
        assert identity_rows[0] == identity_rows[1] == 3 * rows  # once per text
        # float32 rounding of other batch shapes; the Jensen-Shannon *distance* is a square
        # root, so near identical rows it turns 1e-9 of divergence into 3e-5
        numeric = one.select_dtypes("number").columns
        np.testing.assert_allclose(one[numeric], many[numeric], atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_attention_figure_shows_the_models_own_patterns(kind, tiny_dirs):
    from transformers import AutoModel

    model = load_model(str(tiny_dirs[kind]), device="cpu")
    heads = ("L0H1", "L1H0")
    result = PerturbOptions(swap=("dog", "cat"), show_heads=heads, show_text=0, quiet=True).run(
        model, [TEXTS[0]], warn=_quiet
    )
    example = result.example
    # the figure draws the heads asked for; the viewer keeps every head's patterns
    assert example is not None and result.shown_heads == [(0, 1), (1, 0)]
    every = [(b, h) for b in range(model.n_blocks) for h in range(model.n_heads)]
    assert sorted(example.original) == every
    hf = AutoModel.from_pretrained(tiny_dirs[kind], attn_implementation="eager").eval()
    swapped = TEXTS[0].replace("dog", "@").replace("cat", "dog").replace("@", "cat")
    for text, patterns in ((TEXTS[0], example.original), (swapped, example.perturbed)):
        with torch.no_grad():
            attentions = hf(torch.tensor([model.encode(text)]), output_attentions=True).attentions
        for (block, head), pattern in patterns.items():
            expected = attentions[block][0, head].numpy()
            np.testing.assert_allclose(pattern, expected, atol=1e-5)
