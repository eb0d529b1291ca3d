"""The contributor page's worked example is code that runs: its Python blocks, in order, define
a whole verb, and the command line built from that verb's experiment works like any other."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import numpy as np
import pandas as pd
from click.testing import CliRunner

PAGE = Path(__file__).parents[2] / "docs" / "contributing.md"


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", PAGE.read_text(encoding="utf-8"), flags=re.S)


def test_the_worked_verb_runs_and_gets_a_command_from_its_experiment(tmp_path, monkeypatch):
    module = types.ModuleType("contributing_example")  # a module, as the verb's file would be
    monkeypatch.setitem(sys.modules, module.__name__, module)
    namespace = vars(module)
    blocks = _blocks()
    assert len(blocks) >= 3
    for block in blocks:
        exec(compile(block, str(PAGE), "exec"), namespace)
    experiment = namespace["EXPERIMENT"]

    import click

    from residual_trace.cli import _command, trace

    group = click.Group("trace", commands=dict(trace.commands))
    group.add_command(_command(experiment))  # what the registry line does for `trace`
    out = tmp_path / "norms"
    args = ["norms", "-m", "minilm", "-t", "The dog chased the cat.", "-q"]
    done = CliRunner().invoke(group, [*args, "-o", str(out)], catch_exceptions=False)
    assert done.exit_code == 0, done.output
    table = pd.read_csv(out / "norms.csv")
    api = namespace["result"].tables["norms"]  # the page's own relative=True run
    relative = CliRunner().invoke(group, [*args, "-o", str(tmp_path / "relative"), "--relative"])
    assert relative.exit_code == 0, relative.output
    again = pd.read_csv(tmp_path / "relative" / "norms.csv")
    np.testing.assert_allclose(again["norm"], api["norm"], rtol=1e-6)
    # independent: the norms of Hugging Face's own hidden states on the same weights
    from transformers import AutoModel, AutoTokenizer

    from tests.helpers import minilm_dir

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    model = AutoModel.from_pretrained(minilm_dir()).eval()
    import torch

    with torch.no_grad():
        encoded = tokenizer("The dog chased the cat.", return_tensors="pt")
        states = model(**encoded, output_hidden_states=True).hidden_states
    expected = torch.stack(states)[:, 0].norm(dim=-1).numpy()  # [layer, pos]
    got = table.pivot(index="layer", columns="position", values="norm").to_numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4)
