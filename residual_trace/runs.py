"""Run directories that never hold half-written outputs, and the ``run.json`` beside them.

Everything is written into a hidden temporary sibling of ``--out`` and moved into place
only when the run completes; a crash or Ctrl-C removes the temporary directory.
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
    return root / f"{slug.strip('-.') or 'model'}-{stamp}"


def texts_sha256(texts: Iterable[str]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8") + b"\n")
    return digest.hexdigest()


def check_out(out: Path) -> None:
    """Fail early (before a model loads) when ``out`` cannot become the output directory."""
    out = Path(out)
    if str(out) == "":
        raise UserError("--out: give a directory name")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"cannot write to --out {out}: {parent} is not a writable directory")


class RunDir:
    """A context manager: write into :attr:`tmp`, get everything in ``out`` on success.

    Examples:
        >>> import tempfile, pathlib
        >>> root = pathlib.Path(tempfile.mkdtemp())
        >>> with RunDir(root / "run") as run:
        ...     _ = (run.tmp / "a.txt").write_text("done")
        >>> sorted(p.name for p in (root / "run").iterdir())
        ['a.txt']
    """

    def __init__(self, out: Path) -> None:
        self.out = Path(out)
        if self.out.exists() and not self.out.is_dir():
            raise UserError(f"--out {self.out} exists and is not a directory")
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-", dir=self.out.parent))
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
        if not self.out.exists():
            os.replace(self.tmp, self.out)
            return
        for item in sorted(self.tmp.iterdir()):
            target = self.out / item.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(item, target)


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
