"""The fault suite, inputs: norms files keep every row or say why (one line naming the file,
the line or concept and what is wrong, or a counted note where dropping is documented), the
API takes what its signature says (a wrong type of ``texts`` is named, never measured), and
every environment setting is checked by every verb before any work."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import residual_trace as rt
from residual_trace.cli import trace
from residual_trace.errors import UserError
from residual_trace.probes.norms import MAX_ABS_VALUE, load_norms

MCRAE_HEAD = "Concept\tFeature\tBR_Label\tProd_Freq\n"

#: (layout, file content, what the one line must say)
BAD_NORMS = [
    ("wide", "", "the file is empty"),
    ("wide", "\n\n  \n", "the file is empty"),
    ("mcrae", MCRAE_HEAD, "a header but no rows"),
    ("wide", "word,size,speed\ncat,2,5\n\ndog,3,inf\n", "line 4 (concept 'dog'): speed inf is"),
    ("wide", "word,size\ncat,-inf\n", "line 2 (concept 'cat'): size -inf is not finite"),
    ("wide", "word,size\ncat,1e308\n", "line 2 (concept 'cat'): size 1e+308 is absurd"),
    ("wide", "word,size\ncat,2\ndog,3\nbee,x3\n", "line 4 (concept 'bee'): size 'x3' is not a"),
    ("wide", "word,size\ncat,2\ndog,3\ncat,4\n", "concept 'cat' is repeated with different"),
    ("binder", "Word,Vision\nbee,3\nbee,4\n", "(lines 2 and 3)"),
    ("binder", "Word,Vision,Sound\nbee,3,1\ndog,2,1e300\n", "Sound 1e+300 is absurd"),
    ("mcrae", MCRAE_HEAD + "bear\tfur\tx\t20\nbear\tfur\tx\t12\n", "'bear / fur' is repeated"),
    ("mcrae", MCRAE_HEAD + "bear\tfur\tx\tlots\n", "line 2 (concept 'bear'): Prod_Freq 'lots'"),
    ("mcrae", MCRAE_HEAD + "bear\tfur\tx\t\n", "line 2 (concept 'bear'): Prod_Freq is missing"),
    ("mcrae", MCRAE_HEAD + "bear\tfur\tx\tnan\n", "Prod_Freq is missing"),
    ("mcrae", MCRAE_HEAD + "bear\t\tx\t3\n", "line 2: no feature"),
    (
        "buchanan",
        "cue,translated,normalized_translated\napple,red,0.4\nzebra,stripe,inf\n",
        "line 3 (concept 'zebra'): normalized_translated inf is not finite",
    ),
    ("long", "concept,feature,value\ncat,purrs,3\ncat,purrs,2\n", "'cat / purrs' is repeated"),
    ("long", "concept,feature\ncat,purrs\n", "missing column(s) value"),
    ("buchanan", "cue,feature\napple,red\n", "missing column(s) translated"),
]


@pytest.mark.parametrize(("layout", "content", "fragment"), BAD_NORMS)
def test_a_bad_norms_file_is_one_line_naming_file_line_and_problem(
    layout, content, fragment, tmp_path
):
    path = tmp_path / "norms.txt"
    path.write_text(content)
    with pytest.raises(UserError) as caught:
        load_norms(f"{layout}:{path}")
    message = str(caught.value)
    assert fragment in message, message
    assert message.startswith(f"--norms {layout}:{path}: ") and "\n" not in message


@pytest.mark.parametrize(("layout", "content", "fragment"), BAD_NORMS[:8])
def test_the_command_line_refuses_it_before_the_model_loads(
    layout, content, fragment, tmp_path, tiny_dirs
):
    path = tmp_path / "norms.txt"
    path.write_text(content)
    out = tmp_path / "out"
    result = CliRunner().invoke(
        trace,
        ["probe", "-m", str(tiny_dirs["bert"]), "--norms", f"{layout}:{path}", "-o", str(out)],
    )
    assert result.exit_code == 1, result.output
    assert result.output.count("\n") == 1 and fragment in result.output, result.output
    assert "Traceback" not in result.output and "internal error" not in result.output
    assert not out.exists()


def _float_text(value: float) -> str:
    return repr(value) if math.isfinite(value) else str(value)  # inf, -inf, nan


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.lists(
        st.floats(allow_nan=True, allow_infinity=True, width=64)
        | st.sampled_from([1e308, -1e308, 1e16, 5.0]),
        min_size=1,
        max_size=12,
    )
)
def test_every_value_is_kept_exactly_or_refused_at_its_line(tmp_path, values):
    path = tmp_path / "wide.csv"
    words = [f"w{i}" for i in range(len(values))]
    path.write_text(
        "word,size\n"
        + "".join(f"{w},{_float_text(v)}\n" for w, v in zip(words, values, strict=True))
    )
    bad = [i for i, v in enumerate(values) if math.isinf(v) or abs(v) > MAX_ABS_VALUE]
    try:
        norms = load_norms(f"wide:{path}")
    except UserError as error:
        assert bad, f"refused a file of finite, sane values: {error}"
        first = bad[0]
        assert f"line {first + 2} (concept 'w{first}')" in str(error), str(error)
        return
    assert not bad, f"kept {[values[i] for i in bad]}"
    assert norms.concepts == tuple(words)
    got = norms.values[:, 0]
    np.testing.assert_array_equal(np.isnan(got), [math.isnan(v) for v in values])
    finite = ~np.isnan(got)
    np.testing.assert_array_equal(got[finite], np.array(values)[finite])
    missing = int(np.isnan(got).sum())
    assert any(f"{missing} missing rating(s)" in n for n in norms.notes) == (missing > 0)


def test_documented_drops_are_counted_in_run_json_and_on_stderr(tiny_dirs, tmp_path, monkeypatch):
    monkeypatch.setenv("RESIDUAL_TRACE_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    words = [
        "cat",
        "dog",
        "horse",
        "apple",
        "banana",
        "river",
        "mountain",
        "table",
        "chair",
        "music",
        "bread",
        "cheese",
        "window",
        "garden",
        "flower",
        "tree",
        "stone",
        "water",
        "fire",
        "cloud",
        "rain",
        "snow",
    ]
    frame = pd.DataFrame(rng.uniform(0, 5, size=(len(words), 3)).round(2), columns=["a", "b", "c"])
    frame.insert(0, "word", words)
    frame = pd.concat([frame, frame.iloc[[3, 7]]])  # two rows repeated, identical
    path = tmp_path / "norms.csv"
    frame.to_csv(path, index=False)
    out = tmp_path / "probe"
    args = ["probe", "-m", str(tiny_dirs["bert"]), "--norms", f"wide:{path}", "--layers", "0"]
    args += ["--mapper", "ridge", "--folds", "2", "--max-concepts", "20", "-o", str(out)]
    result = CliRunner().invoke(trace, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    note = "2 row(s) repeating an earlier concept with the same values: dropped"
    assert note in result.stderr, result.stderr
    record = json.loads((out / "run.json").read_text())
    assert any(note in n for n in record["notes"]), record["notes"]


# -- the API's texts ------------------------------------------------------------------------


class _NumpyLike:
    def tolist(self):
        return ["a"]

    def __len__(self):
        return 1


WRONG_TEXTS = [
    ({"a": "The dog ran."}, "got a dict"),
    ({"The dog ran.", "A cat sat."}, "got a set, whose order is arbitrary"),
    (frozenset({"The dog ran."}), "got a frozenset, whose order is arbitrary"),
    (b"The dog ran.", "got bytes, expected str"),
    (bytearray(b"The dog ran."), "got bytearray, expected str"),
    (["The dog ran.", 3], "texts[1]: got int 3, expected str"),
    (["The dog ran.", None], "texts[1]: got NoneType None"),
    ([b"The dog ran."], "texts[0]: got bytes"),
    ("sentences.txt", "looks like a file name (it ends in .txt)"),
    ("data/corpus", "looks like a file name (it holds a path separator"),
    (iter(["The dog ran."]), "which can be read only once"),
    (_NumpyLike(), "e.g. value.tolist()"),
    (42, "got int 42"),
]


@pytest.mark.parametrize("verb", ["layers", "decompose", "perturb"])
@pytest.mark.parametrize(("texts", "fragment"), WRONG_TEXTS)
def test_texts_of_a_wrong_type_are_named_before_the_model_loads(verb, texts, fragment):
    loaded = []

    def loader():
        loaded.append(1)
        raise AssertionError("the model must not load")

    with pytest.raises(UserError, match=None) as caught:
        getattr(rt, verb)(loader, texts)
    assert fragment in str(caught.value) and "\n" not in str(caught.value), str(caught.value)
    assert not loaded


def test_numpy_arrays_and_probe_corpora_are_named_too():
    with pytest.raises(UserError, match=r"got a numpy.ndarray: pass a list of strings"):
        rt.layers(lambda: None, np.array(["a", "b"]))
    with pytest.raises(UserError, match=r"corpus: got a set, whose order is arbitrary"):
        rt.probe(lambda: None, corpus={"a", "b"})


def test_what_the_signature_promises_is_taken(tiny_models, tmp_path):
    model = tiny_models["bert"]
    path = tmp_path / "texts.txt"
    path.write_text("The dog ran.\nA cat sat.\n")
    tables = [
        rt.layers(model, given).tables["drift"]
        for given in (["The dog ran.", "A cat sat."], ("The dog ran.", "A cat sat."), path)
    ]
    for table in tables[1:]:
        pd.testing.assert_frame_equal(tables[0], table)
    one = rt.layers(model, "The dog ran.").tables["drift"]
    pd.testing.assert_frame_equal(one, tables[0][tables[0]["text_id"] == 0])


# -- settings -------------------------------------------------------------------------------

VERBS = {
    "layers": ["layers", "--text", "The dog ran."],
    "decompose": ["decompose", "--text", "The dog ran."],
    "perturb": ["perturb", "--text", "The dog ran."],
    "probe": ["probe"],
    "report": ["report"],
}


@pytest.mark.parametrize("verb", list(VERBS))
@pytest.mark.parametrize(
    ("variable", "value", "fragment"),
    [
        ("RESIDUAL_TRACE_MEMORY_MB", "abc", "expected a whole number of MiB"),
        ("RESIDUAL_TRACE_MEMORY_MB", "8", "expected at least 16"),
        ("RESIDUAL_TRACE_MEMORY_MB", "1e3", "expected a whole number of MiB"),
        ("RESIDUAL_TRACE_MEMORY_MB", "99999999999", "expected at most"),
        ("RESIDUAL_TRACE_DEBUG", "maybe", "expected 1 or 0"),
        ("RESIDUAL_TRACE_CACHE", "{file}/cache", "is a file, not a directory"),
    ],
)
def test_every_verb_checks_every_setting_up_front(
    verb, variable, value, fragment, tmp_path, monkeypatch
):
    afile = tmp_path / "afile"
    afile.write_text("")
    monkeypatch.setenv(variable, value.format(file=afile))
    out = tmp_path / "out"
    result = CliRunner().invoke(trace, [*VERBS[verb], "-o", str(out)])
    assert result.exit_code == 1, result.output
    assert result.output.startswith(f"Error: {variable}") and fragment in result.output
    assert result.output.count("\n") == 1 and not out.exists()
    # and the API, the same way
    if verb != "report":
        with pytest.raises(UserError, match=variable):
            if verb == "probe":
                rt.probe(lambda: None)
            else:
                getattr(rt, verb)(lambda: None, ["The dog ran."])


def test_a_good_memory_setting_is_used(monkeypatch):
    from residual_trace.tracer.chunking import memory_budget

    monkeypatch.setenv("RESIDUAL_TRACE_MEMORY_MB", " 64 ")
    assert memory_budget() == 64 << 20
    monkeypatch.setenv("RESIDUAL_TRACE_MEMORY_MB", "")
    assert memory_budget() == 512 << 20
