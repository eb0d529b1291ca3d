"""What every experiment returns: its tables in memory, its figures on demand, ``save()``.

Nothing is written to disk until :meth:`Result.save`, which writes exactly what the ``trace``
command writes: each table as ``<key>.csv`` (plus ``<key>.parquet`` where pyarrow is
installed), the figures, and ``run.json``. The directory appears only when complete.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from residual_trace.defaults import DEFAULT_FIGURE_FORMAT, FIGURE_FORMATS
from residual_trace.errors import UserError
from residual_trace.experiments.common import inputs_record, model_record
from residual_trace.experiments.options import Warn, python_warning
from residual_trace.options import Options
from residual_trace.runs import RunDir, save_figure, write_run_json, write_table

if TYPE_CHECKING:  # the experiment modules import this one; they stay light until a run starts
    import pandas as pd
    from matplotlib.figure import Figure

    from residual_trace.models import TracedModel


@dataclass(repr=False)
class Result:
    """Tables (pandas DataFrames keyed like their CSV files), figures and ``save``.

    Attributes:
        model: the model that ran.
        options: the validated options it ran with.
        tables: every table, keyed like its file (``tables["drift"]`` is ``drift.csv``).
        texts: the texts (for corpus-free experiments, the probe's corpus or none).
        source: where the texts came from (recorded in ``run.json``).
        notes: warnings and notes raised while running, one line each.
        record: further facts for ``run.json``.
    """

    command: ClassVar[str] = ""

    model: TracedModel
    options: Options
    tables: dict[str, pd.DataFrame]
    texts: list[str]
    source: str
    notes: list[str] = field(default_factory=list)
    record: dict[str, Any] = field(default_factory=dict)

    # -- what subclasses provide ------------------------------------------------------------
    def figures(self) -> dict[str, Figure]:
        """The figures the command line writes, keyed by file stem (new Figure objects)."""
        return {}

    def headline(self) -> str:
        """The numbers worth one line in ``repr``."""
        return ""

    def describe(self) -> str:
        """The text the command line prints."""
        return self.headline()

    def _save_extra(self, folder: Path) -> list[str]:
        """Write anything that is not a table or a figure; return the names written."""
        return []

    def viewer_sections(self) -> list[str]:
        """The interactive views of ``viewer.html`` (HTML sections; none for most verbs)."""
        return []

    # -- the viewer -------------------------------------------------------------------------
    def viewer_html(self) -> str | None:
        """``viewer.html``'s page: self-contained, offline (``None`` when the verb has none)."""
        from residual_trace.viewer import viewer_page

        sections = self.viewer_sections()
        if not sections:
            return None
        return viewer_page(
            f"{self.command}: {self.model.name}",
            sections,
            "Hover a cell for its value; the controls choose what is drawn. Nothing here "
            "loads from the network.",
        )

    def show(self) -> None:
        """Display the viewer inline in a notebook (Jupyter, VS Code), with no network.

        The page goes into an ``<iframe srcdoc>``, so several viewers in one notebook do not
        disturb each other. Raises :class:`UserError` outside IPython or for a verb without
        a viewer.
        """
        import html

        page = self.viewer_html()
        if page is None:
            raise UserError(f"{self.command} has no viewer (decompose, perturb, lens and patch do)")
        try:
            from IPython.display import HTML, display
        except ImportError:
            raise UserError(
                "show() displays the viewer in a notebook and needs IPython; "
                "save() writes it as viewer.html instead"
            ) from None
        frame = (
            f'<iframe srcdoc="{html.escape(page, quote=True)}" style="width:100%;height:900px;'
            'border:1px solid #ddd" sandbox="allow-scripts"></iframe>'
        )
        display(HTML(frame))

    # -- shared ---------------------------------------------------------------------------
    def __repr__(self) -> str:
        name = type(self).__name__
        head = self.headline()
        return (
            f"<{name} {self.command} on {self.model.name}: {len(self.texts)} text(s); "
            f"tables {', '.join(self.tables)}{'; ' + head if head else ''}>"
        )

    def save(
        self,
        out: str | Path,
        figure_format: str = DEFAULT_FIGURE_FORMAT,
        overwrite: bool = False,
        warn: Warn = python_warning,
    ) -> list[Path]:
        """Write every table, figure and ``run.json`` into ``out``; return the paths.

        The files go to a hidden temporary sibling first and appear in ``out`` together,
        only when all are written. ``out`` must be new or empty, unless ``overwrite``: then
        an earlier output of the same command there is replaced as a whole, and ``warn``
        is told so. Another run writing ``out`` at the same time makes this one fail with a
        :class:`UserError` (without ``overwrite``), never a silently lost result; so does a
        fault of the machine (a full disk), naming the file.
        """
        if figure_format not in FIGURE_FORMATS:
            raise UserError(
                f"figure_format (--format): expected one of {', '.join(FIGURE_FORMATS)}, "
                f"got {figure_format!r}"
            )
        out = Path(out)
        names: list[str] = []
        with RunDir(out, self.command, overwrite, warn) as run:
            for key, frame in self.tables.items():
                names += [p.name for p in write_table(frame, run.tmp / f"{key}.csv")]
            names += self._save_extra(run.tmp)
            page = self.viewer_html()
            if page is not None:
                (run.tmp / "viewer.html").write_text(page, encoding="utf-8")
                names.append("viewer.html")
            for key, figure in self.figures().items():
                filename = f"{key}.{figure_format}"
                save_figure(figure, run.tmp / filename, figure_format)
                names.append(filename)
            write_run_json(run.tmp / "run.json", self.run_record(names, figure_format))
            names.append("run.json")
        return [out / name for name in names]

    def run_record(self, files: list[str], figure_format: str) -> dict[str, Any]:
        """What ``run.json`` holds: command, model, inputs, options, seed, notes, files."""
        return {
            "command": self.command,
            "model": model_record(self.model),
            "inputs": inputs_record(self.texts, self.source) if self.texts else None,
            "options": self.options.to_dict(),
            "seed": getattr(self.options, "seed", None),
            "figure_format": figure_format,
            "rows": {key: len(frame) for key, frame in self.tables.items()},
            "notes": self.notes,
            **self.record,
            "files": files,
        }
