"""The fault suite, the Ray engine: an address with no cluster behind it fails in seconds
with one line (before any model loads), and a Ray run that is killed (SIGKILL of the
driver, of the driver and its reaper, or Ctrl-C to the whole process group) leaves no
process and no file behind, at once or at the latest when the next run starts.

Everything runs on the loopback interface: the "clusters" that are not Ray are servers
started here (a closed port, a web server, a listener that never answers, an HTTP/2 server
that answers 404 as a proxy does)."""

from __future__ import annotations

import contextlib
import http.server
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

import residual_trace as rt
from residual_trace.cli import trace
from residual_trace.errors import UserError
from residual_trace.experiments import ray_guard
from residual_trace.experiments.engine import STALL_SHARD_ENV

TEXTS = ["The dog ran.", "A cat sat.", "Rain fell.", "Birds sang at dawn."]

#: The bound a test holds an address check to: two probe steps and start-up, generously.
BOUND_S = 2 * ray_guard.PROBE_TIMEOUT_S + 5


def _layers(tiny_dirs, text: str) -> list[str]:
    return ["layers", "--model", str(tiny_dirs["bert"]), "--text", text]


def _on_ray_at(tiny_dirs, address: str, out: Path, *more: str):
    """``trace layers`` on the tiny BERT with ``--engine ray --ray-address address``."""
    args = [*_layers(tiny_dirs, "The dog ran."), "--engine", "ray", "--ray-address", address]
    return CliRunner().invoke(trace, [*args, "--out", str(out), *more])


# -- servers that are not a Ray cluster ------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _QuietHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, format, *args):
        pass


@contextlib.contextmanager
def _web_server() -> Iterator[int]:
    server = http.server.HTTPServer(("127.0.0.1", 0), _QuietHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def _silent_listener() -> Iterator[int]:
    """Accepts connections (the kernel's backlog) and never says a word."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield sock.getsockname()[1]


@contextlib.contextmanager
def _http2_404() -> Iterator[int]:
    """Answers every HTTP/2 request with status 404, as a transparent proxy does."""
    settings = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
    headers_404 = b"\x00\x00\x01\x01\x05\x00\x00\x00\x01\x8d"  # HEADERS, :status 404
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    stop = threading.Event()

    def serve() -> None:
        sock.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(2)
                with contextlib.suppress(OSError):
                    conn.recv(4096)
                    conn.sendall(settings + headers_404)
                    time.sleep(0.2)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield sock.getsockname()[1]
    finally:
        stop.set()
        thread.join()
        sock.close()


@contextlib.contextmanager
def _not_ray(kind: str) -> Iterator[str]:
    if kind == "closed port":
        yield f"127.0.0.1:{_closed_port()}"
    elif kind == "web server":
        with _web_server() as port:
            yield f"127.0.0.1:{port}"
    elif kind == "silent listener":
        with _silent_listener() as port:
            yield f"127.0.0.1:{port}"
    elif kind == "http2 404 (a proxy)":
        with _http2_404() as port:
            yield f"127.0.0.1:{port}"
    elif kind == "ray client, closed":
        yield f"ray://127.0.0.1:{_closed_port()}"
    else:
        raise AssertionError(kind)


KINDS = [
    "closed port",
    "web server",
    "silent listener",
    "http2 404 (a proxy)",
    "ray client, closed",
]


@pytest.mark.parametrize("kind", KINDS)
def test_an_address_with_no_ray_cluster_fails_in_one_line_within_the_bound(
    kind, tiny_dirs, tmp_path
):
    out = tmp_path / "out"
    with _not_ray(kind) as address:
        start = time.monotonic()
        result = _on_ray_at(tiny_dirs, address, out, "--quiet")
        took = time.monotonic() - start
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith("Error: ray_address (--ray-address)"), lines[0]
    assert "no Ray cluster there" in lines[0] and address in lines[0]
    assert "Traceback" not in result.output
    assert took < BOUND_S, f"{kind}: {took:.1f} s"
    assert not out.exists() and not list(tmp_path.iterdir())  # nothing written, no lock


def test_the_api_refuses_such_an_address_before_loading_the_model(tiny_dirs):
    loaded = []

    def loader():
        loaded.append(1)
        return rt.load_model(str(tiny_dirs["bert"]), device="cpu")

    with _http2_404() as port, pytest.raises(UserError, match="HTTP status 404"):
        rt.layers(loader, ["The dog ran."], engine="ray", ray_address=f"127.0.0.1:{port}")
    assert not loaded


@pytest.mark.parametrize(
    ("address", "message"),
    [
        ("nowhere", "expected HOST:PORT"),
        ("127.0.0.1:70000", "port 70000 is not between 1 and 65535"),
        ("host:port", "expected HOST:PORT"),
        ("no-such-host.invalid:6379", "cannot resolve host"),
    ],
)
def test_a_malformed_address_is_named(address, message, tiny_dirs, tmp_path):
    result = _on_ray_at(tiny_dirs, address, tmp_path / "o")
    assert result.exit_code == 1 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1


# -- a killed Ray run -------------------------------------------------------------------------


def _marked(driver: int) -> list[int]:
    """Live processes that carry the owner mark of ``driver`` (Linux: /proc)."""
    found = []
    prefix = f"{ray_guard.OWNER_ENV}={driver}-".encode()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            data = Path(f"/proc/{name}/environ").read_bytes()
        except OSError:
            continue
        if any(item.startswith(prefix) for item in data.split(b"\0")):
            found.append(int(name))
    return found


def _leftovers(out: Path, driver: int) -> list[str]:
    """Files a run of ``driver`` into ``out`` may leave: its temporary siblings (the spool
    included) and its Ray temporary directory."""
    beside = [p.name for p in out.parent.glob(f".{out.name}.tmp-{driver}-*")]
    ray_temp = [p.name for p in ray_guard.temp_root().glob(f"{ray_guard.TEMP_PREFIX}{driver}-*")]
    return beside + ray_temp


def _start_stalled(tiny_dirs, tmp_path: Path, out: Path) -> tuple[subprocess.Popen, Path]:
    """A Ray run (2 workers, 4 shards) whose shard 1 stalls; returns once it stalls."""
    marker = tmp_path / "stalled"
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(TEXTS) + "\n")
    env = dict(os.environ, **{STALL_SHARD_ENV: f"1:{marker}"})
    command = [sys.executable, "-m", "residual_trace.cli", "layers"]
    command += ["--model", str(tiny_dirs["bert"]), "--file", str(texts), "--batch-size", "1"]
    command += ["--engine", "ray", "--workers", "2", "--out", str(out)]
    process = subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group, as a shell's foreground job
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 240
    while not marker.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            _, err = process.communicate()
            pytest.fail(f"the Ray run did not reach its stalled shard: {err.decode()[-2000:]}")
        time.sleep(0.1)
    return process, marker


def _wait_until(condition, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return condition()


def _reapers(driver: int) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        with contextlib.suppress(OSError):
            argv = Path(f"/proc/{name}/cmdline").read_bytes().split(b"\0")
            if any(a.endswith(b"ray_guard.py") for a in argv) and any(
                a.startswith(f"{driver}-".encode()) for a in argv
            ):
                found.append(int(name))
    return found


def test_sigkill_of_the_driver_leaves_no_process_and_no_file(tiny_dirs, tmp_path):
    out = tmp_path / "run"
    process, _ = _start_stalled(tiny_dirs, tmp_path, out)
    driver = process.pid
    assert _marked(driver), "the local Ray's processes carry the owner mark"
    assert _leftovers(out, driver), "the run's spool and Ray directory exist while it runs"
    process.send_signal(signal.SIGKILL)
    process.wait()
    # the reaper ends every process of this Ray instance and removes its directories
    assert _wait_until(lambda: not _marked(driver), within=ray_guard.REAP_S + 5), _marked(driver)
    assert _wait_until(lambda: not _leftovers(out, driver), within=5), _leftovers(out, driver)
    assert not out.exists()
    # the claim died with the driver: the same command runs again into the same --out
    again = CliRunner().invoke(
        trace,
        [*_layers(tiny_dirs, "Rain fell."), "--out", str(out), "--quiet"],
    )
    assert again.exit_code == 0, again.output
    assert (out / "run.json").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_when_the_reaper_dies_too_the_next_ray_run_removes_what_was_left(tiny_dirs, tmp_path):
    out = tmp_path / "run"
    process, marker = _start_stalled(tiny_dirs, tmp_path, out)
    driver = process.pid
    reapers = _reapers(driver)
    assert len(reapers) == 1, reapers
    os.kill(reapers[0], signal.SIGKILL)
    process.send_signal(signal.SIGKILL)
    process.wait()
    time.sleep(1)
    assert _leftovers(out, driver), "with no reaper, the spool stays until the next run"
    # the next Ray run into the same --out: clean_stale removes the spool, the sweep the
    # Ray directory and any process that still carries the dead driver's mark
    marker.unlink()
    rerun = subprocess.run(
        [
            sys.executable,
            "-m",
            "residual_trace.cli",
            *_layers(tiny_dirs, "Rain fell."),
            "--engine",
            "ray",
            "--workers",
            "1",
            "--out",
            str(out),
            "--quiet",
            "--overwrite",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert rerun.returncode == 0, rerun.stderr
    assert not _leftovers(out, driver), _leftovers(out, driver)
    assert not _marked(driver)
    assert (out / "run.json").is_file()


def test_ctrl_c_to_the_process_group_exits_130_and_leaves_nothing(tiny_dirs, tmp_path):
    out = tmp_path / "run"
    process, _ = _start_stalled(tiny_dirs, tmp_path, out)
    driver = process.pid
    os.killpg(driver, signal.SIGINT)  # what a terminal's Ctrl-C sends: the whole group
    _, err = process.communicate(timeout=60)
    message = err.decode().strip().splitlines()
    assert process.returncode == 130, err.decode()
    assert message and message[-1].startswith("Aborted: interrupted"), err.decode()
    assert "Traceback" not in err.decode()
    assert _wait_until(lambda: not _marked(driver), within=ray_guard.REAP_S + 5), _marked(driver)
    assert not _leftovers(out, driver)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
