"""MkDocs hook: each verb page's table of options, generated from the one declaration of
each option (its options class), so that the page cannot drift from ``trace VERB --help``.

A page writes ``<!-- options: layers -->`` where the table goes.
"""

from __future__ import annotations

import html
import re
import typing
from dataclasses import MISSING, fields
from typing import Any

_PLACEHOLDER = re.compile(r"<!-- options: ([a-z-]+) -->")

#: Where the API takes the options the command line shares with every verb.
_ELSEWHERE = {
    "model": "`model` (first argument)",
    "device": "`load_model(device=)`",
    "dtype": "`load_model(dtype=)`",
    "device_map": "`load_model(device_map=)`",
    "out": "`result.save(out)`",
    "overwrite": "`save(overwrite=)`",
    "figure_format": "`save(figure_format=)`",
}


def _default(value: Any) -> str:
    if value is MISSING:
        return ""
    if value is None:
        return "(none)"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return ", ".join(map(str, value)) or "(none)"
    return str(value)


def _type(annotation: Any) -> str:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Literal:
        return " \\| ".join(map(str, typing.get_args(annotation)))
    if args and typing.get_origin(annotation) in (typing.Union, __import__("types").UnionType):
        return _type(args[0])
    name = getattr(annotation, "__name__", str(annotation))
    return name.replace("typing.", "")


def options_table(verb: str) -> str:
    """The options of ``verb``: flag (or API keyword), type, default, meaning."""
    from residual_trace.experiments.options import ModelOptions, OutputOptions
    from residual_trace.experiments.registry import experiment
    from residual_trace.options import flag_of

    found = experiment(verb)
    lines = ["| option | API keyword | values | default | what it does |", "|---|---|---|---|---|"]
    classes = [ModelOptions, found.options_class, OutputOptions]
    for options in classes:
        hints = typing.get_type_hints(options)
        for f in fields(options):
            if "help" not in f.metadata:
                continue
            cli = f.metadata.get("cli", True)
            flag = f"`{flag_of(options, f.name)}`" if cli else "(API only)"
            keyword = _ELSEWHERE.get(f.name, f"`{f.name}`")
            values = f.metadata.get("metavar") or _type(hints[f.name])
            help_text = html.escape(f.metadata["help"], quote=False).replace("|", "\\|")
            lines.append(
                f"| {flag} | {keyword} | {html.escape(values)} | "
                f"{html.escape(_default(f.default))} | {help_text} |"
            )
    if found.inputs == "texts":
        lines.insert(3, "| `--text`, `-t` / `--file`, `-f` | `texts` (second argument) | text "
                     "/ path | the bundled sentences | The texts (repeatable), or a UTF-8 file "
                     "with one text per non-blank line. |")  # fmt: skip
    elif found.texts_option:
        lines.insert(3, f"| `--text`, `-t` / `--file`, `-f` | `{found.texts_option}` | text / "
                     "path | (none) | The corpus (repeatable texts, or a UTF-8 file with one "
                     "text per non-blank line). |")  # fmt: skip
    return "\n".join(lines)


#: A Sphinx role left in a docstring (``:func:`x```), as the Markdown of the reference renders
#: it: the role's name in plain text before the code.
_ROLE = re.compile(r":(?:func|class|meth|mod|data|attr|exc):(<code>)")


def on_page_content(html_text: str, **kwargs: Any) -> str:
    """Drop the Sphinx role names the docstrings use (the code span after them stays)."""
    return _ROLE.sub(r"\1", html_text)


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    """Replace each options placeholder with its table."""
    return _PLACEHOLDER.sub(lambda m: options_table(m.group(1)), markdown)
