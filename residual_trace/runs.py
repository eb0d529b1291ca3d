"""Run directories that never hold half-written outputs, and the ``run.json`` beside them.

Everything is written into a hidden temporary sibling of ``--out`` and moved into place
only when the run completes; a crash or Ctrl-C removes the temporary directory, and the
next run removes what a killed one (SIGKILL) left behind. An existing, non-empty ``--out``
is refused unless ``overwrite``, which replaces it wholly (no file of the earlier run
survives), and only when it is an earlier output of the same command. Directories get the
permissions the user's umask gives, like any directory the user creates.

Two runs never share an ``--out`` unnoticed: a run holds a :class:`Claim` on its output
(an ``flock`` on ``.<out>.lock`` beside it, which the system releases when the process
ends, even by SIGKILL) from its start, so a second run into the same ``--out`` is refused
at once; and the publishing rename itself fails when ``--out`` has filled meanwhile, so the
check holds at publish time too. A fault of the machine while writing (a full disk, a
file-size limit, a permission) is one line naming the file, the setting and the OS error.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable
from importlib import metadata
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar

from residual_trace.errors import UserError, write_fault

if TYPE_CHECKING:  # pandas and matplotlib load only where a table or figure is written
    import pandas as pd
    from matplotlib.figure import Figure

_VERSIONED = (
    "residual-trace",
    "torch",
    "transformer-lens",
    "transformers",
    "numpy",
    "pandas",
    "seaborn",
    "matplotlib",
)


def package_versions() -> dict[str, str]:
    """The versions of Python and of the packages whose numbers a run depends on."""
    versions = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def default_out(model: str, root: Path = Path("runs"), skip: int = 0) -> Path:
    """``runs/<model>-<UTC timestamp>``, with the model name made path-safe.

    Never an existing directory (a second run in the same second gets ``-2``, and so on), and
    past the first ``skip`` free names (those another run has claimed).
    """
    slug = "".join(c if c.isalnum() or c in "-_." else "-" for c in Path(model).name or model)
    stamp = _dt.datetime.now(_dt.UTC).strftime("%Y%m%d-%H%M%S")
    base = root / f"{slug.strip('-.') or 'model'}-{stamp}"
    out, n = base, 1
    while out.exists() or skip > 0:  # two runs in the same second: never the earlier one's
        skip -= 0 if out.exists() else 1
        n += 1
        out = base.with_name(f"{base.name}-{n}")
    return out


def texts_sha256(texts: Iterable[str]) -> str:
    """SHA-256 of the texts, in order (what ``run.json`` records of the inputs)."""
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8") + b"\n")
    return digest.hexdigest()


def written_by(folder: Path) -> str | None:
    """The command recorded in ``folder/run.json`` (``None`` when there is none)."""
    try:
        record = json.loads((folder / "run.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    command = record.get("command") if isinstance(record, dict) else None
    return command if isinstance(command, str) else None


def check_out(out: Path, command: str | None = None, overwrite: bool = False) -> None:
    """Fail early (before a model loads) when ``out`` cannot be ``command``'s output directory.

    That is when it is not a directory, not writable, or already holding files (unless
    ``overwrite``, and then only files an earlier run of the same command wrote).
    """
    out = Path(out)
    if str(out) == "":
        raise UserError("--out: give a directory name")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise UserError(
                f"--out {out} already holds files: give --overwrite to replace them, or "
                "another --out"
            )
        found = written_by(out)
        if command is not None and found != command:
            what = f"`trace {found}`" if found else "no residual-trace run"
            raise UserError(
                f"--out {out} holds the output of {what}, not of `trace {command}`: "
                "--overwrite only replaces an earlier output of the same command"
            )
    check_writable(out.parent, out)  # the run is assembled beside out, then renamed


def check_writable(folder: Path, out: Path | None = None) -> None:
    """Fail when the nearest existing directory at or above ``folder`` is not writable.

    ``out`` is the ``--out`` named in the message (``folder`` by default).
    """
    out = Path(folder) if out is None else Path(out)
    parent = Path(folder)
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"cannot write to --out {out}: {parent} is not a writable directory")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def clean_stale(out: Path) -> None:
    """Remove the temporary siblings of ``out`` that a killed run left behind.

    A killed run is one whose process is gone; its siblings are ``.<name>.tmp-<pid>-*`` and
    ``.<name>.old-<pid>-*``.
    """
    out = Path(out)
    if not out.parent.is_dir():
        return
    for kind in ("tmp", "old"):
        for path in out.parent.glob(f".{out.name}.{kind}-*"):
            pid = path.name[len(f".{out.name}.{kind}-") :].split("-", 1)[0]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(path, ignore_errors=True)


class OutBusy(UserError):
    """Another live process holds the claim on an output directory."""


class Claim:
    """An exclusive claim on one output directory, held by one process for one run.

    The claim is an ``flock`` on ``.<name>.lock`` beside ``out``: the system releases it
    when the process ends, however it ends (SIGKILL included), so a claim can never be
    left stale; the lock file itself is removed on :meth:`release` (a killed run's empty
    lock file is reused and then removed by the next run). Claims are re-entrant within a
    process: the command line claims ``--out`` at its start and the result's ``save`` finds
    the claim already held.

    Examples:
        >>> import tempfile, pathlib
        >>> out = pathlib.Path(tempfile.mkdtemp()) / "run"
        >>> with Claim(out):
        ...     Claim.holder(out) is None  # ours: no other process holds it
        True
    """

    _held: ClassVar[dict[str, Claim]] = {}

    def __init__(self, out: Path, setting: str = "--out") -> None:
        """Claim ``out`` (named in messages as ``setting``) against other runs."""
        self.out = Path(out)
        self.setting = setting
        self.lock = self.out.parent / f".{self.out.name}.lock"
        self._fd: int | None = None
        self._depth = 0
        self._created: list[Path] = []
        key = _key(self.out)
        held = Claim._held.get(key)
        if held is not None:  # this process holds it already: share it
            self._shared: Claim | None = held
            held._depth += 1
            return
        self._shared = None
        busy = self._acquire()
        if busy is not None:
            self._remove_created()
            owner = f" (pid {busy})" if busy else ""
            raise OutBusy(
                f"{setting} {self.out}: another run{owner} is writing it now; wait for it to "
                f"finish, or choose another {setting}"
            )
        self._depth = 1
        Claim._held[key] = self

    @staticmethod
    def holder(out: Path) -> int | None:
        """The pid of *another* process holding a claim on ``out`` (0 when unknown).

        ``None`` when no other process does.
        """
        out = Path(out)
        if _key(out) in Claim._held:
            return None
        lock = out.parent / f".{out.name}.lock"
        try:
            fd = os.open(lock, os.O_RDONLY)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_pid(fd)
        except OSError:
            return None
        finally:
            os.close(fd)
        return None

    def _acquire(self) -> int | None:
        """Take the lock; ``None`` on success, else the holder's pid (0 when unknown)."""
        try:
            self._created = _mkdirs(self.out.parent)
            for _ in range(20):  # a lock file removed under us: open the new one
                fd = os.open(self.lock, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    pid = _read_pid(fd)
                    os.close(fd)
                    return pid
                try:
                    same = os.fstat(fd).st_ino == os.stat(self.lock).st_ino
                except FileNotFoundError:
                    same = False
                if same:
                    os.ftruncate(fd, 0)
                    os.write(fd, f"{os.getpid()}\n".encode())
                    self._fd = fd
                    return None
                os.close(fd)
        except OSError as error:
            self._remove_created()
            raise write_fault(error, f"{self.setting} {self.out}", self.lock) from None
        raise UserError(f"{self.setting} {self.out}: could not lock {self.lock}")

    def release(self) -> None:
        """Let go of the claim (the last holder in this process removes the lock file)."""
        if self._shared is not None:
            self._shared._depth -= 1
            self._shared = None
            return
        self._depth -= 1
        if self._depth > 0 or self._fd is None:
            return
        Claim._held.pop(_key(self.out), None)
        with contextlib.suppress(OSError):
            self.lock.unlink()
        os.close(self._fd)
        self._fd = None
        self._remove_created()

    def _remove_created(self) -> None:
        """Remove the parent directories this claim made, if nothing was put in them."""
        for folder in reversed(self._created):
            try:
                folder.rmdir()
            except OSError:
                break
        self._created = []

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def claim_out(
    out: Path | None,
    default_name: str,
    overwrite: bool,
    warn: Callable[[str], None],
    replace_busy: bool = True,
) -> tuple[Path, Claim | None]:
    """The output directory of a command and its claim, taken at the command's start.

    ``out=None`` picks ``runs/<default_name>-<UTC time>`` and, when another run started in
    the same second holds that name, the next free one: a default never collides. A given
    ``out`` another run holds is refused, unless ``overwrite`` and ``replace_busy``: then
    this run goes on unclaimed, ``warn`` says that its output will replace the other's, and
    the publish replaces whatever is there when it finishes.
    """
    if out is None:
        for skip in range(1000):
            candidate = default_out(default_name, skip=skip)
            try:
                return candidate, Claim(candidate)
            except OutBusy:
                continue
        raise UserError(f"could not find a free default --out for {default_name}: give --out")
    holder = Claim.holder(out)
    if overwrite and replace_busy and holder is not None:
        owner = f" (pid {holder})" if holder else ""
        warn(
            f"note: another run{owner} is writing --out {out}; with --overwrite, this run's "
            "output replaces it when this run finishes"
        )
        return out, None
    return out, Claim(out)


def _key(out: Path) -> str:
    return os.path.abspath(out)


def _read_pid(fd: int) -> int:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return 0
    return int(text) if text.isdigit() else 0


def _mkdirs(folder: Path) -> list[Path]:
    """``mkdir -p`` with the user's umask; returns the directories it made, outermost first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    made = []
    for path in reversed(missing):
        with contextlib.suppress(FileExistsError):
            path.mkdir()
            made.append(path)
    return made


class RunDir:
    """A context manager: write into :attr:`tmp`, get everything in ``out`` on success.

    ``out`` must be new or empty unless ``overwrite`` (see :func:`check_out`); with it,
    ``out`` is replaced as a whole when the run completes, and ``warn`` is told so. The
    check holds at publish time too: when another run filled ``out`` meanwhile, publishing
    fails (without ``overwrite``) instead of discarding either result silently. An OS error
    while writing (a full disk, a file-size limit) is a :class:`UserError` naming the file,
    ``--out`` and the error; the temporary directory is removed.

    Examples:
        >>> import tempfile, pathlib
        >>> root = pathlib.Path(tempfile.mkdtemp())
        >>> with RunDir(root / "run") as run:
        ...     _ = (run.tmp / "a.txt").write_text("done")
        >>> sorted(p.name for p in (root / "run").iterdir())
        ['a.txt']
    """

    def __init__(
        self,
        out: Path,
        command: str | None = None,
        overwrite: bool = False,
        warn: Callable[[str], None] | None = None,
    ) -> None:
        """Prepare a run directory for ``out`` (nothing is written until entered)."""
        self.out = Path(out)
        self.command = command
        self.overwrite = overwrite
        self.warn = warn
        check_out(self.out, command, overwrite)
        self.claim: Claim | None = None
        if not overwrite or Claim.holder(self.out) is None:
            self.claim = Claim(self.out)
        try:
            clean_stale(self.out)
            self.tmp = Path(
                tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-{os.getpid()}-", dir=self.out.parent)
            )
            os.chmod(self.tmp, 0o777 & ~_umask())  # mkdtemp's 0700 would hide it from others
        except OSError as error:
            self._release()
            raise write_fault(error, f"--out {self.out}", self.out.parent) from None

    def __enter__(self) -> RunDir:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        try:
            if kind is None:
                try:
                    self._publish()
                except OSError as fault:
                    raise self._fault(fault) from None
            elif isinstance(error, OSError):
                raise self._fault(error) from None
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self._release()

    def _release(self) -> None:
        if self.claim is not None:
            self.claim.release()
            self.claim = None

    def _fault(self, error: OSError) -> UserError:
        """The error with the temporary path it names shown as the file's place in ``out``."""
        name = error.filename
        if isinstance(name, str) and name.startswith(str(self.tmp)):
            error.filename = str(self.out) + name[len(str(self.tmp)) :]
        return write_fault(error, f"--out {self.out}", self.out)

    def _publish(self) -> None:
        if not self.overwrite:
            try:
                os.rename(self.tmp, self.out)  # atomic; fails when out is no longer empty
            except OSError as error:
                if error.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                    raise
                raise UserError(
                    f"--out {self.out} was filled by another run while this one ran; this "
                    "run's output was not kept (choose another --out, or --overwrite)"
                ) from None
            return
        if not self.out.exists() or (self.out.is_dir() and not any(self.out.iterdir())):
            os.replace(self.tmp, self.out)  # rename(2) may replace an empty directory
            return
        check_out(self.out, self.command, overwrite=True)  # still ours to replace
        # the earlier output goes aside, the new one takes its name, then the earlier one is
        # removed (a run killed in between leaves a sibling clean_stale removes)
        old = Path(
            tempfile.mkdtemp(prefix=f".{self.out.name}.old-{os.getpid()}-", dir=self.out.parent)
        )
        os.replace(self.out, old / "run")
        os.replace(self.tmp, self.out)
        shutil.rmtree(old, ignore_errors=True)
        if self.warn is not None:
            what = f"`trace {self.command}`" if self.command else "an earlier run"
            self.warn(f"note: replaced the earlier output of {what} in --out {self.out}")


def has_pyarrow() -> bool:
    """Whether Parquet copies can be written (pyarrow is optional)."""
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        return False
    return True


def write_table(frame: pd.DataFrame, path: Path) -> list[Path]:
    """Write ``path`` as CSV, plus a Parquet copy when pyarrow is installed."""
    frame.to_csv(path, index=False)
    if not has_pyarrow():
        return [path]
    parquet = path.with_suffix(".parquet")
    frame.to_parquet(parquet, index=False)
    return [path, parquet]


class TableStream:
    """Append DataFrames to ``NAME.csv`` (header once) and, with pyarrow, ``NAME.parquet``."""

    def __init__(self, path: Path) -> None:
        """Write to ``path`` (a ``.csv``; the ``.parquet`` beside it with pyarrow)."""
        self.path = path
        self.rows = 0
        self._parquet: Any = None
        self._pyarrow = has_pyarrow()

    @property
    def files(self) -> list[str]:
        """The names of the files written."""
        names = [self.path.name]
        return [*names, self.path.with_suffix(".parquet").name] if self._pyarrow else names

    def write(self, frame: pd.DataFrame) -> None:
        """Append ``frame``."""
        frame.to_csv(self.path, mode="a", header=self.rows == 0, index=False)
        self.rows += len(frame)
        if self._pyarrow:
            import pyarrow as pa
            import pyarrow.parquet as pq

            table = pa.Table.from_pandas(frame, preserve_index=False)
            if self._parquet is None:
                self._parquet = pq.ParquetWriter(self.path.with_suffix(".parquet"), table.schema)
            self._parquet.write_table(table)

    def close(self) -> None:
        """Finish the Parquet file."""
        if self._parquet is not None:
            self._parquet.close()
            self._parquet = None


#: What each figure format would otherwise stamp into the file that changes from run to run.
_NO_DATES = {"svg": {"Date": None}, "pdf": {"CreationDate": None}}


def save_figure(figure: Figure, path: Path, figure_format: str) -> None:
    """Save ``figure`` to ``path``, byte for byte the same for the same figure.

    No creation date (SVG, PDF), and SVG element ids from a fixed salt rather than a random
    one.
    """
    import matplotlib

    with matplotlib.rc_context({"svg.hashsalt": "residual-trace"}):
        figure.savefig(
            path, format=figure_format, dpi=150, metadata=_NO_DATES.get(figure_format, {})
        )


def write_run_json(path: Path, record: dict[str, Any]) -> None:
    """Write ``record`` with the time, argv and package versions as ``run.json``, atomically."""
    record = {
        "created_utc": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "argv": sys.argv,
        "versions": package_versions(),
        **record,
    }
    path.write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write ``path`` through a hidden temporary sibling renamed into place.

    A reader (or a killed run) never sees a half-written file.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data, encoding="utf-8")
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
