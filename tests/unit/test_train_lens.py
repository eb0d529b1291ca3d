"""``trace train-lens`` on a tiny seeded decoder: the loss, the schedule, the format, the errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import residual_trace as rt
from residual_trace.cli import trace
from residual_trace.errors import UserError
from tests.families import save_family

TEXTS = [
    "The cat sat on the mat.",
    "Rain fell on the old town and the river rose.",
    "A dog ran across the field to the gate.",
    "She read the letter twice before she spoke.",
    "The bridge was closed after the storm.",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_family(tmp_path_factory.mktemp("train-lens"), "llama")


@pytest.fixture(scope="module")
def model(tiny: Path):
    return rt.load_model(str(tiny), device="cpu")


def test_the_first_step_reads_the_logit_lens_and_training_lowers_the_loss(model):
    train = TEXTS[:4]
    n_tokens = sum(len(model.encode(t)) for t in train)
    # one epoch per step: every training text exactly once
    result = rt.train_lens(model, TEXTS, steps=8, tokens_per_step=n_tokens, heldout=0.2)
    training = result.tables["training"]
    first = training[training["step"] == 1].set_index("layer")["kl"]
    logit = rt.lens(model, train, include_special=True).lens
    expected = logit[logit["site"] == "post"].groupby("layer")["kl_final"].mean()
    for layer in range(model.n_blocks):  # identity initialisation: the logit lens's KL
        assert first[layer] == pytest.approx(expected[layer], rel=1e-4)
    last = training[training["step"] == 8].set_index("layer")["kl"]
    assert (last < first).all()


def test_the_schedule_is_linear_decay_from_the_authors_learning_rate(model):
    steps = 5
    training = rt.train_lens(model, TEXTS, steps=steps, tokens_per_step=16).tables["training"]
    lr = training.groupby("step")["lr"].first().to_numpy()
    # SGD with Nesterov momentum 0.9 at lr = 1.0 * (1 - 0.9), decayed linearly to 0
    assert np.allclose(lr, [0.1 * (1 - k / steps) for k in range(steps)])


def test_the_same_seed_trains_the_same_lens_and_another_seed_another(model):
    a = rt.train_lens(model, TEXTS, steps=3, tokens_per_step=20, seed=1).lens
    b = rt.train_lens(model, TEXTS, steps=3, tokens_per_step=20, seed=1).lens
    c = rt.train_lens(model, TEXTS, steps=3, tokens_per_step=20, seed=2).lens
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    assert not torch.equal(a.weight, c.weight)


def test_heldout_compares_both_lenses_on_texts_it_did_not_train_on(model):
    result = rt.train_lens(model, TEXTS, steps=2, tokens_per_step=20, heldout=0.4)
    texts = result.tables["texts"]
    assert texts["split"].tolist() == ["train"] * 3 + ["heldout"] * 2
    heldout = result.tables["heldout"]
    assert set(heldout["text_id"]) == {3, 4}
    assert set(heldout["lens"]) == {"logit", "tuned"}
    logit = rt.lens(model, TEXTS[3:], include_special=True).lens
    logit = logit[(logit["site"] == "post") & (logit["layer"] < model.n_blocks)]
    ours = heldout[heldout["lens"] == "logit"].sort_values(["text_id", "position", "layer"])
    assert np.allclose(ours["kl"], logit["kl_final"], rtol=1e-4, atol=1e-6)
    summary = result.tables["heldout_summary"]
    content = heldout[~heldout["is_special"]]
    mean = content[(content["layer"] == 1) & (content["lens"] == "tuned")]["kl"].mean()
    row = summary[(summary["layer"] == 1) & (summary["lens"] == "tuned")].iloc[0]
    assert row["kl"] == pytest.approx(mean)


def test_the_command_writes_a_lens_that_trace_lens_reads(tiny, tmp_path):
    runner = CliRunner()
    out = tmp_path / "lens"
    args = ["train-lens", "--model", str(tiny), "--out", str(out), "--steps", "2", "-q"]
    done = runner.invoke(
        trace, [*args, "--tokens-per-step", "16", *[a for t in TEXTS for a in ("--text", t)]]
    )
    assert done.exit_code == 0, done.output
    for name in ("config.json", "params.pt", "training.csv", "heldout.csv", "run.json"):
        assert (out / name).is_file(), name
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 2 and config["lens_type"] == "linear_tuned_lens"
    state = torch.load(out / "params.pt")
    assert sorted(state) == ["0.bias", "0.weight", "1.bias", "1.weight"]
    table = rt.lens(str(tiny), TEXTS[:1], tuned_lens=out).lens
    tuned = table[table["lens"] == "tuned"]
    assert len(tuned) == len(table[table["lens"] == "logit"])
    # what trace lens reads back is what was trained: layer 1 through the saved translator
    model = rt.load_model(str(tiny), device="cpu")
    from residual_trace.models.readout import readout

    ids = model.encode(TEXTS[0])
    batch = torch.tensor([ids])
    h = model.capture(batch, torch.ones_like(batch)).resid[1, 0]
    logits = readout(model, "logit")(h + h @ state["1.weight"].T + state["1.bias"])
    top = logits.argmax(-1).numpy()
    got = tuned[tuned["layer"] == 1].sort_values("position")["top_token_id"].to_numpy()
    assert (top == got).mean() >= 0.9  # near-ties aside


def test_bad_input_is_one_line(tiny, tmp_path):
    with pytest.raises(UserError, match="encoder"):
        rt.train_lens("minilm", TEXTS, steps=1)
    with pytest.raises(UserError, match="steps"):
        rt.train_lens(str(tiny), TEXTS, steps=0)
    with pytest.raises(UserError, match="heldout"):
        rt.train_lens(str(tiny), TEXTS, heldout=1.0)
    with pytest.raises(UserError, match="at least two texts"):
        rt.train_lens(str(tiny), ["Only one."], heldout=0.1)
    done = CliRunner().invoke(trace, ["train-lens", "--model", str(tiny), "--steps", "-3"])
    assert done.exit_code != 0 and "steps (--steps): must be at least 1" in done.output
    assert "Traceback" not in done.output
