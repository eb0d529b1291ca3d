"""Outputs: a non-empty --out is refused unless --overwrite, which replaces it wholly and only
over the same command's output; a SIGKILLed run leaves nothing the next run does not remove;
directories follow the user's umask; Ctrl-C exits with 130."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from residual_trace.cli import trace
from tests.helpers import ctrl_c_enabled


def _run(args: list[str]):
    return CliRunner().invoke(trace, args, catch_exceptions=False)


def _one_line_error(result, *fragments: str) -> str:
    assert result.exit_code != 0, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:"), result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def _layers(model: Path, out: Path, *extra: str):
    return _run(["layers", "-m", str(model), "-t", "Fresh text.", "-o", str(out), "-q", *extra])


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_a_non_empty_out_is_refused_and_left_alone(tiny_dirs, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    _one_line_error(_layers(tiny_dirs["gpt2"], out), "already holds files", "--overwrite")
    # --overwrite never replaces a directory that is not an output of this command
    _one_line_error(_layers(tiny_dirs["gpt2"], out, "--overwrite"), "no residual-trace run")
    assert _snapshot(out) == {"notes.txt": b"my notes"}
    assert [p.name for p in tmp_path.iterdir()] == ["mine"]  # no temporary left beside it


def test_overwrite_replaces_the_earlier_output_wholly(tiny_dirs, tmp_path):
    out = tmp_path / "run"
    assert _layers(tiny_dirs["gpt2"], out).exit_code == 0
    first = json.loads((out / "run.json").read_text())
    (out / "stale.csv").write_text("from an earlier version")
    _one_line_error(_layers(tiny_dirs["gpt2"], out), "already holds files")
    assert (out / "stale.csv").exists()
    result = _layers(tiny_dirs["gpt2"], out, "--overwrite")
    assert result.exit_code == 0, result.output
    assert not (out / "stale.csv").exists()
    second = json.loads((out / "run.json").read_text())
    assert second["command"] == "layers" and sorted(second["files"]) == sorted(first["files"])
    assert sorted(p.name for p in out.iterdir()) == sorted([*second["files"], "run.json"])
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_a_verb_never_overwrites_another_verbs_output(tiny_dirs, tmp_path):
    out = tmp_path / "run"
    assert _layers(tiny_dirs["gpt2"], out).exit_code == 0
    before = _snapshot(out)
    for verb in ("decompose", "perturb"):
        args = [verb, "-m", str(tiny_dirs["gpt2"]), "-t", "A b c.", "-o", str(out), "-q"]
        _one_line_error(_run([*args, "--overwrite"]), "`trace layers`", f"`trace {verb}`")
    assert _snapshot(out) == before


def test_an_empty_out_name_is_refused(tiny_dirs, tmp_path):
    for name in ("", "  "):
        result = _run(["layers", "-m", str(tiny_dirs["gpt2"]), "-t", "x", "-o", name])
        _one_line_error(result, "--out", "empty")


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o755), (0o027, 0o750), (0o077, 0o700)])
def test_directories_follow_the_users_umask(tiny_dirs, tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        out = tmp_path / "deep" / "run"
        assert _layers(tiny_dirs["gpt2"], out).exit_code == 0
    finally:
        os.umask(previous)
    for folder in (out, out.parent):
        assert stat.S_IMODE(folder.stat().st_mode) == mode, folder


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    return int(done.stdout)


def test_a_sigkilled_run_leaves_nothing_the_next_run_does_not_remove(tiny_dirs, tmp_path):
    """A real SIGKILL while the output is being assembled, then a rerun: the killed run's
    temporary directory is removed, and nothing but the finished output remains."""
    out = tmp_path / "run"
    code = (
        "import sys, time\n"
        "import residual_trace.runs as runs\n"
        "publish = runs.RunDir._publish\n"
        "def slow(self):\n"
        "    print('ASSEMBLED', flush=True)\n"
        "    time.sleep(60)\n"
        "    publish(self)\n"
        "runs.RunDir._publish = slow\n"
        "from residual_trace.cli import main\n"
        "main(sys.argv[1:])\n"
    )
    args = ["layers", "-m", str(tiny_dirs["gpt2"]), "-t", "Killed text.", "-o", str(out), "-q"]
    process = subprocess.Popen(
        [sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None
    assert process.stdout.readline().strip() == "ASSEMBLED"
    leftovers = list(tmp_path.glob(".run.tmp-*"))
    assert len(leftovers) == 1 and any(leftovers[0].iterdir())  # written, not published
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert not out.exists()
    result = _layers(tiny_dirs["gpt2"], out)
    assert result.exit_code == 0, result.output
    assert [p.name for p in tmp_path.iterdir()] == ["run"]
    # a leftover of a live process (another run in progress) is left alone
    live = tmp_path / f".run.tmp-{os.getpid()}-x"
    live.mkdir()
    stale = tmp_path / f".run.old-{_dead_pid()}-y"
    stale.mkdir()
    assert _layers(tiny_dirs["gpt2"], out, "--overwrite").exit_code == 0
    assert live.exists() and not stale.exists()


def test_ctrl_c_exits_with_130_and_writes_nothing(tiny_dirs, tmp_path):
    out = tmp_path / "run"
    code = (
        "import os, signal, sys\n"
        "import residual_trace.runs as runs\n"
        "def interrupt(self):\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "runs.RunDir._publish = interrupt\n"
        "from residual_trace.cli import main\n"
        "main(sys.argv[1:])\n"
    )
    args = ["layers", "-m", str(tiny_dirs["gpt2"]), "-t", "Interrupted.", "-o", str(out), "-q"]
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300,
        preexec_fn=ctrl_c_enabled,
    )  # fmt: skip
    assert done.returncode == 130, (done.returncode, done.stderr[-500:])
    assert "Traceback" not in done.stderr and "Aborted" in done.stderr
    assert list(tmp_path.iterdir()) == [], time.perf_counter() - start


# -- report ---------------------------------------------------------------------------


def _report(*args: str):
    return _run(["report", "--experiment", "layers", "--max-texts", "1", "-q", *args])


def test_a_report_checks_its_whole_configuration_before_writing(tiny_dirs, tmp_path):
    """An unresolvable second model fails before anything is written or run: no config.toml,
    no part of the first model."""
    out = tmp_path / "report"
    missing = str(tmp_path / "no-such-model")
    result = _report("-m", str(tiny_dirs["gpt2"]), "-m", missing, "-o", str(out))
    _one_line_error(result, "no-such-model")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_a_report_resumes_refuses_strangers_and_starts_afresh_on_overwrite(tiny_dirs, tmp_path):
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "data.csv").write_text("mine")
    for extra in ((), ("--overwrite",)):
        result = _report("-m", str(tiny_dirs["gpt2"]), "-o", str(stranger), *extra)
        _one_line_error(result, "not a report")
    assert _snapshot(stranger) == {"data.csv": b"mine"}

    out = tmp_path / "report"
    assert _report("-m", str(tiny_dirs["gpt2"]), "-o", str(out)).exit_code == 0
    (out / "stale.txt").write_text("left by hand")
    drift = next(out.glob("runs/*/layers/drift.csv"))
    stamp = drift.stat().st_mtime_ns
    assert _report("-m", str(tiny_dirs["gpt2"]), "-o", str(out)).exit_code == 0  # resumes
    assert drift.stat().st_mtime_ns == stamp  # the finished part was read back, not rerun
    result = _report("-m", str(tiny_dirs["gpt2"]), "-o", str(out), "--overwrite")
    assert result.exit_code == 0, result.output
    assert not (out / "stale.txt").exists()
    assert next(out.glob("runs/*/layers/drift.csv")).stat().st_mtime_ns != stamp
    # resumed with other experiments: nothing of the dropped one survives
    result = _run(
        ["report", "--experiment", "decompose", "--max-texts", "1", "-q", "-m",
         str(tiny_dirs["gpt2"]), "-o", str(out)]
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert not list(out.glob("runs/*/layers")) and list(out.glob("runs/*/decompose/run.json"))
    record = json.loads((out / "run.json").read_text())
    written = {str(p.relative_to(out)) for p in (out / "figures").iterdir()}
    written |= {str(p.relative_to(out)) for p in (out / "tables").iterdir()}
    assert "figures/drift.png" not in written and "figures/mixing.png" in written
    assert [p["experiment"] for p in record["parts"]] == ["decompose"]


def test_the_default_out_of_two_runs_in_one_second_differs(tmp_path):
    from residual_trace.runs import default_out

    first = default_out("minilm", root=tmp_path)
    first.mkdir()
    (first / "run.json").write_text("{}")
    second = default_out("minilm", root=tmp_path)
    assert second != first and not second.exists()
    assert second.name.startswith("minilm-")
