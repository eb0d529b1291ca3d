"""``trace report`` on tiny models: the whole document, resuming a killed run, reproducing a
report from its saved config, and a page that needs no network."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

import residual_trace.experiments.perturb as perturb_module
from residual_trace.cli import trace
from residual_trace.experiments.report import ReportConfig, run_report


def _config(tiny_dirs, out: Path, **changes) -> ReportConfig:
    values = {
        "models": [str(tiny_dirs["bert"]), str(tiny_dirs["gpt2"])],
        "max_texts": 4,
        "perturb_samples": 2,
        "probe_max_concepts": 40,
        "probe_folds": 3,
        "probe_mappers": ["ridge"],
        "out": str(out),
        "quiet": True,
        "device": "cpu",
    }
    values.update(changes)
    return ReportConfig(**values)


def _models(tiny_dirs, tiny_models) -> dict:
    return {str(tiny_dirs[k]): tiny_models[k] for k in ("bert", "gpt2")}


@pytest.fixture(scope="module")
def finished(tiny_dirs, tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "full"
    result = run_report(
        _config(tiny_dirs, out), echo=lambda m: None, models=_models(tiny_dirs, tiny_models)
    )
    return out, result


def test_report_has_every_section_on_a_relative_depth_axis(finished, tiny_dirs):
    out, result = finished
    assert all(part.ran for part in result.parts) and len(result.parts) == 2 * 4
    depth = pd.read_csv(out / "tables" / "depth.csv")
    for model in (str(tiny_dirs["bert"]), str(tiny_dirs["gpt2"])):
        rows = depth[depth["model"] == model]
        assert rows["depth"].min() == 0.0 and rows["depth"].max() == 1.0
        for column in ("cos_input", "baseline", "identifiable", "proj_attn", "mix_norm"):
            assert rows[column].notna().any(), column
        # random tiny models attend almost uniformly: the index may have no evidence, but
        # every head is counted under a verdict
        assert "index" in rows
    heads = pd.read_csv(out / "tables" / "heads.csv")
    assert (heads["heads"] == heads["position"] + heads["token"] + heads["undecided"]).all()
    assert heads["heads"].tolist() == [2 * 4, 2 * 4]
    # the comparison tables are the parts' own tables, on the new axis
    layers = pd.read_csv(out / "runs" / "tiny-bert" / "layers" / "summary.csv")
    bert = depth[depth["model"] == str(tiny_dirs["bert"])].set_index("layer")
    pd.testing.assert_series_equal(
        bert["cos_input"], layers.set_index("layer")["cos_input"], check_names=False
    )
    for name in ("drift", "identifiable", "sublayers", "mixing", "index", "probe"):
        assert (out / "figures" / f"{name}.png").stat().st_size > 5_000
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


def test_html_is_self_contained(finished):
    out, _ = finished
    page = (out / "report.html").read_text()
    images = re.findall(r"<img [^>]*src='([^']+)'", page)
    assert len(images) == 6 and all(src.startswith("data:image/png;base64,") for src in images)
    # nothing to fetch: no remote or relative resource references anywhere
    assert not re.search(r"(src|href)=['\"](?!data:)", page)
    assert "http://" not in page and "https://" not in page


def test_config_written_beside_the_report_reproduces_it(finished, tiny_dirs, tiny_models, tmp_path):
    out, _ = finished
    config = ReportConfig.from_toml(out / "config.toml")
    again = tmp_path / "again"
    config = ReportConfig(**{**config.__dict__, "out": str(again), "quiet": True})
    run_report(config, echo=lambda m: None, models=_models(tiny_dirs, tiny_models))
    for name in ("depth.csv", "heads.csv", "probe.csv"):
        pd.testing.assert_frame_equal(
            pd.read_csv(out / "tables" / name), pd.read_csv(again / "tables" / name)
        )


def test_a_killed_run_resumes_without_redoing_finished_parts(
    finished, tiny_dirs, tiny_models, tmp_path, monkeypatch
):
    out = tmp_path / "killed"
    config = _config(tiny_dirs, out)
    models = _models(tiny_dirs, tiny_models)
    real = perturb_module.run_perturb

    def killed_on_the_second_model(perturb_config, echo, model):
        if "gpt2" in perturb_config.model:
            raise KeyboardInterrupt
        return real(perturb_config, echo=echo, model=model)

    monkeypatch.setattr(perturb_module, "run_perturb", killed_on_the_second_model)
    with pytest.raises(KeyboardInterrupt):
        run_report(config, echo=lambda m: None, models=models)
    assert (out / "runs" / "tiny-bert" / "probe" / "run.json").is_file()
    assert not (out / "runs" / "tiny-gpt2" / "perturb").exists()  # nothing half-written
    monkeypatch.setattr(perturb_module, "run_perturb", real)
    result = run_report(config, echo=lambda m: None, models=models)
    ran = {(p.model.split("/")[-1], p.experiment): p.ran for p in result.parts}
    assert not any(v for (m, _), v in ran.items() if m == "tiny-bert")
    assert ran[("tiny-gpt2", "perturb")] and not ran[("tiny-gpt2", "layers")]
    full, _ = finished
    for name in ("depth.csv", "heads.csv", "probe.csv"):
        pd.testing.assert_frame_equal(
            pd.read_csv(full / "tables" / name), pd.read_csv(out / "tables" / name)
        )
    # a changed option invalidates only what depends on it
    changed = _config(tiny_dirs, out, perturb_samples=3)
    result = run_report(changed, echo=lambda m: None, models=models)
    assert {p.experiment for p in result.parts if p.ran} == {"perturb"}


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("models = [\n", "not valid TOML"),
        ('colour = "red"\n', "unknown key(s) colour"),
        ('experiments = ["dance"]\n', "experiments must be some of"),
        ("models = []\n", "at least one --model"),
    ],
)
def test_bad_configs_are_one_line_errors(tmp_path, content, fragment):
    path = tmp_path / "config.toml"
    path.write_text(content)
    result = CliRunner().invoke(trace, ["report", "--config", str(path), "-o", str(tmp_path / "r")])
    assert result.exit_code == 1 and fragment in result.output
    assert "Traceback" not in result.output


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
    assert check == {"images": 6, "rendered": 6, "requests": []}
    # the checker itself notices a page that fetches something (a refused local address)
    leaky = tmp_path / "leaky.html"
    leaky.write_text(
        page.read_text().replace("<h1>", "<img src='http://127.0.0.1:9/x.png'><h1>", 1)
    )
    leak = _checked(chromium, leaky, tmp_path / "profile-leak")
    assert leak["requests"] == ["http://127.0.0.1:9/x.png"] and leak["rendered"] == 6
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
