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
from residual_trace.defaults import (
    DEFAULT_DEVICE,
    DEFAULT_DTYPE,
    DEFAULT_FIGURE_FORMAT,
    DEFAULT_MODEL,
    DEVICE_MAPS,
    DEVICES,
    DTYPES,
    FIGURE_FORMATS,
)
from residual_trace.errors import UserError
from residual_trace.experiments.options import (
    DecomposeOptions,
    LayersOptions,
    PerturbOptions,
    ProbeOptions,
    Texts,
)
from residual_trace.experiments.report.config import ReportOptions
from residual_trace.options import Options, click_options

F = TypeVar("F", bound=Callable[..., Any])

#: ``click`` context key: a function saying what an interrupted command kept (default:
#: nothing written).
INTERRUPT_KEPT = "residual_trace.interrupt_kept"

_EPILOG_LAYERS = """\b
Examples:
  trace layers                                   # minilm, bundled sentences
  trace layers --model bert-base-uncased --text "The dog chased the cat." --out runs/bert
  trace layers --model smollm2 --file my_sentences.txt --out runs/smol
  trace layers --model ./path/to/local/hf/checkpoint --format svg --save-attention
"""


def _one_line(message: str) -> str:
    """``message`` with every unprintable character (a newline, a tab or an escape the user
    typed into a value the message quotes) written as its escape: one line, whatever."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)


class _UsageLine(click.ClickException):
    """A usage error (unknown option, bad choice) as one line, exit status 2."""

    exit_code = 2


class _Group(click.Group):
    """Turns :class:`UserError`, usage errors (and stray exceptions) into one line and a
    non-zero exit."""

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
    """``RESIDUAL_TRACE_DEBUG`` as :func:`residual_trace.settings.debug` reads it (a bad value,
    refused up front by every verb, counts as off here)."""
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


_MODEL_OPTIONS = [
    click.option(
        "--model",
        "-m",
        "model_name",
        default=DEFAULT_MODEL,
        show_default=True,
        help="Packaged alias (minilm, smollm2), Hugging Face name, or local checkpoint dir.",
    ),
    click.option("--device", type=click.Choice(DEVICES), default=DEFAULT_DEVICE, show_default=True),
    click.option(
        "--dtype",
        type=click.Choice(DTYPES),
        default=DEFAULT_DTYPE,
        show_default=True,
        help="Weights and forward pass in this precision; the measures stay float32.",
    ),
    click.option(
        "--device-map",
        type=click.Choice(DEVICE_MAPS),
        default=None,
        help="Split the model over the visible devices (accelerate).",
    ),
]
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
_OUTPUT_OPTIONS = [
    click.option(
        "--out",
        "-o",
        type=str,
        help="Output directory (default: runs/<model>-<UTC timestamp>); it must be new or "
        "empty (see --overwrite).",
    ),
    click.option(
        "--overwrite",
        is_flag=True,
        help="Replace --out if it holds an earlier output of this command (wholly: no file "
        "of the earlier run survives). Without it, a non-empty --out is refused.",
    ),
    click.option(
        "--format",
        "figure_format",
        type=click.Choice(FIGURE_FORMATS),
        default=DEFAULT_FIGURE_FORMAT,
        show_default=True,
        help="Figure file format.",
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


def _run(options: Options, raw: dict[str, Any], command: str, takes_texts: bool = True) -> None:
    """Check the cheap things (--out, --text/--file) before anything heavy is imported, claim
    --out, load the model (after the inputs are checked), call the API, save, report."""
    out = _out(raw["out"])
    inputs = _texts(raw["texts"], raw["file"])
    from residual_trace.runs import check_out, claim_out

    if out is not None:
        check_out(out, command, raw["overwrite"])
    if takes_texts and isinstance(inputs, Path):
        from residual_trace.experiments.common import read_texts

        read_texts(inputs)  # a missing or empty file fails before the heavy imports
    from residual_trace.models.resolve import resolve

    resolve(raw["model_name"], on_convert=lambda m: _echo_err(f"note: {m}"))  # a bad name: now
    out, claim = claim_out(out, raw["model_name"], raw["overwrite"], _echo_err)
    try:
        _measure_and_save(options, raw, command, takes_texts, out, inputs)
    finally:
        if claim is not None:
            claim.release()


def _measure_and_save(
    options: Options,
    raw: dict[str, Any],
    command: str,
    takes_texts: bool,
    out: Path,
    inputs: Texts,
) -> None:
    from residual_trace.experiments.common import load_inputs
    from residual_trace.models import load_model

    model_name, device = raw["model_name"], raw["device"]
    dtype, device_map = raw["dtype"], raw["device_map"]

    def loader() -> Any:
        return load_model(
            model_name,
            device,
            on_convert=lambda m: _echo_err(f"note: {m}"),
            dtype=dtype,
            device_map=device_map,
        )

    if takes_texts:
        texts, _ = load_inputs(inputs)  # bad input fails before the model loads
        options.check_texts(texts)  # type: ignore[attr-defined]
        result = options.run(loader, inputs, warn=_echo_err)  # type: ignore[attr-defined]
    else:
        result = options.run(loader, warn=_echo_err)  # type: ignore[attr-defined]
    files = result.save(
        out, figure_format=raw["figure_format"], overwrite=raw["overwrite"], warn=_echo_err
    )
    if not getattr(options, "quiet", False):
        click.echo(result.describe())
        click.echo(f"wrote {out}/: " + ", ".join(p.name for p in files))


def _out(value: str | None) -> Path | None:
    """``--out`` as a path (``None`` when not given); an empty name is refused."""
    if value is None:
        return None
    if not value.strip():
        raise UserError("--out: give a directory name, not an empty string")
    return Path(value)


def _split(raw: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the experiment's options, the command line's own: model, texts, output)."""
    own = {"model_name", "device", "dtype", "device_map", "texts", "file", "out", "figure_format"}
    own |= {"overwrite"}
    return {k: v for k, v in raw.items() if k not in own}, {k: raw.get(k) for k in own}


@trace.command("layers", epilog=_EPILOG_LAYERS)
@_with(_MODEL_OPTIONS + _TEXT_OPTIONS + _OUTPUT_OPTIONS)
@click_options(LayersOptions)
def layers(**raw: Any) -> None:
    """Capture every layer's residual stream and measure token drift.

    Prints a per-layer summary and writes drift.csv (one row per text x position x
    layer), summary.csv, texts.csv, run.json and three figures into --out.
    """
    options, own = _split(raw)
    _run(LayersOptions(**options), own, "layers")


_EPILOG_DECOMPOSE = """\b
Examples:
  trace decompose --model minilm --text "The dog chased the cat." --out runs/dec
  trace decompose --model smollm2 --file sentences.txt
  trace decompose --model minilm --per-head --mixing-text 3 --mixing-block 2
"""


@trace.command("decompose", epilog=_EPILOG_DECOMPOSE)
@_with(_MODEL_OPTIONS + _TEXT_OPTIONS + _OUTPUT_OPTIONS)
@click_options(DecomposeOptions)
def decompose(**raw: Any) -> None:
    """Split every block exactly into attention, MLP, carried-residual and norm-bias parts.

    Exact also for post-LN BERT (where TransformerLens's decompose_resid misses): each
    part is carried through the LayerNorms linearly and the parts are checked, at run time,
    to add up to the model's own block output. Also measures context mixing (raw attention,
    attention rollout, norm-based with residual and LayerNorm). Writes decompose.csv and
    mixing.csv (one row per text x position x block), summary.csv, cumulative.csv,
    mixing_pairs.csv, run.json and four figures.
    """
    options, own = _split(raw)
    _run(DecomposeOptions(**options), own, "decompose")


_EPILOG_PERTURB = """\b
Examples:
  trace perturb --model minilm --text "The dog chased the cat." --swap dog cat --out runs/swap
  trace perturb --model minilm --mode shuffle --samples 20 --seed 0     # bundled sentences
  trace perturb --model smollm2 --mode embed-shuffle
  trace perturb --model minilm --mode random-token --show-head L0H3 --show-head L5H0
"""


@trace.command("perturb", epilog=_EPILOG_PERTURB)
@_with(_MODEL_OPTIONS + _TEXT_OPTIONS + _OUTPUT_OPTIONS)
@click_options(PerturbOptions)
def perturb(**raw: Any) -> None:
    """Does attention follow tokens or positions? Perturb the input and compare.

    For each text and perturbation, compares every head's pattern with the original's
    aligned by token (moved with the tokens) and by position, giving a token-following
    index in [-1, 1] with a 95% interval over texts and a noise floor from re-running the
    unperturbed text; does the same for the residual stream. Writes perturbations.csv (one
    row per perturbation x block x head), heads.csv, summary.csv (per block), resid.csv,
    resid_summary.csv (per layer), run.json and figures.
    """
    options, own = _split(raw)
    _run(PerturbOptions(**options), own, "perturb")


_EPILOG_PROBE = """\b
Examples:
  trace probe --model minilm                        # bundled Lancaster sensorimotor norms
  trace probe --model minilm --norms mcrae:CONCS_FEATS_concstats_brm.txt --layers 0,3,6
  trace probe --model bert-base-uncased --norms binder:WordSet1_Ratings.csv --mapper ridge
  trace probe --model smollm2 --embedding contextual --file corpus.txt --layers 0,15,30
"""


@trace.command("probe", epilog=_EPILOG_PROBE)
@_with(_MODEL_OPTIONS + _TEXT_OPTIONS + _OUTPUT_OPTIONS)
@click_options(ProbeOptions)
def probe(**raw: Any) -> None:
    """Probe type-level embeddings for feature norms, with every control beside the score.

    Maps each concept's vector to its norm vector (PLSR, a tanh FFNN, ridge; capacity chosen
    inside each training fold), k-fold cross-validated, under the system condition and its
    controls: upper bound, shuffled, shuffled upper, random features, taxonomic corruption,
    structured nonsense and a random-initialised model. Writes scores.csv, summary.csv (the
    paper-style table with 95% intervals), verdicts.csv, concepts.csv, run.json and figures.
    --text/--file give the corpus of --embedding contextual.
    """
    options, own = _split(raw)
    inputs = _texts(own["texts"], own["file"])
    if inputs is not None:
        options["corpus"] = tuple(inputs) if isinstance(inputs, list) else inputs
    _run(ProbeOptions(**options), own, "probe", takes_texts=False)


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
@click_options(ReportOptions, only_given=True)
def report(**raw: Any) -> None:
    """Every experiment on several models, side by side, as one report.

    Runs trace layers, decompose, perturb and probe on each model (a killed run resumes
    without redoing finished parts), then writes report.html (self-contained, figures
    embedded, no network requests), report.md, tables/, figures/, run.json and the
    config.toml that reproduces it. Command-line options override the --config file.
    """
    from residual_trace.experiments.report.result import check_report_out, run_report
    from residual_trace.runs import claim_out

    config_path, out, quiet = raw.pop("config_path"), _out(raw.pop("out")), raw.pop("quiet")
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
        click.echo(result.describe())
        click.echo(
            f"wrote {root}/: " + ", ".join(sorted({p.relative_to(root).parts[0] for p in files}))
        )


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
