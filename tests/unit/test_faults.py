"""The fault suite: bad or odd command-line input, generated (hypothesis) and by hand.

Whatever is typed, a command ends in one of two ways: success (status 0, its output
directory complete and nothing else left beside it) or one line, ``Error: ...``, with a
non-zero status and nothing written. Never a traceback, never an "internal error" for input
anyone can type, never a half-written or leftover file.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from residual_trace.cli import trace

#: Characters a hostile user might type: letters, digits, signs, separators, control
#: characters, a BOM, zero-width and other non-ASCII characters.
ALPHABET = "aZ09-_.,:;/ \t\r\n\x00\x1b\ufeff\u200b\u2028é漢🐶\\\"'=+*"
VALUES = st.one_of(
    st.integers(-(2**64), 2**64).map(str),
    st.sampled_from(["", " ", "0", "-1", "1.5", "nan", "inf", "1e3", "L0H0", "L9H99", "0,1"]),
    st.text(ALPHABET, max_size=10),
)

#: Options each command takes, with or without a value.
FLAGS = {
    "layers": ["--batch-size", "--max-length", "--seed", "--heatmap-text", "--format"],
    "decompose": ["--batch-size", "--max-length", "--seed", "--mixing-text", "--mixing-block",
                  "--vz-max-tokens"],
    "perturb": ["--batch-size", "--max-length", "--seed", "--mode", "--samples", "--show-text",
                "--show-head"],
    "probe": ["--seed", "--folds", "--seeds", "--max-concepts", "--layers", "--embedding",
              "--mapper", "--condition"],
}  # fmt: skip
SWITCHES = {
    "layers": ["--save-attention", "--include-special", "--overwrite"],
    "decompose": ["--per-head", "--include-special", "--overwrite"],
    "perturb": ["--all-pairs", "--overwrite"],
    "probe": ["--per-feature", "--no-cache", "--overwrite"],
}
#: Fast settings for a probe that succeeds (later flags override them).
PROBE_BASE = ["--max-concepts", "20", "--folds", "2", "--mapper", "ridge", "--condition",
              "system", "--embedding", "static"]  # fmt: skip


@st.composite
def command_lines(draw: st.DrawFn) -> tuple[str, list[str]]:
    verb = draw(st.sampled_from(sorted(FLAGS)))
    args: list[str] = []
    for flag in draw(st.lists(st.sampled_from(FLAGS[verb]), max_size=3)):
        args += [flag, draw(VALUES)]
    args += draw(st.lists(st.sampled_from(SWITCHES[verb]), max_size=1, unique=True))
    if verb != "probe":
        texts = draw(st.lists(st.text(ALPHABET, max_size=12), max_size=2))
        for text in texts or ["The dog chased the cat."]:
            args += ["-t", text]
        if verb == "perturb" and draw(st.booleans()):
            args += ["--swap", draw(VALUES), draw(VALUES)]
    return verb, args


def _check(result, out: Path, root: Path) -> None:
    output = result.output
    assert "Traceback" not in output, output
    assert "internal error" not in output, output
    left = sorted(p.name for p in root.iterdir())
    if result.exit_code == 0:
        assert (out / "run.json").is_file(), output
        assert left == [out.name], left
        return
    lines = [line for line in output.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], output
    # only warnings (lines of their own) may come before the error
    assert all(line.startswith(("warning:", "note:", "Error:")) for line in lines), output
    assert left == [], left


@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(command_lines())
def test_any_command_line_ends_in_success_or_one_line(tiny_dirs, case):
    verb, args = case
    root = Path(tempfile.mkdtemp(prefix="fault-"))
    try:
        out = root / "out"
        base = [verb, "-m", str(tiny_dirs["gpt2"]), "-o", str(out), "-q"]
        if verb == "probe":
            base += PROBE_BASE
        result = CliRunner().invoke(trace, [*base, *args], catch_exceptions=False)
        _check(result, out, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


# -- options, one test per rule -----------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["layers", "--seed", "-1"], "seed (--seed): must be between 0"),
        (["decompose", "--seed", str(2**64)], "seed (--seed)"),
        (["perturb", "--swap", "dog", "cat", "--samples", "3"], "samples (--samples): is not"),
        (["perturb", "--all-pairs", "--samples", "3"], "samples (--samples): is not used"),
        (["perturb", "--mode", "shuffle", "--swap", "dog", "cat"], "swap (--swap): goes with"),
        (["probe", "--embedding", "static", "--layers", "0,3"], "layers (--layers): embedding"),
        (["probe", "--embedding", "isolated", "-t", "A corpus."], "goes with --embedding"),
        (["probe", "--folds", "30", "--max-concepts", "20"], "folds (--folds): 30 folds"),
        (["probe", "--include-special"], "No such option '--include-special'"),
        (["perturb", "--include-special"], "No such option '--include-special'"),
        (["probe", "--max-length", "8"], "No such option '--max-length'"),
        (["layers", "--format", "bmp"], "Invalid value for '--format'"),
        (["layers", "--out", ""], "--out: give a directory name"),
    ],
)
def test_each_wrong_option_is_one_line_naming_it(tiny_dirs, tmp_path, args, fragment):
    out = tmp_path / "out"
    full = [*args[:1], "-m", str(tiny_dirs["gpt2"]), *args[1:]]
    if "--out" not in args:
        full += ["-o", str(out)]
    if args[0] != "probe" and "-t" not in args:
        full += ["-t", "The dog chased the cat."]
    result = CliRunner().invoke(trace, full, catch_exceptions=False)
    assert result.exit_code in (1, 2)
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:"), result.output
    assert fragment in lines[0], lines[0]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args", [["--bogus"], ["bogus"], ["layers", "--bogus"]])
def test_usage_errors_are_one_line_at_every_level(args):
    result = CliRunner().invoke(trace, args, catch_exceptions=False)
    assert result.exit_code == 2
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: No such "), result.output
    assert "--help" in lines[0]


def test_the_bare_command_still_shows_its_help():
    result = CliRunner().invoke(trace, [], catch_exceptions=False)
    assert "Commands:" in result.output and "Examples:" in result.output
    assert not result.output.startswith("Error:")
