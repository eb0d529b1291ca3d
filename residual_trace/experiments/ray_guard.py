"""What the Ray engine does so that a Ray run fails fast and leaves nothing behind.

Three parts, standard library only (this file also runs on its own as the reaper process):

* :func:`parse_address` and :func:`probe`: a ``--ray-address`` is checked before Ray is
  asked to join it. The address must read ``HOST:PORT`` (or ``ray://HOST[:PORT]``, or
  ``auto``); a TCP connection to it must open within :data:`PROBE_TIMEOUT_S`; and what
  answers must answer a gRPC call (HTTP/2, status 200), as a Ray GCS does, within
  :data:`PROBE_TIMEOUT_S` again. Ray itself retries an address for about 20 s, flooding
  stderr, and a network proxy that accepts every connection would pass a plain TCP check.
* :class:`LocalRay`: a local Ray instance started for one command is tied to that
  command's process. Its root temporary directory is ``<tmp>/rt-ray-<pid>-XXXXXXXX`` (short:
  Ray's socket paths must fit in 107 bytes), every process it starts carries
  ``RESIDUAL_TRACE_RAY_OWNER=<pid>-<nonce>`` in its environment, and it starts with SIGINT
  blocked, so that a Ctrl-C sent to the whole process group reaches the driver only (which
  then stops Ray itself). A small *reaper* process (this file, run with ``python -I``, in a
  session of its own) waits on a pipe from the driver; when the pipe closes (the driver
  ended, however: SIGKILL included) it kills every process that carries the owner mark and
  removes the temporary directories. Ray already kills its GCS and raylet when the driver
  dies (``PR_SET_PDEATHSIG``) and its workers follow the raylet, but its agent processes
  (``ray::DashboardAgent``, ``ray::RuntimeEnvAgent``) outlive a SIGKILLed driver by about a
  minute; the reaper ends them at once.
* :func:`sweep`: the next Ray run removes what a run whose reaper was killed too left
  behind: temporary directories of dead processes, and processes that carry the owner mark
  of a dead driver.

The owner marks are read from ``/proc/<pid>/environ`` (Linux); elsewhere the reaper and the
sweep only remove directories, and Ray's own reaper (started where the kernel offers no fate
sharing) stops its processes.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "OWNER_ENV",
    "PROBE_TIMEOUT_S",
    "AddressError",
    "LocalRay",
    "check",
    "parse_address",
    "probe",
    "sweep",
]

#: The environment mark of every process a local Ray run starts: ``<driver pid>-<nonce>``.
OWNER_ENV = "RESIDUAL_TRACE_RAY_OWNER"

#: Seconds for each of the two checks of an address (TCP connect, HTTP/2 answer).
PROBE_TIMEOUT_S = 5.0

#: The port of ``ray://HOST`` (Ray Client) when none is given.
RAY_CLIENT_PORT = 10001

#: Prefix of a local run's Ray temporary directory: ``rt-ray-<pid>-XXXXXXXX``.
TEMP_PREFIX = "rt-ray-"

#: How long the reaper keeps looking for marked processes after the driver is gone.
REAP_S = 10.0

#: HTTP/2: the client connection preface and an empty SETTINGS frame.
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
_H2_SETTINGS = 0x4


#: ``[V6]:PORT`` or ``HOST:PORT`` (the port optional here; ``ray://`` has a default).
_ADDRESS = re.compile(r"\[([0-9A-Fa-f:.]+)\](?::([0-9]{1,5}))?|([^\s:/\[\]]+)(?::([0-9]{1,5}))?")
_EXPECTED = "expected HOST:PORT (e.g. 127.0.0.1:6379), ray://HOST:PORT or auto"


class AddressError(Exception):
    """An address that cannot be a Ray cluster's; the message says why (one line)."""


def parse_address(address: str) -> tuple[str, str, int]:
    """``(scheme, host, port)`` of ``HOST:PORT``, ``[V6]:PORT`` or ``ray://HOST[:PORT]``.

    Examples:
        >>> parse_address("127.0.0.1:6379")
        ('', '127.0.0.1', 6379)
        >>> parse_address("ray://head:10002"), parse_address("ray://[::1]")
        (('ray://', 'head', 10002), ('ray://', '::1', 10001))
        >>> try:
        ...     parse_address("nowhere")
        ... except AddressError as error:
        ...     print(error)
        expected HOST:PORT (e.g. 127.0.0.1:6379), ray://HOST:PORT or auto
    """
    text = address.strip()
    scheme = "ray://" if text.startswith("ray://") else ""
    rest = text[len(scheme) :]
    match = _ADDRESS.fullmatch(rest)
    if match is None:
        raise AddressError(_EXPECTED)
    host = match.group(1) or match.group(3)
    port_text = match.group(2) or match.group(4)
    if port_text is None:
        if not scheme:
            raise AddressError(_EXPECTED)
        port_text = str(RAY_CLIENT_PORT)
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise AddressError(f"port {port} is not between 1 and 65535")
    return scheme, host, port


def probe(host: str, port: int, timeout: float = PROBE_TIMEOUT_S, http2: bool = True) -> None:
    """Raise :class:`AddressError` unless ``host:port`` accepts a TCP connection in time.

    The connection must open within ``timeout`` seconds and, with ``http2``, a gRPC call must
    then be answered within ``timeout`` seconds more with HTTP status 200, as every gRPC
    server (a Ray GCS) does.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as error:
        raise AddressError(f"cannot resolve host {host!r} ({_reason(error)})") from None
    deadline = time.monotonic() + timeout
    last: OSError | None = None
    for family, kind, proto, _, where in infos:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(left)
            sock.connect(where)
        except OSError as error:
            sock.close()
            last = error
            continue
        with sock:
            if http2:
                _check_http2(sock, timeout, host)
        return
    if last is None or isinstance(last, TimeoutError):
        raise AddressError(f"no answer within {timeout:g} s (connect timed out)")
    raise AddressError(f"cannot connect ({_reason(last)})")


def check(address: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Raise :class:`AddressError` unless ``address`` leads to a gRPC server in time.

    ``address`` is ``HOST:PORT`` or ``ray://HOST[:PORT]``; the server must answer within
    ``2 * timeout`` seconds (see :func:`probe`). With ``RAY_USE_TLS`` set, only the TCP
    connection is checked.
    """
    _, host, port = parse_address(address)
    tls = os.environ.get("RAY_USE_TLS", "").strip().lower() in ("1", "true")
    probe(host, port, timeout, http2=not tls)


def _frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    """One HTTP/2 frame (RFC 9113, section 4.1)."""
    head = len(payload).to_bytes(3, "big") + bytes((kind, flags)) + stream.to_bytes(4, "big")
    return head + payload


def _literal(name_index: int, value: str, name: str = "") -> bytes:
    """An HPACK literal header field without indexing and without Huffman coding.

    As in RFC 7541, section 6.2.2; a name index above 14 takes the 4-bit prefix's
    continuation byte.
    """
    head = bytes((name_index,)) if name_index < 15 else bytes((15, name_index - 15))
    if name:
        head += bytes((len(name),)) + name.encode("ascii")
    return head + bytes((len(value),)) + value.encode("ascii")


def _grpc_request(host: str) -> bytes:
    """A unary gRPC call of a method every Ray GCS serves, with an empty message."""
    block = (
        b"\x83\x86"  # :method POST, :scheme http (static table entries 3 and 6)
        + _literal(4, "/ray.rpc.NodeInfoGcsService/GetClusterId")  # :path
        + _literal(1, host[:100])  # :authority
        + _literal(31, "application/grpc")  # content-type
        + _literal(0, "trailers", name="te")
    )
    return (
        _H2_PREFACE
        + _frame(0x1, 0x4, 1, block)  # HEADERS, END_HEADERS
        + _frame(0x0, 0x1, 1, b"\x00\x00\x00\x00\x00")  # DATA, END_STREAM: an empty message
    )


#: HPACK's static table entries 8 to 14 are ``:status`` with these values.
_STATIC_STATUS = {8: "200", 9: "204", 10: "206", 11: "304", 12: "400", 13: "404", 14: "500"}


def _status(block: bytes) -> str | None:
    """The ``:status`` a response's header block opens with, or ``None``.

    The status is read only where it can be without a Huffman decoder (``None``: it cannot;
    every gRPC server sends it as the indexed ``0x88``).
    """
    if not block:
        return None
    first = block[0]
    if first & 0x80:
        return _STATIC_STATUS.get(first & 0x7F)
    name = first & (0x3F if first & 0x40 else 0x0F)
    if name not in _STATIC_STATUS or len(block) < 2 or block[1] & 0x80:
        return None
    size = block[1] & 0x7F
    return block[2 : 2 + size].decode("ascii", "replace")


def _read_frame(sock: socket.socket) -> tuple[int, int, int, bytes] | None:
    header = _read_exactly(sock, 9)
    if header is None:
        return None
    size = int.from_bytes(header[:3], "big")
    payload = _read_exactly(sock, size) if size else b""
    if payload is None:
        return None
    return header[3], header[4], int.from_bytes(header[5:9], "big") & 0x7FFFFFFF, payload


def _read_exactly(sock: socket.socket, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def _check_http2(sock: socket.socket, timeout: float, host: str = "localhost") -> None:
    """Raise :class:`AddressError` unless what answers on ``sock`` is a gRPC server.

    A gRPC server answers the HTTP/2 preface with SETTINGS and a gRPC call with HTTP status
    200 (even for a method it does not serve: gRPC reports that in its own status). A web
    server, or a proxy that accepts every connection and answers 404, is not a Ray cluster.
    """
    deadline = time.monotonic() + timeout
    try:
        sock.sendall(_grpc_request(host))
        frames = 0
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            sock.settimeout(left)
            frame = _read_frame(sock)
            if frame is None:
                break
            kind, flags, stream, payload = frame
            if frames == 0 and kind != _H2_SETTINGS:
                break
            frames += 1
            if kind == 0x7:  # GOAWAY: the server refused the call
                break
            if kind == 0x1 and stream == 1:  # HEADERS of the response
                if flags & 0x8:  # PADDED
                    payload = payload[1 : len(payload) - payload[0]]
                if flags & 0x20:  # PRIORITY
                    payload = payload[5:]
                status = _status(payload)
                if status is not None and status != "200":
                    raise AddressError(
                        f"what answers there speaks HTTP/2 but returns HTTP status {status} "
                        "to a Ray GCS call: not a Ray cluster (a proxy, or another service)"
                    )
                return
    except TimeoutError:
        raise AddressError(
            f"a TCP connection opens, but nothing answers a gRPC call within {timeout:g} s: "
            "not a Ray cluster's GCS port"
        ) from None
    except OSError as error:
        raise AddressError(f"the connection failed ({_reason(error)})") from None
    raise AddressError(
        "something listens there, but it does not speak gRPC: not a Ray cluster's GCS port"
    )


def _reason(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:
        return error.strerror.lower() if error.strerror[:1].isupper() else error.strerror
    return str(error) or type(error).__name__


# -- local Ray tied to the driver ------------------------------------------------------------


def temp_root() -> Path:
    """Where a local Ray's temporary directory goes.

    That is the system's temporary directory, or ``/tmp`` when that path is so long that
    Ray's socket paths would not fit.
    """
    root = Path(tempfile.gettempdir())
    if len(str(root)) > 40 and os.access("/tmp", os.W_OK):
        root = Path("/tmp")
    return root


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _marked() -> Iterator[tuple[int, str]]:
    """``(pid, owner mark)`` of every process this user may read that carries a mark."""
    entry = OWNER_ENV.encode() + b"="
    try:
        names = os.listdir("/proc")
    except OSError:
        return
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as handle:
                data = handle.read()
        except OSError:
            continue
        for item in data.split(b"\0"):
            if item.startswith(entry):
                yield int(name), item[len(entry) :].decode("ascii", "replace")
                break


def marked_processes(mark: str) -> list[int]:
    """The pids of the live processes that carry ``mark``."""
    return [pid for pid, found in _marked() if found == mark and pid != os.getpid()]


def _kill_marked(mark: str, within: float = REAP_S) -> None:
    """SIGKILL every process carrying ``mark`` until none is found twice in a row."""
    deadline = time.monotonic() + within
    quiet = 0
    while quiet < 2 and time.monotonic() < deadline:
        pids = marked_processes(mark)
        quiet = 0 if pids else quiet + 1
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)


def _owner_pid(mark: str) -> int | None:
    head = mark.split("-", 1)[0]
    return int(head) if head.isdigit() else None


def sweep() -> None:
    """Remove what local Ray runs of dead processes left.

    That is their temporary directories and any process that still carries the mark of a
    dead driver.
    """
    root = temp_root()
    with contextlib.suppress(OSError):
        for path in root.glob(f"{TEMP_PREFIX}*"):
            head = path.name[len(TEMP_PREFIX) :].split("-", 1)[0]
            if head.isdigit() and not _alive(int(head)):
                shutil.rmtree(path, ignore_errors=True)
    for pid, mark in list(_marked()):
        owner = _owner_pid(mark)
        if owner is not None and owner != os.getpid() and not _alive(owner):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


class LocalRay:
    """One local Ray instance's tie to the driver.

    The tie is a temporary directory, an owner mark and a reaper (see the module docstring).
    Use :meth:`starting` around ``ray.init`` and call :meth:`close` after ``ray.shutdown``;
    ``remove`` are more paths the reaper removes.
    """

    def __init__(self, remove: tuple[Path, ...] = (), keep_temp: bool = False) -> None:
        """Prepare (not start) a local Ray whose files and processes go with it."""
        self.mark = f"{os.getpid()}-{secrets.token_hex(6)}"
        self.temp_dir: Path | None = None
        if not keep_temp:
            self.temp_dir = Path(
                tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-", dir=temp_root())
            )
        paths = [str(p) for p in (self.temp_dir, *remove) if p is not None]
        self._reaper: subprocess.Popen[bytes] | None = None
        try:
            self._reaper = subprocess.Popen(
                [sys.executable, "-I", os.path.abspath(__file__), self.mark, *paths],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,  # neither Ctrl-C nor a group kill reaches it
                close_fds=True,
            )
        except OSError:
            self._reaper = None  # no reaper: Ray's own fate sharing, and the next sweep

    @contextlib.contextmanager
    def starting(self) -> Iterator[None]:
        """While Ray starts its processes: they get the owner mark and SIGINT blocked."""
        before = os.environ.get(OWNER_ENV)
        os.environ[OWNER_ENV] = self.mark
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            yield
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            if before is None:
                os.environ.pop(OWNER_ENV, None)
            else:
                os.environ[OWNER_ENV] = before

    def close(self, wait: float = REAP_S) -> None:
        """Let the reaper end what is left of this Ray instance and remove its directories.

        Call it after ``ray.shutdown``; it waits up to ``wait`` seconds for the reaper.
        """
        reaper, self._reaper = self._reaper, None
        if reaper is None:
            _kill_marked(self.mark, within=1.0)
            if self.temp_dir is not None:
                shutil.rmtree(self.temp_dir, ignore_errors=True)
            return
        with contextlib.suppress(OSError):
            if reaper.stdin is not None:
                reaper.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            reaper.wait(wait)  # past that, it goes on alone, in its own session


def _reap(argv: list[str]) -> None:
    """The reaper: wait for the driver to close the pipe (or die), then clean up."""
    for name in ("SIGINT", "SIGHUP", "SIGTERM"):
        with contextlib.suppress(OSError, ValueError):
            signal.signal(getattr(signal, name), signal.SIG_IGN)
    mark, paths = argv[0], argv[1:]
    with contextlib.suppress(OSError):
        while sys.stdin.buffer.read(4096):
            pass
    _kill_marked(mark)
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    _reap(sys.argv[1:])
