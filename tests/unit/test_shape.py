"""The shape of the code (the contract of ``docs/contributing.md``): no import circle, no
function over 60 lines, the experiment modules light, and every verb derived from the
registry."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import residual_trace as rt
from residual_trace.experiments.registry import EXPERIMENTS, VERB_NAMES

PACKAGE = Path(rt.__file__).parent


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    return modules


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules ``path`` imports at run time (anywhere in it, a function's body
    included; not under ``if TYPE_CHECKING``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing_only = {
        id(sub)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for sub in ast.walk(node)
    }

    def owner(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                target = owner(f"{node.module}.{alias.name}") or owner(node.module)
                found |= {target} if target else set()
        elif isinstance(node, ast.Import):
            found |= {t for a in node.names if (t := owner(a.name))}
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_no_import_circle_between_files():
    modules = _modules()
    graph = {name: _imports(path, modules) - {name} for name, path in modules.items()}
    assert _cycles(graph) == []


def test_a_circle_is_found_when_there_is_one():
    """The check above can fail: a made-up graph with a circle is reported."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]


def test_no_function_is_longer_than_60_lines():
    long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > 60:
                    long.append(f"{path.relative_to(PACKAGE)}:{node.name} ({lines} lines)")
    assert long == []


def test_the_registry_and_the_command_line_import_nothing_heavy():
    code = (
        "import sys\n"
        "import residual_trace.cli, residual_trace.api\n"
        "heavy = ('torch', 'transformer_lens', 'transformers', 'pandas', 'matplotlib')\n"
        "print([m for m in heavy if m in sys.modules])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_every_verb_is_a_command_an_api_function_and_in_all():
    from residual_trace.cli import trace

    assert [e.name for e in EXPERIMENTS] == [
        "layers",
        "decompose",
        "perturb",
        "probe",
        "lens",
        "train-lens",
        "patch",
    ]
    for experiment, name in zip(EXPERIMENTS, VERB_NAMES, strict=True):
        assert name in rt.__all__
        assert vars(getattr(rt, name))["experiment"] is experiment
        assert experiment.name in trace.commands
        flags = {o for p in trace.commands[experiment.name].params for o in p.opts}
        own = {f"--{f.replace('_', '-')}" for f in ("batch_size", "seed", "model", "out")}
        assert own <= flags, own - flags


def test_the_report_runs_exactly_the_registered_experiments_it_reads():
    from typing import get_args

    from residual_trace.experiments.report.config import EXPERIMENTS as REPORTED
    from residual_trace.experiments.report.config import Experiment, ReportOptions

    assert tuple(e.name for e in EXPERIMENTS if e.report_tables) == REPORTED
    assert get_args(Experiment) == REPORTED  # the --experiment choices
    assert ReportOptions().experiments == REPORTED


def test_one_table_of_mixing_measures_feeds_the_tables_the_console_and_the_docs():
    from residual_trace.figures.decompose import _MEASURES
    from residual_trace.tracer.decompose_summary import MIXING_MEASURES
    from residual_trace.tracer.mixing import MIXING_COLUMNS
    from residual_trace.tracer.mixing_measures import DISPLAYED, MIXING, markdown_table

    columns = [m.column for m in MIXING]
    assert list(MIXING_MEASURES) == columns
    assert [c for c in MIXING_COLUMNS if c.startswith("mix_")] == columns
    assert [m[0] for m in _MEASURES] == [m.column for m in DISPLAYED]
    assert sorted(m.column for m in DISPLAYED) == sorted(columns)
    readme = (PACKAGE.parent / "docs" / "decompose.md").read_text(encoding="utf-8")
    for m in MIXING:  # every measure documented, with the authors it follows
        assert f"`{m.column}`" in readme, m.column
        authors = m.reference.split(" et al.")[0].split(" 20")[0]
        assert authors in readme, m.reference
    table = markdown_table()
    assert len(table.splitlines()) == 2 + len(MIXING) and "`mix_vz_rollout`" in table
