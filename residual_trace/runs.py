"""Run directories that never hold half-written outputs, and the ``run.json`` beside them.

Everything is written into a hidden temporary sibling of ``--out`` and moved into place
only when the run completes; a crash or Ctrl-C removes the temporary directory, and the
next run removes what a killed one (SIGKILL) left behind. An existing, non-empty ``--out``
is refused unless ``overwrite``, which replaces it wholly (no file of the earlier run
survives), and only when it is an earlier output of the same command. Directories get the
permissions the user's umask gives, like any directory the user creates.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path
from types import TracebackType
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from residual_trace.errors import UserError

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
    versions = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def default_out(model: str, root: Path = Path("runs")) -> Path:
    """``runs/<model>-<UTC timestamp>``, with the model name made path-safe."""
    slug = "".join(c if c.isalnum() or c in "-_." else "-" for c in Path(model).name or model)
    stamp = _dt.datetime.now(_dt.UTC).strftime("%Y%m%d-%H%M%S")
    base = root / f"{slug.strip('-.') or 'model'}-{stamp}"
    out, n = base, 1
    while out.exists():  # two runs in the same second: never the earlier one's directory
        n += 1
        out = base.with_name(f"{base.name}-{n}")
    return out


def texts_sha256(texts: Iterable[str]) -> str:
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
    """Fail early (before a model loads) when ``out`` cannot become ``command``'s output
    directory: not a directory, not writable, or already holding files (unless
    ``overwrite``, and then only files an earlier run of the same command wrote)."""
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
    """Fail when the nearest existing directory at or above ``folder`` is not writable
    (``out``: the ``--out`` named in the message, ``folder`` by default)."""
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
    """Remove the temporary siblings of ``out`` that a killed run (whose process is gone)
    left behind: ``.<name>.tmp-<pid>-*`` and ``.<name>.old-<pid>-*``."""
    out = Path(out)
    if not out.parent.is_dir():
        return
    for kind in ("tmp", "old"):
        for path in out.parent.glob(f".{out.name}.{kind}-*"):
            pid = path.name[len(f".{out.name}.{kind}-") :].split("-", 1)[0]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(path, ignore_errors=True)


class RunDir:
    """A context manager: write into :attr:`tmp`, get everything in ``out`` on success.

    ``out`` must be new or empty unless ``overwrite`` (see :func:`check_out`); with it,
    ``out`` is replaced as a whole when the run completes.

    Examples:
        >>> import tempfile, pathlib
        >>> root = pathlib.Path(tempfile.mkdtemp())
        >>> with RunDir(root / "run") as run:
        ...     _ = (run.tmp / "a.txt").write_text("done")
        >>> sorted(p.name for p in (root / "run").iterdir())
        ['a.txt']
    """

    def __init__(self, out: Path, command: str | None = None, overwrite: bool = False) -> None:
        self.out = Path(out)
        check_out(self.out, command, overwrite)
        try:
            _mkdir(self.out.parent)
            clean_stale(self.out)
            self.tmp = Path(
                tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-{os.getpid()}-", dir=self.out.parent)
            )
            os.chmod(self.tmp, 0o777 & ~_umask())  # mkdtemp's 0700 would hide it from others
        except OSError as error:
            raise UserError(
                f"cannot write to --out {self.out}: {error.strerror or error}"
            ) from None

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
                self._publish()
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def _publish(self) -> None:
        if not self.out.exists() or not any(self.out.iterdir()):
            os.replace(self.tmp, self.out)  # rename(2) may replace an empty directory
            return
        # --overwrite: the earlier output goes aside, the new one takes its name, then the
        # earlier one is removed (a run killed in between leaves a sibling clean_stale removes)
        old = Path(
            tempfile.mkdtemp(prefix=f".{self.out.name}.old-{os.getpid()}-", dir=self.out.parent)
        )
        os.replace(self.out, old / "run")
        os.replace(self.tmp, self.out)
        shutil.rmtree(old, ignore_errors=True)


def _mkdir(folder: Path) -> None:
    """``mkdir -p`` with the user's umask (Path.mkdir's default mode 0777 & ~umask)."""
    folder.mkdir(parents=True, exist_ok=True)


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
        self.path = path
        self.rows = 0
        self._parquet: Any = None
        self._pyarrow = has_pyarrow()

    @property
    def files(self) -> list[str]:
        names = [self.path.name]
        return [*names, self.path.with_suffix(".parquet").name] if self._pyarrow else names

    def write(self, frame: pd.DataFrame) -> None:
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
        if self._parquet is not None:
            self._parquet.close()
            self._parquet = None


def save_figures(
    figures: dict[str, Figure], tmp: Path, out: Path, figure_format: str
) -> list[Path]:
    """Save each figure as ``tmp/<name>.<format>``; return the paths they will have in ``out``."""
    written = []
    for name, figure in figures.items():
        filename = f"{name}.{figure_format}"
        figure.savefig(tmp / filename, dpi=150)
        written.append(out / filename)
    return written


def write_run_json(path: Path, record: dict[str, Any]) -> None:
    record = {
        "created_utc": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "argv": sys.argv,
        "versions": package_versions(),
        **record,
    }
    path.write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write ``path`` through a hidden temporary sibling renamed into place: a reader (or a
    killed run) never sees a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp")
    if isinstance(data, bytes):
        tmp.write_bytes(data)
    else:
        tmp.write_text(data, encoding="utf-8")
    tmp.replace(path)
