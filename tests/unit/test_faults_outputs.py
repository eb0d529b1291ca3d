"""The fault suite, outputs and the machine: no result lost to a race, no two report parts in
one directory, faults of the machine (a full disk, a file-size limit, a read-only file
system, a cache that is a file) named in one line with nothing half-written, messages that
say what happened (typed special tokens, an interrupted report), and cheap usage errors
that fail before the heavy imports."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from residual_trace.cli import trace
from residual_trace.experiments.report import slug
from residual_trace.runs import Claim
from tests.helpers import ctrl_c_enabled

#: A CLI run in a child process that stops before publishing until ``GO`` exists beside
#: the output (so that a second run can be started while the first is in flight).
PAUSED = """
import sys, time
from pathlib import Path
import residual_trace.runs as runs
publish = runs.RunDir._publish
def paused(self):
    print("PAUSED", flush=True)
    go = Path(sys.argv[1])
    while not go.exists():
        time.sleep(0.05)
    publish(self)
runs.RunDir._publish = paused
from residual_trace.cli import main
main(sys.argv[2:])
"""

#: The same, with every default --out of this process falling in one fixed second.
FIXED_CLOCK = """
import datetime as real
import residual_trace.runs as runs
class _Clock:
    UTC = real.UTC
    class datetime:
        @staticmethod
        def now(tz=None):
            return real.datetime(2026, 1, 2, 3, 4, 5, tzinfo=tz)
runs._dt = _Clock
"""


def _cli(args: list[str]):
    return CliRunner().invoke(trace, args, catch_exceptions=False)


def _one_line_error(output: str, *fragments: str) -> str:
    lines = [line for line in output.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], output
    assert "Traceback" not in output and "internal error" not in output, output
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


@contextlib.contextmanager
def _paused_run(args: list[str], go: Path, cwd: Path | None = None) -> Iterator[subprocess.Popen]:
    process = subprocess.Popen(
        [sys.executable, "-c", PAUSED, str(go), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=cwd,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline().strip()
        assert line == "PAUSED", (line, process.stderr.read() if process.stderr else "")
        yield process
    finally:
        go.touch()
        process.wait(timeout=120)


def _layers(model: Path, out: Path, text: str, *extra: str) -> list[str]:
    return ["layers", "-m", str(model), "-t", text, "-o", str(out), "-q", *extra]


def _texts_of(out: Path) -> list[str]:
    import pandas as pd

    return list(pd.read_csv(out / "texts.csv", keep_default_na=False)["text"])


# -- races ------------------------------------------------------------------------------


def test_a_second_run_into_a_busy_out_is_refused_and_the_first_keeps_its_result(
    tiny_dirs, tmp_path
):
    out, go = tmp_path / "run", tmp_path / "go"
    with _paused_run(_layers(tiny_dirs["gpt2"], out, "First run."), go) as first:
        second = _cli(_layers(tiny_dirs["gpt2"], out, "Second run."))
        assert second.exit_code == 1
        _one_line_error(second.output, f"--out {out}", "another run", f"pid {first.pid}")
    assert first.returncode == 0, first.stderr.read() if first.stderr else ""
    assert _texts_of(out) == ["First run."]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["go", "run"]  # no lock, no temporary


def test_with_overwrite_the_second_run_replaces_the_first_wholly_and_says_so(tiny_dirs, tmp_path):
    out, go = tmp_path / "run", tmp_path / "go"
    with _paused_run(_layers(tiny_dirs["gpt2"], out, "First run."), go) as first:
        second = _cli(_layers(tiny_dirs["gpt2"], out, "Second run.", "--overwrite"))
        assert second.exit_code == 0, second.output
        assert "another run" in second.output and "replaces it" in second.output
        assert _texts_of(out) == ["Second run."]
    # the first, finishing later, finds --out filled: refused at publish, nothing lost
    assert first.returncode == 1
    stderr = first.stderr.read() if first.stderr else ""
    _one_line_error(stderr, f"--out {out}", "filled by another run", "not kept")
    assert _texts_of(out) == ["Second run."]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["go", "run"]


def test_the_publish_itself_refuses_an_out_filled_meanwhile(tiny_dirs, tmp_path, monkeypatch):
    """The check holds at publish time too: files that appear in --out while a run computes
    (written by anything, claimed or not) are never replaced without --overwrite."""
    import residual_trace.runs as runs

    out = tmp_path / "run"
    publish = runs.RunDir._publish

    def filled_meanwhile(self):
        out.mkdir(exist_ok=True)
        (out / "theirs.txt").write_text("theirs")
        publish(self)

    monkeypatch.setattr(runs.RunDir, "_publish", filled_meanwhile)
    result = _cli(_layers(tiny_dirs["gpt2"], out, "Mine."))
    assert result.exit_code == 1
    _one_line_error(result.output, "filled by another run", "not kept")
    assert [p.name for p in out.iterdir()] == ["theirs.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_two_runs_in_one_second_without_out_get_two_directories(tiny_dirs, tmp_path):
    go = tmp_path / "go"
    code = FIXED_CLOCK + PAUSED
    args = ["layers", "-m", str(tiny_dirs["gpt2"]), "-q"]
    processes = []
    for text in ("One.", "Two."):
        process = subprocess.Popen(
            [sys.executable, "-c", code, str(go), *args, "-t", text],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=tmp_path,
        )
        assert process.stdout is not None and process.stdout.readline().strip() == "PAUSED"
        processes.append(process)
    go.touch()
    for process in processes:
        assert process.wait(timeout=120) == 0, process.stderr.read() if process.stderr else ""
    runs = sorted((tmp_path / "runs").iterdir())
    assert [p.name for p in runs] == ["tiny-gpt2-20260102-030405", "tiny-gpt2-20260102-030405-2"]
    assert sorted(t for run in runs for t in _texts_of(run)) == ["One.", "Two."]


def test_a_claim_dies_with_its_process(tmp_path):
    """SIGKILL releases the lock (the system does): the next run is not refused, and the
    killed run's lock file is removed by it."""
    out = tmp_path / "run"
    code = "import sys, time; from residual_trace.runs import Claim\n"
    code += "c = Claim(__import__('pathlib').Path(sys.argv[1])); print('HELD', flush=True)\n"
    code += "time.sleep(60)\n"
    process = subprocess.Popen(
        [sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None and process.stdout.readline().strip() == "HELD"
    assert Claim.holder(out) == process.pid
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert Claim.holder(out) is None
    with Claim(out):
        assert (tmp_path / ".run.lock").exists()
    assert list(tmp_path.iterdir()) == []


def test_two_reports_into_one_out_are_never_written_at_once(tiny_dirs, tmp_path):
    out = tmp_path / "report"
    code = "import sys, time; from residual_trace.runs import Claim\n"
    code += "c = Claim(__import__('pathlib').Path(sys.argv[1])); print('HELD', flush=True)\n"
    code += "time.sleep(60)\n"
    process = subprocess.Popen(
        [sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None and process.stdout.readline().strip() == "HELD"
        for extra in ((), ("--overwrite",)):
            result = _cli(
                ["report", "--experiment", "layers", "--max-texts", "1", "-q", "-m",
                 str(tiny_dirs["gpt2"]), "-o", str(out), *extra]
            )  # fmt: skip
            assert result.exit_code == 1
            _one_line_error(result.output, "another run", f"pid {process.pid}")
        assert not out.exists()
    finally:
        process.kill()
        process.wait(timeout=30)


# -- report part directories ----------------------------------------------------------------


def test_same_named_model_folders_get_their_own_parts(tiny_dirs, tmp_path):
    import shutil

    a, b = tmp_path / "a" / "model", tmp_path / "b" / "model"
    shutil.copytree(tiny_dirs["gpt2"], a)
    shutil.copytree(tiny_dirs["bert"], b)
    out = tmp_path / "report"
    result = _cli(
        ["report", "--experiment", "layers", "--max-texts", "1", "-q",
         "-m", str(a), "-m", str(b), "-o", str(out)]
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    parts = sorted(p.name for p in (out / "runs").iterdir())
    assert len(parts) == 2 and all(p.startswith("model-") for p in parts), parts
    record = json.loads((out / "run.json").read_text())
    assert record["checkpoints"] == {str(a): str(a.resolve()), str(b): str(b.resolve())}
    models = {
        json.loads((out / "runs" / part / "layers" / "run.json").read_text())["model"]["name"]
        for part in parts
    }
    assert models == {str(a), str(b)}  # each part holds its own model's run, none overwritten


def test_one_checkpoint_named_twice_is_refused(tiny_dirs, tmp_path, monkeypatch):
    import shutil

    shutil.copytree(tiny_dirs["gpt2"], tmp_path / "ckpt")
    monkeypatch.chdir(tmp_path)
    result = _cli(
        ["report", "--experiment", "layers", "-q", "-m", "./ckpt", "-m", "ckpt", "-o", "r"]
    )
    assert result.exit_code == 1
    _one_line_error(result.output, "--model ./ckpt", "--model ckpt", "same checkpoint")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


@pytest.mark.parametrize(
    "names",
    [
        ("a/model", "b/model"),
        ("org-a/name", "org/a-name"),
        ("EleutherAI/pythia-70m", "eleutherai-pythia/70m"),
        ("minilm", "smollm2"),
    ],
)
def test_part_directories_of_distinct_hub_names_differ(names):
    first, second = (slug(n) for n in names)
    assert first != second
    for name, made in zip(names, (first, second), strict=True):
        assert "/" not in made and made not in {"", ".", ".."}, (name, made)


# -- faults of the machine --------------------------------------------------------------------


def _mount_tmpfs(where: Path, options: str) -> bool:
    where.mkdir()
    if os.geteuid() != 0:
        return False
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True
    )
    return done.returncode == 0


def _run_cli(args: list[str], limit: int | None = None, env: dict[str, str] | None = None):
    def limit_file_size() -> None:
        if limit is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run(
        [sys.executable, "-m", "residual_trace", *args],
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=limit_file_size,
        env={**os.environ, **(env or {})},
    )


def test_a_file_size_limit_is_named_and_leaves_nothing(tiny_dirs, tmp_path):
    out = tmp_path / "run"
    done = _run_cli(_layers(tiny_dirs["gpt2"], out, "A text."), limit=4096)
    assert done.returncode == 1, done.stderr[-800:]
    _one_line_error(done.stderr, "cannot write", f"--out {out}", "File too large", "ulimit")
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_and_a_read_only_one_are_named_and_leave_nothing(tiny_dirs, tmp_path):
    """A tiny tmpfs (the tests run as root here; elsewhere the file-size limit above stands
    for this class): the disk fills while the tables are written."""
    full, frozen = tmp_path / "full", tmp_path / "frozen"
    mounted = [_mount_tmpfs(full, "size=24k"), _mount_tmpfs(frozen, "ro,size=1m")]
    if not all(mounted):  # no tmpfs: the same fault made with a file-size limit instead
        done = _run_cli(_layers(tiny_dirs["gpt2"], full / "run", "A text."), limit=4096)
        _one_line_error(done.stderr, "cannot write", "File too large")
        assert list(full.iterdir()) == []
        return
    try:
        done = _run_cli(_layers(tiny_dirs["gpt2"], full / "run", "A text."))
        assert done.returncode == 1, done.stderr[-800:]
        _one_line_error(done.stderr, "cannot write", f"--out {full / 'run'}", "No space left")
        assert list(full.iterdir()) == []
        done = _run_cli(_layers(tiny_dirs["gpt2"], frozen / "run", "A text."))
        assert done.returncode == 1, done.stderr[-800:]
        _one_line_error(done.stderr, f"--out {frozen / 'run'}")
        assert list(frozen.iterdir()) == []
        cache = {"RESIDUAL_TRACE_CACHE": str(full / "cache")}
        probe = ["probe", "-m", str(tiny_dirs["gpt2"]), "-q", "-o", str(tmp_path / "p"),
                 "--max-concepts", "20", "--folds", "2", "--mapper", "ridge", "--condition",
                 "system", "--embedding", "isolated", "--layers", "0"]  # fmt: skip
        (full / "filler").write_bytes(b"x" * 20_000)
        done = _run_cli(probe, env=cache)
        assert done.returncode == 1, done.stderr[-800:]
        _one_line_error(done.stderr, "RESIDUAL_TRACE_CACHE=", "No space left", "--no-cache")
        assert not list((full / "cache").rglob("*.npz*"))
        assert not (tmp_path / "p").exists()
    finally:
        for where in (full, frozen):
            subprocess.run(["umount", str(where)], capture_output=True)


def test_a_cache_location_that_is_a_file_is_named(tiny_dirs, tmp_path):
    cache = tmp_path / "cache-file"
    cache.write_text("not a directory")
    for location in (cache, cache / "below"):
        result = CliRunner(env={"RESIDUAL_TRACE_CACHE": str(location)}).invoke(
            trace,
            ["probe", "-m", str(tiny_dirs["gpt2"]), "-q", "-o", str(tmp_path / "p"),
             "--max-concepts", "20", "--folds", "2", "--mapper", "ridge", "--condition",
             "system", "--embedding", "isolated", "--layers", "0"],
            catch_exceptions=False,
        )  # fmt: skip
        assert result.exit_code == 1
        _one_line_error(result.output, f"RESIDUAL_TRACE_CACHE={location}", "is a file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache-file"]


# -- messages -------------------------------------------------------------------------------


def test_special_token_strings_typed_in_a_text_are_named(tiny_dirs, tmp_path):
    texts = ["The [MASK] sat.", "Plain words.", "A [SEP] inside."]
    args = ["layers", "-m", str(tiny_dirs["bert"]), "-o", str(tmp_path / "run"), "-q"]
    result = _cli([*args, *(a for t in texts for a in ("-t", t))])
    assert result.exit_code == 0, result.output
    warned = [line for line in result.output.splitlines() if "special token" in line]
    assert len(warned) == 1, result.output
    assert "'[MASK]'" in warned[0] and "'[SEP]'" in warned[0] and "text ids 0, 2" in warned[0]
    plain = _cli(["layers", "-m", str(tiny_dirs["bert"]), "-o", str(tmp_path / "r2"), "-q",
                  "-t", "No brackets [here] at all."])  # fmt: skip
    assert plain.exit_code == 0 and "special token" not in plain.output, plain.output


def test_an_interrupted_report_says_what_it_kept_and_how_to_resume(tiny_dirs, tmp_path):
    out = tmp_path / "report"
    code = (
        "import os, signal, sys\n"
        "import residual_trace.experiments.decompose as d\n"
        "def interrupt(*a, **k):\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "d.run_decompose = interrupt\n"
        "from residual_trace.cli import main\n"
        "main(sys.argv[1:])\n"
    )
    args = ["report", "--experiment", "layers", "--experiment", "decompose", "--max-texts",
            "1", "-q", "-m", str(tiny_dirs["gpt2"]), "-o", str(out)]  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300,
        preexec_fn=ctrl_c_enabled,
    )  # fmt: skip
    assert done.returncode == 130, done.stderr[-800:]
    assert "Traceback" not in done.stderr
    line = done.stderr.strip().splitlines()[-1]
    assert "1 finished part(s) kept" in line and str(out) in line and "resume" in line, line
    assert "nothing written" not in line
    assert list(out.glob("runs/*/layers/run.json"))


def test_cheap_usage_errors_fail_before_the_heavy_imports(tiny_dirs, tmp_path):
    """--text with --file, an unknown hub name offline, a missing --file: one line, and
    neither torch nor TransformerLens is imported first."""
    probe = (
        "import sys\n"
        "from residual_trace.cli import main\n"
        "try:\n"
        "    main(sys.argv[1:])\n"
        "finally:\n"
        "    names = ('torch', 'transformer_lens', 'transformers')\n"
        "    heavy = [m for m in names if m in sys.modules]\n"
        "    print('HEAVY', heavy, file=sys.stderr)\n"
    )
    text_file = tmp_path / "texts.txt"
    text_file.write_text("A text.\n")
    cases = [
        (["layers", "-t", "x", "-f", str(text_file)], "--text or --file, not both"),
        (["layers", "-m", "no-such-org/no-such-model", "-t", "x"], "no-such-org/no-such-model"),
        (["decompose", "-f", str(tmp_path / "missing.txt")], "no such file"),
    ]
    for args, fragment in cases:
        start = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-c", probe, *args, "-o", str(tmp_path / "o")],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
        elapsed = time.perf_counter() - start
        assert done.returncode == 1, done.stderr
        lines = done.stderr.strip().splitlines()
        assert lines[-1] == "HEAVY []", lines
        _one_line_error("\n".join(lines[:-1]), fragment)
        assert elapsed < 30, elapsed  # a bound against a hang, not a benchmark
    assert sorted(p.name for p in tmp_path.iterdir()) == ["texts.txt"]
