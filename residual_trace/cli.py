"""The ``trace`` command line: one command = one config object + one library call.

Bad input ends with a one-line ``Error: ...`` and exit status 1 (2 for usage errors),
Ctrl-C with status 130; set ``RESIDUAL_TRACE_DEBUG=1`` to see the traceback of an
unexpected internal error.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import click

from residual_trace import __version__
from residual_trace.errors import UserError
from residual_trace.experiments.contract import Experiment
from residual_trace.experiments.options import CommonOptions, ModelOptions, OutputOptions, Texts
from residual_trace.experiments.registry import EXPERIMENTS
from residual_trace.experiments.report.config import ReportOptions
from residual_trace.options import Options, click_options

F = TypeVar("F", bound=Callable[..., Any])

#: ``click`` context key: a function saying what an interrupted command kept (default:
#: nothing written).
INTERRUPT_KEPT = "residual_trace.interrupt_kept"


def _one_line(message: str) -> str:
    """``message`` on one line, whatever it holds.

    Every unprintable character (a newline, a tab or an escape the user typed into a value
    the message quotes) is written as its escape.
    """
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)


class _UsageLine(click.ClickException):
    """A usage error (unknown option, bad choice) as one line, exit status 2."""

    exit_code = 2


class _Group(click.Group):
    """Turns :class:`UserError` and usage errors into one line and a non-zero exit.

    Stray exceptions are turned the same way.
    """

    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: click.Context | None = None,
        **extra: Any,
    ) -> click.Context:
        try:
            return super().make_context(info_name, args, parent, **extra)
        except click.exceptions.NoArgsIsHelpError:
            raise  # plain `trace`: the help, as click shows it
        except click.UsageError as error:  # the group's own options: `trace --bogus`
            message = _one_line(" ".join(error.format_message().split()))
            raise _UsageLine(f"{message} (see 'trace --help')") from None

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except UserError as error:
            raise click.ClickException(_one_line(str(error))) from None
        except click.UsageError as error:
            where = error.ctx.command_path if error.ctx is not None else "trace"
            message = _one_line(" ".join(error.format_message().split()))
            raise _UsageLine(f"{message} (see '{where} --help')") from None
        except (click.ClickException, click.exceptions.Exit):
            raise
        except (KeyboardInterrupt, click.Abort):
            # Ctrl-C: the partial output is gone already (runs.RunDir), or, for a report, what
            # is finished is kept for resuming; exit as shells expect
            kept = ctx.meta.get(INTERRUPT_KEPT)
            click.echo(f"Aborted: interrupted, {kept() if kept else 'nothing written'}.", err=True)
            raise click.exceptions.Exit(130) from None
        except OSError as error:  # a fault of the machine no write site named: still one line
            if _debug():
                raise
            where = f" {error.filename}" if error.filename is not None else ""
            reason = error.strerror or str(error) or type(error).__name__
            raise click.ClickException(_one_line(f"cannot use{where}: {reason}")) from None
        except Exception as error:
            if _debug():
                raise
            first = _one_line((str(error).strip().splitlines() or [""])[0])
            raise click.ClickException(
                f"internal error: {type(error).__name__}: {first} "
                "(set RESIDUAL_TRACE_DEBUG=1 for the traceback)"
            ) from None


def _debug() -> bool:
    """``RESIDUAL_TRACE_DEBUG`` as :func:`residual_trace.settings.debug` reads it.

    A bad value, refused up front by every verb, counts as off here.
    """
    from residual_trace import settings

    try:
        return settings.debug()
    except UserError:
        return False


_EPILOG_GROUP = """\b
Examples:
  trace layers                                  # token drift on minilm, bundled sentences
  trace layers --model smollm2 --text "The dog chased the cat."
  trace decompose --model minilm --text "The dog chased the cat."
  trace perturb --model minilm --text "The dog chased the cat." --swap dog cat
  trace probe --model minilm                    # feature-norm probes with their controls
  trace report                                  # everything, minilm vs smollm2, one document
  trace layers --help                           # every option, with examples
"""


@click.group(
    cls=_Group, context_settings={"help_option_names": ["-h", "--help"]}, epilog=_EPILOG_GROUP
)
@click.version_option(__version__, prog_name="residual-trace")
def trace() -> None:
    """Mechanistic residual-stream tracing: does the state at layer L still hold its token?

    Every number comes with its null (a baseline, a control or an interval).
    Run `trace COMMAND --help` for a command's options and examples.
    """


_TEXT_OPTIONS = [
    click.option(
        "--text",
        "-t",
        "texts",
        multiple=True,
        help="A text to trace; repeat for several. Default: the bundled sentences.",
    ),
    click.option(
        "--file",
        "-f",
        type=click.Path(path_type=Path),
        help="UTF-8 file with one text per non-blank line.",
    ),
]


def _with(options: list[Callable[[Any], Any]]) -> Callable[[F], F]:
    def apply(command: F) -> F:
        for option in reversed(options):
            command = option(command)
        return command

    return apply


def _echo_err(message: str) -> None:
    click.echo(message, err=True)


def _texts(texts: tuple[str, ...], file: Path | None) -> Texts:
    """What ``--text``/``--file`` give the API: texts, a file, or None (bundled)."""
    if texts and file is not None:
        raise UserError("give texts with --text or --file, not both")
    if file is not None:
        return Path(file)
    return list(texts) if texts else None


def _run(
    experiment: Experiment[Any, Any],
    options: CommonOptions,
    model: ModelOptions,
    output: OutputOptions,
    inputs: Texts,
) -> None:
    """Check the inputs, claim --out, load the model, call the API, save, report.

    The cheap things (--out, --text/--file) are checked before anything heavy is imported,
    and the model is loaded only after the inputs are checked.
    """
    from residual_trace.runs import check_out, claim_out

    out = output.out_path
    if out is not None:
        check_out(out, experiment.name, output.overwrite)
    if experiment.inputs == "texts" and isinstance(inputs, Path):
        from residual_trace.experiments.common import read_texts

        read_texts(inputs)  # a missing or empty file fails before the heavy imports
    from residual_trace.models.resolve import resolve

    resolve(model.model, on_convert=lambda m: _echo_err(f"note: {m}"))  # a bad name: now
    out, claim = claim_out(out, model.model, output.overwrite, _echo_err)
    try:
        _measure_and_save(experiment, options, model, output, out, inputs)
    finally:
        if claim is not None:
            claim.release()


def _measure_and_save(
    experiment: Experiment[Any, Any],
    options: CommonOptions,
    model: ModelOptions,
    output: OutputOptions,
    out: Path,
    inputs: Texts,
) -> None:
    from residual_trace.experiments.common import load_inputs
    from residual_trace.experiments.options import texts_argument
    from residual_trace.models import load_model

    def loader() -> Any:
        return load_model(
            model.model,
            model.device,
            on_convert=lambda m: _echo_err(f"note: {m}"),
            dtype=model.dtype,
            device_map=model.device_map,
        )

    if experiment.inputs == "texts":
        texts, _ = load_inputs(inputs)  # bad input fails before the model loads
        options.check_texts(texts)
        inputs = texts_argument(inputs)
    result = experiment.run(loader, inputs, options, _echo_err)
    files = result.save(
        out, figure_format=output.figure_format, overwrite=output.overwrite, warn=_echo_err
    )
    if not getattr(options, "quiet", False):
        _print(result.describe(), output.wide)
        _print(f"wrote {out}/: " + ", ".join(p.name for p in files), output.wide)


def _print(text: str, wide: bool) -> None:
    """A summary on stdout: within 100 columns (tables split, prose wrapped) unless ``wide``."""
    from residual_trace.console import fit_width

    click.echo(text if wide else fit_width(text))


def _fields(options_type: type[Options], raw: dict[str, Any]) -> dict[str, Any]:
    """The values in ``raw`` that are fields of ``options_type`` (taken out of ``raw``)."""
    from dataclasses import fields

    return {f.name: raw.pop(f.name) for f in fields(options_type) if f.name in raw}


def _command(experiment: Experiment[Any, Any]) -> click.Command:
    """The ``trace`` command of ``experiment``.

    Its options are the model and text options, the output options, then the experiment's
    own, all read from their options classes.
    """

    def command(**raw: Any) -> None:
        model = ModelOptions(**_fields(ModelOptions, raw))
        output = OutputOptions(**_fields(OutputOptions, raw))
        inputs = _texts(raw.pop("texts", ()), raw.pop("file", None))
        if experiment.texts_option is not None and inputs is not None:
            raw[experiment.texts_option] = tuple(inputs) if isinstance(inputs, list) else inputs
        options = experiment.options(**raw)
        _run(experiment, options, model, output, inputs)

    command.__doc__ = experiment.help
    command = click_options(experiment.options_class)(command)
    command = click_options(OutputOptions)(command)
    if experiment.inputs == "texts" or experiment.texts_option is not None:
        command = _with(_TEXT_OPTIONS)(command)  # a verb on the model alone has none
    command = click_options(ModelOptions)(command)
    return click.command(experiment.name, epilog=experiment.epilog)(command)


for _experiment in EXPERIMENTS:
    trace.add_command(_command(_experiment))


_EPILOG_REPORT = """\b
Examples:
  trace report                                      # minilm and smollm2, bundled inputs
  trace report --model bert-base-uncased --model gpt2 --out runs/bert-vs-gpt2
  trace report --config runs/bert-vs-gpt2/config.toml   # the same run again, from its config
"""


@trace.command("report", epilog=_EPILOG_REPORT)
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path),
    help="A report config (TOML), e.g. the config.toml written beside an earlier report.",
)
@click.option("--out", "-o", type=str, help="Output directory (new, or an earlier report's).")
@click.option(
    "--overwrite",
    is_flag=True,
    help="Start afresh in --out, removing an earlier report there (default: resume it).",
)
@click.option("--quiet", "-q", is_flag=True, help="No progress, no verdicts printed.")
@click.option("--wide", is_flag=True, help="Print at full width (default: fit to 100 columns).")
@click_options(ReportOptions, only_given=True)
def report(**raw: Any) -> None:
    """Every experiment on several models, side by side, as one report.

    Runs trace layers, decompose, perturb, probe and lens on each model (a killed run resumes
    without redoing finished parts), then writes report.html (self-contained, figures
    embedded, no network requests), report.md, tables/, figures/, run.json and the
    config.toml that reproduces it. Command-line options override the --config file.
    """
    from residual_trace.experiments.report.result import check_report_out, run_report
    from residual_trace.runs import claim_out

    config_path, quiet, wide = raw.pop("config_path"), raw.pop("quiet"), raw.pop("wide")
    out = OutputOptions(out=raw.pop("out")).out_path  # an empty --out: the verbs' one line
    overwrite = raw.pop("overwrite")
    given = {k: v for k, v in raw.items() if v is not None and v != ()}
    if "file" in given:
        given["file"] = str(given["file"])
    options = (
        ReportOptions.from_toml(config_path, **given) if config_path else ReportOptions(**given)
    )
    if out is not None:
        check_report_out(out, overwrite)
    # a report is written in place (to resume): two at once into one --out are never allowed
    root, claim = claim_out(out, "report", overwrite, _echo_err, replace_busy=False)
    try:
        click.get_current_context().meta[INTERRUPT_KEPT] = lambda: _report_kept(root)
        result = run_report(
            options,
            warn=(lambda m: None) if quiet else _echo_err,
            workdir=root,
            progress=None if quiet else _echo_err,
            overwrite=overwrite,
        )
        files = result.save(root)
    finally:
        if claim is not None:
            claim.release()
    if not quiet:
        _print(result.describe(), wide)
        written = sorted({p.relative_to(root).parts[0] for p in files})
        _print(f"wrote {root}/: " + ", ".join(written), wide)


def _report_kept(root: Path) -> str:
    """What an interrupted report left in ``root``, and how to go on."""
    finished = sorted(root.glob("runs/*/*/fingerprint.txt")) if root.is_dir() else []
    if finished:
        return (
            f"{len(finished)} finished part(s) kept in {root} for resuming: run the same "
            "command again to resume (--overwrite starts afresh)"
        )
    if root.is_dir() and any(root.iterdir()):
        return (
            f"no part finished; {root} holds the report's config.toml (the same command starts it)"
        )
    return "nothing written"


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point; ``argv`` lets tests run the CLI in-process."""
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    trace.main(args=list(argv) if argv is not None else None, prog_name="trace")


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
