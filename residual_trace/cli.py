"""The ``trace`` command line: one command = one config object + one library call.

Bad input ends with a one-line ``Error: ...`` and exit status 1 (2 for usage errors);
set ``RESIDUAL_TRACE_DEBUG=1`` to see the traceback of an unexpected internal error.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click

from residual_trace import __version__
from residual_trace.errors import UserError
from residual_trace.probes import CONDITIONS

_EPILOG_LAYERS = """\b
Examples:
  trace layers                                   # minilm, bundled sentences
  trace layers --model bert-base-uncased --text "The dog chased the cat." --out runs/bert
  trace layers --model smollm2 --file my_sentences.txt --out runs/smol
  trace layers --model ./path/to/local/hf/checkpoint --format svg --save-attention
"""


class _Group(click.Group):
    """Turns :class:`UserError` (and stray exceptions) into one line and a non-zero exit."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except UserError as error:
            raise click.ClickException(str(error)) from None
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except KeyboardInterrupt:
            raise click.Abort() from None
        except Exception as error:
            if os.environ.get("RESIDUAL_TRACE_DEBUG"):
                raise
            first = (str(error).strip().splitlines() or [""])[0]
            raise click.ClickException(
                f"internal error: {type(error).__name__}: {first} "
                "(set RESIDUAL_TRACE_DEBUG=1 for the traceback)"
            ) from None


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


_SHARED_OPTIONS = [
    click.option(
        "--model",
        "-m",
        default="minilm",
        show_default=True,
        help="Packaged alias (minilm, smollm2), Hugging Face name, or local checkpoint dir.",
    ),
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
    click.option(
        "--out",
        "-o",
        type=click.Path(path_type=Path),
        help="Output directory (default: runs/<model>-<UTC timestamp>).",
    ),
    click.option(
        "--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True
    ),
    click.option(
        "--batch-size",
        type=int,
        default=16,
        show_default=True,
        help="Texts per forward pass (results do not depend on it).",
    ),
    click.option(
        "--max-length",
        type=int,
        default=None,
        help="Longest input in tokens incl. special tokens; longer texts are truncated "
        "with a warning. Default: the model's limit, at most 512.",
    ),
    click.option(
        "--seed",
        type=int,
        default=0,
        show_default=True,
        help="Seed for bootstrap intervals and the figure's token sample.",
    ),
    click.option(
        "--format",
        "figure_format",
        type=click.Choice(["png", "svg", "pdf"]),
        default="png",
        show_default=True,
        help="Figure file format.",
    ),
    click.option(
        "--include-special",
        is_flag=True,
        help="Keep [CLS]/[SEP]/BOS/EOS in the summary and figures (always in the tables).",
    ),
    click.option("--quiet", "-q", is_flag=True, help="No progress bar, no summary."),
]


def _shared_options(command: Callable[..., None]) -> Callable[..., None]:
    """The options every tracing command takes, in the same order."""
    for option in reversed(_SHARED_OPTIONS):
        command = option(command)
    return command


def _echo_err(message: str) -> None:
    click.echo(message, err=True)


@trace.command("layers", epilog=_EPILOG_LAYERS)
@_shared_options
@click.option(
    "--save-attention",
    is_flag=True,
    help="Also write attention patterns, one compressed .npz per text.",
)
@click.option(
    "--heatmap-text", type=int, default=0, show_default=True, help="text_id drawn in drift_heatmap."
)
def layers(**options: Any) -> None:
    """Capture every layer's residual stream and measure token drift.

    Prints a per-layer summary and writes drift.csv (one row per text x position x
    layer), summary.csv, texts.csv, run.json and three figures into --out.
    """
    from residual_trace.experiments.layers import LayersConfig, describe, run_layers

    texts = list(options.pop("texts")) or None
    config = LayersConfig(texts=texts, **options)
    result = run_layers(config, echo=_echo_err)
    if not config.quiet:
        click.echo(describe(result))


_EPILOG_DECOMPOSE = """\b
Examples:
  trace decompose --model minilm --text "The dog chased the cat." --out runs/dec
  trace decompose --model smollm2 --file sentences.txt
  trace decompose --model minilm --per-head --mixing-text 3 --mixing-layer 2
"""


@trace.command("decompose", epilog=_EPILOG_DECOMPOSE)
@_shared_options
@click.option(
    "--mixing-text",
    type=int,
    default=0,
    show_default=True,
    help="text_id whose per-pair mixing map is written (mixing_pairs.csv, mixing_heatmap).",
)
@click.option(
    "--per-head",
    is_flag=True,
    help="Also split the attention part by head (heads.csv, heads figure).",
)
@click.option(
    "--mixing-layer",
    type=int,
    default=None,
    help="Layer drawn in mixing_heatmap (1..L; default: the middle layer).",
)
def decompose(**options: Any) -> None:
    """Split every layer exactly into attention, MLP, carried-residual and norm-bias parts.

    Exact also for post-LN BERT (where TransformerLens's decompose_resid misses): each
    part is carried through the LayerNorms linearly and the parts are checked, at run time,
    to add up to the model's own block output. Also measures context mixing (raw attention,
    attention rollout, norm-based with residual and LayerNorm). Writes decompose.csv and
    mixing.csv (one row per text x position x layer), summary.csv, cumulative.csv,
    mixing_pairs.csv, run.json and four figures.
    """
    from residual_trace.experiments.decompose import DecomposeConfig, describe, run_decompose

    texts = list(options.pop("texts")) or None
    config = DecomposeConfig(texts=texts, **options)
    result = run_decompose(config, echo=_echo_err)
    if not config.quiet:
        click.echo(describe(result))


_EPILOG_PERTURB = """\b
Examples:
  trace perturb --model minilm --text "The dog chased the cat." --swap dog cat --out runs/swap
  trace perturb --model minilm --mode shuffle --samples 20 --seed 0     # bundled sentences
  trace perturb --model smollm2 --mode embed-shuffle
  trace perturb --model minilm --mode random-token --show-head 1.3 --show-head 5.0
"""


@trace.command("perturb", epilog=_EPILOG_PERTURB)
@_shared_options
@click.option(
    "--mode",
    type=click.Choice(["swap", "shuffle", "embed-shuffle", "random-token"]),
    default="swap",
    show_default=True,
    help="swap: exchange two tokens (--swap) or sampled pairs; shuffle: permute the "
    "non-special tokens; embed-shuffle: permute the embedding rows (tokens meaningless, "
    "positions intact); random-token: replace tokens by random ones (control).",
)
@click.option(
    "--swap",
    nargs=2,
    default=None,
    metavar="WORD1 WORD2",
    help="Exchange these two words (their subword spans, lengths may differ).",
)
@click.option(
    "--samples",
    type=int,
    default=10,
    show_default=True,
    help="Perturbations per text (pair swaps, shuffles, random-token draws), or the "
    "number of embedding shuffles.",
)
@click.option("--all-pairs", is_flag=True, help="--mode swap: every pair of non-special tokens.")
@click.option(
    "--show-text",
    type=int,
    default=0,
    show_default=True,
    help="text_id drawn in the side-by-side attention figure.",
)
@click.option(
    "--show-head",
    "show_heads",
    multiple=True,
    metavar="LAYER.HEAD",
    help="Head drawn in the attention figure (layer 1..L, head from 0); repeatable. "
    "Default: the most token- and most position-following head.",
)
def perturb(**options: Any) -> None:
    """Does attention follow tokens or positions? Perturb the input and compare.

    For each text and perturbation, compares every head's pattern with the original's
    aligned by token (moved with the tokens) and by position, giving a token-following
    index in [-1, 1] with a 95% interval over texts and a noise floor from re-running the
    unperturbed text; does the same for the residual stream. Writes heads.csv (one row per
    perturbation x layer x head), perturbations.csv, resid.csv, summary.csv, run.json and
    figures.
    """
    from residual_trace.experiments.perturb import PerturbConfig, describe, run_perturb

    texts = list(options.pop("texts")) or None
    options["show_heads"] = tuple(options["show_heads"])
    if options["swap"] is not None:
        options["swap"] = tuple(options["swap"])
    config = PerturbConfig(texts=texts, **options)
    result = run_perturb(config, echo=_echo_err)
    if not config.quiet:
        click.echo(describe(result))


_EPILOG_PROBE = """\b
Examples:
  trace probe --model minilm                        # bundled Lancaster sensorimotor norms
  trace probe --model minilm --norms mcrae:CONCS_FEATS_concstats_brm.txt --layers 0,3,6
  trace probe --model bert-base-uncased --norms binder:WordSet1_Ratings.csv --mapper ridge
  trace probe --model smollm2 --embedding contextual --file corpus.txt --layers 0,15,30
"""


@trace.command("probe", epilog=_EPILOG_PROBE)
@_shared_options
@click.option(
    "--norms",
    "norms",
    multiple=True,
    default=("lancaster",),
    show_default=True,
    help="lancaster, concreteness, lancaster+concreteness (bundled), or LAYOUT:PATH with "
    "LAYOUT mcrae, buchanan, binder, wide or long; repeatable.",
)
@click.option(
    "--layers",
    default=None,
    help="Comma-separated residual layers to probe (default: 0, the middle and the last).",
)
@click.option(
    "--mapper",
    "mappers",
    multiple=True,
    type=click.Choice(["plsr", "ffnn", "ridge"]),
    default=("plsr", "ffnn"),
    show_default=True,
    help="Repeatable.",
)
@click.option(
    "--embedding",
    type=click.Choice(["static", "isolated", "contextual"]),
    default="isolated",
    show_default=True,
    help="static: mean of the word's W_E rows (layer 0 only); isolated: the word alone "
    "through the model; contextual: mean over its occurrences in --file/--text.",
)
@click.option("--folds", type=int, default=10, show_default=True, help="Cross-validation folds.")
@click.option(
    "--seeds",
    type=int,
    default=1,
    show_default=True,
    help="Cross-validation repeats (seeds --seed, --seed+1, ...).",
)
@click.option(
    "--max-concepts",
    type=int,
    default=500,
    show_default=True,
    help="Probe at most this many concepts per norm set (a seeded sample).",
)
@click.option(
    "--condition",
    "conditions",
    multiple=True,
    type=click.Choice(list(CONDITIONS)),
    help="Conditions to run (repeatable; default: all that apply).",
)
@click.option("--per-feature", is_flag=True, help="Also Spearman rho per feature, across concepts.")
@click.option("--no-cache", is_flag=True, help="Recompute embeddings instead of reading the cache.")
def probe(**options: Any) -> None:
    """Probe type-level embeddings for feature norms, with every control beside the score.

    Maps each concept's vector to its norm vector (PLSR, a tanh FFNN, ridge; capacity chosen
    inside each training fold), k-fold cross-validated, under the system condition and its
    controls: upper bound, shuffled, shuffled upper, random features, taxonomic corruption,
    structured nonsense and a random-initialised model. Writes scores.csv, summary.csv (the
    paper-style table with 95% intervals), verdicts.csv, concepts.csv, run.json and figures.
    """
    from residual_trace.experiments.probe import ProbeConfig, describe, parse_layers, run_probe

    texts = list(options.pop("texts")) or None
    layers = options.pop("layers")
    options["layers"] = None if layers is None else parse_layers(layers)
    options["norms"] = tuple(options["norms"])
    options["mappers"] = tuple(options["mappers"])
    conditions = tuple(options.pop("conditions"))
    if conditions:
        options["conditions"] = conditions
    options["use_cache"] = not options.pop("no_cache")
    config = ProbeConfig(texts=texts, **options)
    result = run_probe(config, echo=_echo_err)
    if not config.quiet:
        click.echo(describe(result))


_EPILOG_REPORT = """\b
Examples:
  trace report                                      # minilm and smollm2, bundled inputs
  trace report --model bert-base-uncased --model gpt2 --out runs/bert-vs-gpt2
  trace report --config runs/bert-vs-gpt2/config.toml   # the same run again, from its config
"""


@trace.command("report", epilog=_EPILOG_REPORT)
@click.option(
    "--model",
    "-m",
    "models",
    multiple=True,
    help="A model to report on (repeatable; default: minilm and smollm2).",
)
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path),
    help="A report config (TOML), e.g. the config.toml written beside an earlier report.",
)
@click.option("--file", "-f", type=click.Path(path_type=Path), help="Texts, one per line.")
@click.option("--max-texts", type=int, default=None, help="Use the first N texts (default 60).")
@click.option(
    "--experiment",
    "experiments",
    multiple=True,
    type=click.Choice(["layers", "decompose", "perturb", "probe"]),
    help="Experiments to run (repeatable; default: all four).",
)
@click.option("--out", "-o", type=click.Path(path_type=Path), help="Output directory.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None)
@click.option("--seed", type=int, default=None, help="Seed of every experiment (default 0).")
@click.option("--quiet", "-q", is_flag=True, help="No progress, no verdicts printed.")
def report(**options: Any) -> None:
    """Every experiment on several models, side by side, as one report.

    Runs trace layers, decompose, perturb and probe on each model (a killed run resumes
    without redoing finished parts), then writes report.html (self-contained, figures
    embedded, no network requests), report.md, tables/, figures/, run.json and the
    config.toml that reproduces it. Command-line options override the --config file.
    """
    from dataclasses import replace

    from residual_trace.experiments.report import ReportConfig, run_report

    config_path = options.pop("config_path")
    config = ReportConfig.from_toml(config_path) if config_path else ReportConfig()
    overrides: dict[str, Any] = {}
    if options["models"]:
        overrides["models"] = list(options["models"])
    if options["experiments"]:
        overrides["experiments"] = list(options["experiments"])
    if options["file"] is not None:
        overrides["file"] = str(options["file"])
    for key in ("max_texts", "device", "seed"):
        if options[key] is not None:
            overrides[key] = options[key]
    overrides["out"] = str(options["out"]) if options["out"] else config.out
    overrides["quiet"] = options["quiet"]
    config = replace(config, **overrides)
    result = run_report(config, echo=_echo_err)
    if not config.quiet:
        click.echo("\n".join(f"- {line}" for line in result.verdicts))
        click.echo(f"wrote {result.out}/report.html, report.md, tables/, figures/, config.toml")


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point; ``argv`` lets tests run the CLI in-process."""
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    trace.main(args=list(argv) if argv is not None else None, prog_name="trace")


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
