"""Texts: files and --text normalised alike, texts.csv reading back as the texts given, and
[UNK] flagged on its own (is_unk), counted, and never mistaken for a special token."""

from __future__ import annotations

import pandas as pd
import pytest
from click.testing import CliRunner

import residual_trace as rt
from residual_trace.cli import trace
from residual_trace.experiments.common import load_inputs, normalise_text, read_texts
from residual_trace.experiments.layers import LayersOptions

RAW = ["The dog\tran.", "  A cat\u2028sat.  ", "Rain\x0bfell.", "\ufeffStart here."]


def _run(args: list[str]):
    return CliRunner().invoke(trace, args, catch_exceptions=False)


def test_a_file_and_the_same_texts_given_directly_are_the_same_texts(tmp_path):
    """BOM, CRLF, lone CR and LF line ends in a file; the same texts through --text: one
    normalisation (control characters and separators to spaces, ends stripped)."""
    body = "\r\n".join(RAW[:2]) + "\r" + RAW[2] + "\n\n" + RAW[3].removeprefix("\ufeff")
    path = tmp_path / "texts.txt"
    path.write_bytes(b"\xef\xbb\xbf" + body.encode("utf-8"))
    from_file = read_texts(path)
    given, _ = load_inputs(RAW)
    assert from_file == given == ["The dog ran.", "A cat sat.", "Rain fell.", "Start here."]
    assert all(normalise_text(t) == t for t in given)  # idempotent


def test_texts_csv_reads_back_as_the_texts_given(tiny_dirs, tmp_path):
    texts = ["NA", "1e3", 'He said "hi", then left.', "null", "Tab\there;semi", "  spaced  "]
    out = tmp_path / "run"
    args = ["layers", "-m", str(tiny_dirs["bert"]), "-o", str(out), "-q"]
    for text in texts:
        args += ["-t", text]
    result = _run(args)
    assert result.exit_code == 0, result.output
    expected = [normalise_text(t) for t in texts]
    back = pd.read_csv(out / "texts.csv", keep_default_na=False, dtype={"text": str})
    assert back["text"].tolist() == expected
    assert pd.read_parquet(out / "texts.parquet")["text"].tolist() == expected


def test_unknown_tokens_are_flagged_counted_and_not_special(tiny_models):
    model = tiny_models["bert"]  # the minilm WordPiece vocabulary: no piece for emoji
    notes: list[str] = []
    texts = ["I like 🐶 and 🐱 a lot.", "Plain text."]
    result = LayersOptions(quiet=True).run(model, texts, warn=notes.append)
    drift = result.tables["drift"]
    tokens = drift[drift["layer"] == 0]
    unknown = tokens[tokens["token"] == "[UNK]"]
    assert len(unknown) == 2 and unknown["is_unk"].all() and not unknown["is_special"].any()
    assert not tokens.loc[tokens["token"] != "[UNK]", "is_unk"].any()
    summary = result.tables["summary"]
    assert (summary["n_unk"] == 2).all()
    assert (summary["n_tokens"] == (~tokens["is_special"]).sum()).all()  # [UNK] is measured
    assert any("2 [UNK] token(s) in 1 text(s) (text ids 0)" in n for n in notes)
    assert "(2 of them [UNK])" in result.describe()
    for name in ("mixing", "decompose"):
        table = rt.decompose(model, ["I like 🐶."], quiet=True).tables[name]
        assert table.loc[table["token"] == "[UNK]", "is_unk"].all(), name


def test_a_text_of_only_unknown_tokens_is_a_counted_warning(tiny_models):
    notes: list[str] = []
    LayersOptions(quiet=True).run(tiny_models["bert"], ["🐶 🐱", "Fine.", "🦊"], warn=notes.append)
    assert any("2 text(s) hold no token but [UNK] (text ids 0, 2)" in n for n in notes)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [("\u200b\u200b", "no token the model can read"), ("\t\r\x0c", "is empty")],
)
def test_a_text_with_nothing_to_measure_is_a_one_line_error(tiny_dirs, tmp_path, text, fragment):
    out = tmp_path / "run"
    result = _run(["layers", "-m", str(tiny_dirs["bert"]), "-t", "Fine.", "-t", text, "-o",
                   str(out)])  # fmt: skip
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: text 1") and fragment in lines[0]
    assert not out.exists()


def test_a_max_length_that_leaves_only_special_tokens_is_refused(tiny_dirs, tmp_path):
    out = tmp_path / "run"
    result = _run(["decompose", "-m", str(tiny_dirs["bert"]), "-t", "The dog ran.",
                   "--max-length", "2", "-o", str(out)])  # fmt: skip
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == (
        "Error: --max-length 2 leaves text 0 nothing but its special tokens: give at least 3"
    )
    assert not out.exists()


def test_a_decoders_unknown_token_that_is_also_its_bos_stays_special(tiny_models):
    """In the tiny BPE (as in GPT-2) one token is BOS, EOS and UNK at once: it is the
    structural BOS, not an unknown piece of text."""
    model = tiny_models["gpt2"]
    assert model.unk_id is None and model.tokenizer.bos_token_id in model.special_ids


# -- checkpoints ------------------------------------------------------------------------


def _copy_checkpoint(source, target):
    import shutil

    shutil.copytree(source, target)
    return target


def _edit_weights(directory, drop: str) -> None:
    from safetensors.torch import load_file, save_file

    path = directory / "model.safetensors"
    weights = load_file(path)
    kept = {k: v for k, v in weights.items() if drop not in k}
    assert len(kept) < len(weights)
    save_file(kept, path, metadata={"format": "pt"})


def _edit_config(directory, **changes) -> None:
    import json

    path = directory / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def _refused(directory, *fragments: str) -> str:
    result = _run(["layers", "-m", str(directory), "-t", "The dog ran.", "-o",
                   str(directory.parent / "out")])  # fmt: skip
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:"), result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert not (directory.parent / "out").exists()
    return lines[0]


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_a_checkpoint_missing_a_blocks_weights_is_refused(tiny_dirs, tmp_path, kind):
    directory = _copy_checkpoint(tiny_dirs[kind], tmp_path / "ckpt")
    part = "layer.1.attention.self.query" if kind == "bert" else "layers.1.self_attn.q_proj"
    _edit_weights(directory, part)
    _refused(directory, "lacks weights for", part, "randomly initialised")


@pytest.mark.parametrize(
    ("layers", "fragment"), [(3, "lacks weights for"), (1, "its config has no place for")]
)
def test_a_config_that_disagrees_with_the_weights_is_refused(tiny_dirs, tmp_path, layers, fragment):
    directory = _copy_checkpoint(tiny_dirs["bert"], tmp_path / "ckpt")  # 2 layers of weights
    _edit_config(directory, num_hidden_layers=layers)
    _refused(directory, fragment, "layer.")


def test_a_checkpoint_without_its_tokenizer_is_refused(tiny_dirs, tmp_path):
    directory = _copy_checkpoint(tiny_dirs["gpt2"], tmp_path / "ckpt")
    for path in directory.iterdir():
        if "token" in path.name or path.name in ("vocab.json", "merges.txt", "vocab.txt"):
            path.unlink()
    _refused(directory, "no tokenizer in")


def test_a_missing_task_head_is_not_a_missing_layer(tiny_dirs, tmp_path):
    """minilm ships as a BertModel (no MLM head) and loads; so does a tiny BERT whose head
    weights were dropped: no measure reads the head."""
    directory = _copy_checkpoint(tiny_dirs["bert"], tmp_path / "ckpt")
    from safetensors.torch import load_file

    if any(k.startswith("cls.") for k in load_file(directory / "model.safetensors")):
        _edit_weights(directory, "cls.")
    result = _run(["layers", "-m", str(directory), "-t", "The dog ran.", "-q", "-o",
                   str(tmp_path / "out")])  # fmt: skip
    assert result.exit_code == 0, result.output
