"""``trace report`` on tiny models: the whole document, resuming a killed run, reproducing a
report from its saved config, a config checked whole before any work, and a page that needs
no network."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

import residual_trace.experiments.decompose as decompose_module
import residual_trace.experiments.layers as layers_module
import residual_trace.experiments.lens as lens_module
import residual_trace.experiments.perturb as perturb_module
import residual_trace.experiments.probe as probe_module
from residual_trace.cli import trace
from residual_trace.errors import UserError
from residual_trace.experiments.report import ReportOptions, run_report, slug

#: What each part's own summary contributes to depth.csv (per-block summaries of decompose
#: and perturb sit at the layer their block writes: layer = block + 1).
FROM_SUMMARY = {
    "layers": (
        "cos_input", "cos_input_lo", "cos_input_hi", "baseline",
        "identifiable", "identifiable_lo", "identifiable_hi",
    ),
    "decompose": (
        "proj_attn", "proj_attn_lo", "proj_attn_hi", "proj_mlp", "proj_mlp_lo", "proj_mlp_hi",
        "mix_raw", "mix_attn_n", "mix_attnres_n", "mix_attnres_n_lo", "mix_attnres_n_hi",
        "mix_attnresln_n", "mix_rollout", "mix_globenc", "mix_alti", "mix_vz", "mix_vz_rollout",
    ),
    "perturb": (
        "follow_index", "follow_index_lo", "follow_index_hi",
        "n_heads_token", "n_heads_position", "n_heads_undecided",
    ),
}  # fmt: skip
KINDS = ("bert", "gpt2")


def _options(tiny_dirs, **changes) -> ReportOptions:
    values = {
        "models": [str(tiny_dirs[k]) for k in KINDS],
        "max_texts": 4,
        "perturb_samples": 2,
        "probe_max_concepts": 40,
        "probe_folds": 3,
        "probe_mappers": ["ridge"],
        "device": "cpu",
    }
    values.update(changes)
    return ReportOptions(**values)


def _models(tiny_dirs, tiny_models) -> dict:
    return {str(tiny_dirs[k]): tiny_models[k] for k in KINDS}


def _report(options: ReportOptions, out: Path, models: dict):
    """What ``trace report`` does: parts saved into ``out`` as they finish, then the document."""
    result = run_report(options, warn=lambda m: None, workdir=out, models=models)
    result.save(out)
    return result


@pytest.fixture(scope="module")
def finished(tiny_dirs, tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "full"
    result = _report(_options(tiny_dirs), out, _models(tiny_dirs, tiny_models))
    return out, result


def _spy(monkeypatch, tiny_models) -> list[tuple[str, str]]:
    """Record (model kind, experiment) of every experiment that actually runs."""
    kind_of = {id(model): kind for kind, model in tiny_models.items()}
    calls: list[tuple[str, str]] = []
    for module, name in (
        (layers_module, "run_layers"),
        (decompose_module, "run_decompose"),
        (perturb_module, "run_perturb"),
        (probe_module, "run_probe"),
        (lens_module, "run_lens"),
    ):
        real = getattr(module, name)

        def spied(model, *args, _real=real, _experiment=name[4:], **kwargs):
            calls.append((kind_of[id(model)], _experiment))
            return _real(model, *args, **kwargs)

        monkeypatch.setattr(module, name, spied)
    return calls


def test_report_has_every_section_on_a_relative_depth_axis(finished, tiny_dirs):
    out, result = finished
    assert all(part.ran for part in result.parts) and len(result.parts) == 2 * 5
    # the tiny BERT is saved without an MLM head: its lens part is left out, with the reason
    # the command would refuse it with, and the decoder's logit lens is read
    skipped = [(Path(p.model).name, p.experiment) for p in result.parts if p.skipped]
    assert skipped == [("tiny-bert", "lens")]
    assert any(
        "tiny-bert: no lens part: --lens mlm (the default lens of an encoder)" in v
        and "no trained output head" in v
        for v in result.verdicts
    )
    assert any("tiny-gpt2, logit lens: its KL to the model's output" in v for v in result.verdicts)
    depth = pd.read_csv(out / "tables" / "depth.csv")
    for model in (str(tiny_dirs[k]) for k in KINDS):
        rows = depth[depth["model"] == model]
        assert rows["depth"].min() == 0.0 and rows["depth"].max() == 1.0
        assert rows["layer"].tolist() == [0, 1, 2]
        assert rows["block"].isna().tolist() == [True, False, False]
        assert (rows["block"].dropna() == rows["layer"][1:] - 1).all()
        for column in ("cos_input", "baseline", "identifiable", "proj_attn", "mix_attnres_n"):
            assert rows[column].notna().any(), column
        # random tiny models attend almost uniformly: the index may have no evidence, but
        # every head is counted under a verdict
        assert "follow_index" in rows
    heads = pd.read_csv(out / "tables" / "heads.csv")
    assert list(heads.columns) == [
        "model", "n_heads", "n_heads_position", "n_heads_token", "n_heads_undecided",
        "noise_floor", "position_heads",
    ]  # fmt: skip
    assert (
        heads["n_heads"]
        == heads["n_heads_position"] + heads["n_heads_token"] + heads["n_heads_undecided"]
    ).all()
    assert heads["n_heads"].tolist() == [2 * 4, 2 * 4]
    for name in ("drift", "identifiable", "sublayers", "mixing", "follow_index", "probe", "lens"):
        assert (out / "figures" / f"{name}.png").stat().st_size > 5_000
    assert set(result.figures()) == {
        "drift", "identifiable", "sublayers", "mixing", "follow_index", "probe", "lens"
    }  # fmt: skip
    text = (out / "report.md").read_text()
    assert "encoder" in text and "decoder" in text
    # the probe table with its controls, one column per condition
    assert (
        "| system | upper | shuffled | shuffled-upper | random | nonsense | random-init |" in text
    )
    assert any("expected to recover token identity near the top" in v for v in result.verdicts)
    assert any("expected to lose token identity steadily" in v for v in result.verdicts)
    assert any("follow positions" in v for v in result.verdicts)
    assert any("beats its shuffled" in v for v in result.verdicts)


def test_comparison_tables_are_the_parts_own_tables(finished, tiny_dirs):
    """depth.csv holds each part's own summary, unchanged: layers' per layer, decompose's and
    perturb's (per block) at layer = block + 1 and empty at layer 0; heads.csv counts the
    perturb part's own per-head verdicts; probe.csv is the probe parts' summaries."""
    out, _ = finished
    depth = pd.read_csv(out / "tables" / "depth.csv")
    measures = [c for c in depth.columns if c not in {"model", "family", "depth", "layer", "block"}]
    assert sorted(measures) == sorted(c for cs in FROM_SUMMARY.values() for c in cs)
    heads = pd.read_csv(out / "tables" / "heads.csv").set_index("model")
    probes = []
    for kind in KINDS:
        model = str(tiny_dirs[kind])
        runs = out / "runs" / slug(model)
        rows = depth[depth["model"] == model].set_index("layer")
        layers = pd.read_csv(runs / "layers" / "summary.csv").set_index("layer")
        assert layers.index.tolist() == [0, 1, 2]
        decompose = pd.read_csv(runs / "decompose" / "summary.csv")
        perturb = pd.read_csv(runs / "perturb" / "summary.csv")
        perturb = perturb[perturb["perturbation"] == "shuffle"]
        for summary, experiment in ((decompose, "decompose"), (perturb, "perturb")):
            assert summary["block"].tolist() == [0, 1], experiment
            by_layer = summary.set_index(summary["block"] + 1)
            for column in FROM_SUMMARY[experiment]:
                assert rows.loc[0, column] != rows.loc[0, column], column  # NaN at layer 0
                pd.testing.assert_series_equal(
                    rows.loc[[1, 2], column],
                    by_layer[column],
                    check_names=False,
                    check_dtype=False,
                    check_index_type=False,
                )
        for column in FROM_SUMMARY["layers"]:
            pd.testing.assert_series_equal(
                rows[column], layers[column], check_names=False, check_dtype=False
            )
        per_head = pd.read_csv(runs / "perturb" / "heads.csv")
        per_head = per_head[per_head["perturbation"] == "shuffle"]
        assert len(per_head) == 2 * 4
        for verdict in ("position", "token", "undecided"):
            expected = int((per_head["verdict"] == verdict).sum())
            assert heads.loc[model, f"n_heads_{verdict}"] == expected
            assert perturb[f"n_heads_{verdict}"].sum() == expected
        # (NaN where no head had evidence, as random tiny models may)
        floor = per_head["noise_floor"].max()
        assert heads.loc[model, "noise_floor"] == pytest.approx(floor, nan_ok=True)
        named = per_head[per_head["verdict"] == "position"].sort_values("follow_index")
        shown = heads.loc[model, "position_heads"]
        assert (shown if isinstance(shown, str) else "").split() == named["head_name"].tolist()
        probes.append(pd.read_csv(runs / "probe" / "summary.csv"))
    pd.testing.assert_frame_equal(
        pd.read_csv(out / "tables" / "probe.csv"), pd.concat(probes, ignore_index=True)
    )
    # lens.csv: the lens part's own summary of the residual states, on a relative-depth axis
    lens = pd.read_csv(out / "tables" / "lens.csv")
    gpt2 = str(tiny_dirs["gpt2"])
    assert set(lens["model"]) == {gpt2}  # the BERT part was left out
    own = pd.read_csv(out / "runs" / slug(gpt2) / "lens" / "summary.csv")
    own = own[own["site"] == "post"].reset_index(drop=True)
    assert (lens["depth"] == lens["layer"] / 2).all() and set(lens["family"]) == {"decoder"}
    pd.testing.assert_frame_equal(
        lens.drop(columns=["model", "family", "depth"]), own.drop(columns=["model"]),
        check_dtype=False,
    )  # fmt: skip
    skip = json.loads(
        (out / "runs" / slug(str(tiny_dirs["bert"])) / "lens" / "skipped.json").read_text()
    )
    assert "no trained output head" in skip["reason"] and skip["model"]["n_blocks"] == 2


def test_html_is_self_contained(finished):
    out, _ = finished
    page = (out / "report.html").read_text()
    images = re.findall(r"<img [^>]*src='([^']+)'", page)
    assert len(images) == 7 and all(src.startswith("data:image/png;base64,") for src in images)
    # nothing to fetch: no remote or relative resource references anywhere
    assert not re.search(r"(src|href)=['\"](?!data:)", page)
    assert "http://" not in page and "https://" not in page


def test_config_written_beside_the_report_reproduces_it(finished, tiny_dirs, tiny_models, tmp_path):
    out, _ = finished
    options = ReportOptions.from_toml(out / "config.toml")
    assert options == _options(tiny_dirs)  # every option survives the round trip
    assert options.to_toml() == (out / "config.toml").read_text()
    # run in memory this time (no workdir), then saved: the same tables
    again = tmp_path / "again"
    result = run_report(options, warn=lambda m: None, models=_models(tiny_dirs, tiny_models))
    assert not again.exists()
    result.save(again)
    for name in ("depth.csv", "heads.csv", "probe.csv"):
        pd.testing.assert_frame_equal(
            pd.read_csv(out / "tables" / name), pd.read_csv(again / "tables" / name)
        )
    for kind in KINDS:  # the parts are saved beside it too
        for experiment in ("layers", "decompose", "perturb", "probe"):
            assert (again / "runs" / slug(str(tiny_dirs[kind])) / experiment / "run.json").is_file()


def test_a_killed_run_resumes_without_redoing_finished_parts(
    finished, tiny_dirs, tiny_models, tmp_path, monkeypatch
):
    out = tmp_path / "killed"
    options = _options(tiny_dirs)
    models = _models(tiny_dirs, tiny_models)
    real = perturb_module.run_perturb

    def killed_on_the_second_model(model, *args, **kwargs):
        if model is tiny_models["gpt2"]:
            raise KeyboardInterrupt
        return real(model, *args, **kwargs)

    monkeypatch.setattr(perturb_module, "run_perturb", killed_on_the_second_model)
    with pytest.raises(KeyboardInterrupt):
        _report(options, out, models)
    assert (out / "runs" / slug(str(tiny_dirs["bert"])) / "probe" / "run.json").is_file()
    # nothing half-written: the finished parts of gpt2, and nothing else
    assert sorted(p.name for p in (out / "runs" / slug(str(tiny_dirs["gpt2"]))).iterdir()) == [
        "decompose",
        "layers",
    ]
    monkeypatch.setattr(perturb_module, "run_perturb", real)
    calls = _spy(monkeypatch, tiny_models)
    result = _report(options, out, models)
    assert sorted(calls) == [("gpt2", "lens"), ("gpt2", "perturb"), ("gpt2", "probe")]
    ran = {(Path(p.model).name, p.experiment) for p in result.parts if p.ran}
    assert ran == {("tiny-gpt2", "lens"), ("tiny-gpt2", "perturb"), ("tiny-gpt2", "probe")}
    # the left-out part is read back as left out, without asking the model again
    assert [(Path(p.model).name, p.experiment) for p in result.parts if p.skipped] == [
        ("tiny-bert", "lens")
    ]
    assert len(result.parts) == 2 * 5
    full, _ = finished
    for name in ("depth.csv", "heads.csv", "probe.csv", "lens.csv"):
        pd.testing.assert_frame_equal(
            pd.read_csv(full / "tables" / name), pd.read_csv(out / "tables" / name)
        )
    assert (full / "report.md").read_text() == (out / "report.md").read_text()
    # a changed option invalidates only what depends on it
    calls.clear()
    result = _report(_options(tiny_dirs, perturb_samples=3), out, models)
    assert sorted(calls) == [("bert", "perturb"), ("gpt2", "perturb")]
    assert {p.experiment for p in result.parts if p.ran} == {"perturb"}


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("models = [\n", "not valid TOML"),
        ('colour = "red"\n', "unknown key(s) colour"),
        ('experiments = ["dance"]\n', "experiments (--experiment): expected"),
        ("models = []\n", "at least one model"),
        ('max_texts = "5"\n', "max_texts (--max-texts): expected an integer, got '5'"),
        ("max_texts = 0\n", "max_texts (--max-texts): must be at least 1, got 0"),
        ("probe_depths = [0.5, 2.0]\n", "probe_depths"),
    ],
)
def test_bad_configs_are_one_line_errors(tmp_path, content, fragment):
    path = tmp_path / "config.toml"
    path.write_text(content)
    out = tmp_path / "r"
    result = CliRunner().invoke(trace, ["report", "--config", str(path), "-o", str(out)])
    assert result.exit_code == 1 and fragment in result.output, result.output
    assert result.output.startswith("Error: ") and result.output.count("\n") == 1
    assert "Traceback" not in result.output
    assert not out.exists()


def test_a_parts_option_is_checked_before_any_model_loads(tmp_path):
    """A bad value for one part (perturb's samples) is refused when the config is read: the
    error is about it, not about the model that does not exist and was never loaded."""
    path = tmp_path / "config.toml"
    path.write_text('models = ["no-such-org/no-such-model"]\nperturb_samples = 0\n')
    out = tmp_path / "r"
    result = CliRunner().invoke(trace, ["report", "--config", str(path), "-o", str(out)])
    assert result.exit_code == 1, result.output
    assert result.output.count("\n") == 1 and "Traceback" not in result.output
    assert "perturb" in result.output and "samples" in result.output
    assert "must be between 1 and 100,000, got 0" in result.output
    assert "no-such-model" not in result.output
    assert not out.exists()
    # the same check in the API, before run_report can be called
    with pytest.raises(UserError, match="samples"):
        ReportOptions(models=["no-such-org/no-such-model"], perturb_samples=0)
    # and with a good value the same config gets as far as the model, which fails there
    path.write_text('models = ["no-such-org/no-such-model"]\nperturb_samples = 1\n')
    result = CliRunner().invoke(trace, ["report", "--config", str(path), "-o", str(out)])
    assert result.exit_code == 1 and "no-such" in result.output, result.output


def test_unknown_keys_are_refused_by_name(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text('max_texts = 3\nperturb_sample = 2\nfigure_fromat = "svg"\n')
    with pytest.raises(UserError, match=r"unknown key\(s\) figure_fromat, perturb_sample"):
        ReportOptions.from_toml(path)


_CHECK = """<script>
window.addEventListener('load', () => {
  const images = [...document.images];
  const rendered = images.filter(i => i.complete && i.naturalWidth > 0).length;
  const requests = performance.getEntriesByType('resource').map(e => e.name)
    .filter(n => !n.startsWith('data:'));
  const out = document.createElement('pre');
  out.id = 'rt-check';
  out.textContent = JSON.stringify({images: images.length, rendered, requests});
  document.body.appendChild(out);
});
</script>"""

_CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _checked(chromium: str, page: Path, profile: Path) -> dict:
    """Open ``page`` (with :data:`_CHECK` injected) and read back what the script found."""
    import json
    import subprocess

    dom = subprocess.run(
        [
            chromium,
            *_CHROMIUM_FLAGS,
            f"--user-data-dir={profile}",
            "--virtual-time-budget=10000",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    found = re.search(r'<pre id="rt-check">([^<]*)</pre>', dom)
    assert found, dom[-500:]
    return json.loads(found.group(1).replace("&quot;", '"'))


def test_report_renders_in_headless_chromium_without_network(finished, tmp_path):
    """Every figure decodes and the page requests nothing; a screenshot is kept as a test
    artefact in test-artifacts/report.png. `make test` installs Debian's chromium."""
    import shutil
    import subprocess

    chromium = shutil.which("chromium")
    assert chromium, "headless Chromium is needed: apt-get install chromium (make test does)"
    out, _ = finished
    page = tmp_path / "checked.html"
    page.write_text((out / "report.html").read_text().replace("</body>", _CHECK + "</body>"))
    check = _checked(chromium, page, tmp_path / "profile-dom")
    assert check == {"images": 7, "rendered": 7, "requests": []}
    # the checker itself notices a page that fetches something (a refused local address)
    leaky = tmp_path / "leaky.html"
    leaky.write_text(
        page.read_text().replace("<h1>", "<img src='http://127.0.0.1:9/x.png'><h1>", 1)
    )
    leak = _checked(chromium, leaky, tmp_path / "profile-leak")
    assert leak["requests"] == ["http://127.0.0.1:9/x.png"] and leak["rendered"] == 7
    artefacts = Path(__file__).parents[2] / "test-artifacts"
    artefacts.mkdir(exist_ok=True)
    shot = artefacts / "report.png"
    shot.unlink(missing_ok=True)
    subprocess.run(
        [
            chromium,
            *_CHROMIUM_FLAGS,
            f"--user-data-dir={tmp_path / 'profile-shot'}",
            "--window-size=1280,3200",
            f"--screenshot={shot}",
            (out / "report.html").as_uri(),
        ],
        capture_output=True,
        timeout=120,
        check=True,
    )
    assert shot.stat().st_size > 50_000


def test_report_names_the_positional_heads_most_positional_first():
    from residual_trace.experiments.report.document import head_shares, verdict_lines
    from residual_trace.experiments.report.parts import Part

    heads = pd.DataFrame(
        {
            "perturbation": ["shuffle"] * 4 + ["swap"],
            "head_name": ["L0H0", "L0H1", "L1H0", "L1H1", "L1H1"],
            "follow_index": [-0.2, 0.9, -0.8, 0.1, -0.9],
            "verdict": ["position", "token", "position", "undecided", "position"],
            "noise_floor": [1e-6, 2e-6, 1e-6, 1e-6, 5e-6],
        }
    )
    part = Part("m", "perturb", {"heads": heads}, info={})
    table = head_shares([part], "shuffle")
    row = table.iloc[0]
    assert (row["n_heads"], row["n_heads_position"], row["n_heads_token"]) == (4, 2, 1)
    assert row["position_heads"] == "L1H0 L0H0"  # by follow_index, most positional first
    options = ReportOptions(models=("m",), experiments=("perturb",), perturb_mode="shuffle")
    depth = pd.DataFrame({"model": ["m"], "layer": [0], "family": ["encoder"]})
    lines = verdict_lines(options, depth, table, pd.DataFrame())
    assert any("Most positional: L1H0, L0H0." in line for line in lines)


def test_a_tuned_lens_joins_the_lens_part_of_its_model(tiny_dirs, tiny_models, tmp_path):
    """``tuned_lenses`` (``--tuned-lens MODEL=DIR``) adds the tuned lens to that model's lens
    part: the report's lens table holds both lenses as ``trace lens`` computes them, each with
    its verdict; a retrained lens in the same folder runs the part again."""
    import residual_trace as rt

    gpt2 = str(tiny_dirs["gpt2"])
    folder = tmp_path / "lens"
    rt.train_lens(tiny_models["gpt2"], ["A cat sat on the mat.", "Rain fell."], steps=2,
                  tokens_per_step=16).save(folder)  # fmt: skip
    options = _options(tiny_dirs, models=[gpt2], experiments=["lens"],
                       tuned_lenses=[f"{gpt2}={folder}"])  # fmt: skip
    result = run_report(options, warn=lambda m: None, models=_models(tiny_dirs, tiny_models))
    lens = result.tables["lens"]
    assert list(dict.fromkeys(lens["lens"])) == ["logit", "tuned"]
    direct = rt.lens(tiny_models["gpt2"], options.load_texts()[0], tuned_lens=folder).summary
    direct = direct[direct["site"] == "post"].reset_index(drop=True)
    pd.testing.assert_frame_equal(
        lens.drop(columns=["model", "family", "depth"]), direct.drop(columns=["model"])
    )
    for name in ("logit", "tuned"):
        assert any(v.startswith(f"{gpt2}, {name} lens: its KL") for v in result.verdicts)
    assert "lens" in result.figures()
    assert options.fingerprint(gpt2, "lens") != _options(
        tiny_dirs, models=[gpt2], experiments=["lens"]
    ).fingerprint(gpt2, "lens")
    before = options.fingerprint(gpt2, "lens")
    rt.train_lens(tiny_models["gpt2"], ["Other words entirely.", "And more."], steps=2,
                  tokens_per_step=16).save(folder, overwrite=True)  # fmt: skip
    assert options.fingerprint(gpt2, "lens") != before


@pytest.mark.parametrize(
    ("entry", "fragment"),
    [
        ("nonsense", "expected MODEL=DIR, got 'nonsense'"),
        ("other-model=/tmp", "other-model is not a model of this report"),
        ("{gpt2}={missing}", "no config.json in it"),
    ],
)
def test_bad_tuned_lens_entries_are_one_line_errors(tiny_dirs, tmp_path, entry, fragment):
    gpt2 = str(tiny_dirs["gpt2"])
    missing = tmp_path / "empty"
    missing.mkdir()
    with pytest.raises(UserError, match=re.escape(fragment)) as error:
        _options(tiny_dirs, tuned_lenses=[entry.format(gpt2=gpt2, missing=missing)])
    assert "tuned_lenses (--tuned-lens)" in str(error.value) and "\n" not in str(error.value)


def test_the_lens_verdict_says_from_which_layer_the_kl_stays_below_its_null():
    """Constructed summaries: the first layer from which the KL stays below the unigram null
    (the top, where KL is 0 by definition, left out), or none when the layer below the top
    is above it."""
    from residual_trace.experiments.report.document import _below_null_from

    def rows(kl):
        return pd.DataFrame({"layer": range(len(kl)), "kl_final": kl, "kl_unigram": 3.0})

    assert _below_null_from(rows([5.0, 2.0, 4.0, 2.5, 1.0, 0.0])) == 3
    assert _below_null_from(rows([1.0, 2.0, 0.5, 0.0])) == 0
    assert _below_null_from(rows([5.0, 2.0, 4.0, 0.0])) is None
