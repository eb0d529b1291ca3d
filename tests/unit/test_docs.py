"""The documentation site: built strictly, every relative link of the README resolving, and
the built site opening from disk in headless Chromium with no request to the network."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
DOCS = ROOT / "docs"


def _build(config: Path, site: Path) -> subprocess.CompletedProcess[str]:
    mkdocs = Path(sys.executable).with_name("mkdocs")
    return subprocess.run(
        [str(mkdocs), "build", "--strict", "--config-file", str(config), "--site-dir", str(site)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("site")
    done = _build(ROOT / "mkdocs.yml", target)
    assert done.returncode == 0, done.stderr[-2000:]
    return target


def test_every_page_is_built_with_the_api_reference_from_the_docstrings(site):
    pages = {p.stem for p in DOCS.glob("*.md")}
    assert {p.stem for p in site.glob("*.html")} >= pages, pages
    reference = (site / "reference.html").read_text(encoding="utf-8")
    for name in ("LayersOptions", "DecomposeResult", "load_model", "drift_table", "Experiment"):
        assert 'id="residual_trace.' in reference and name in reference, name
    # a docstring's own words reach the page (not just the names)
    assert "Write every table, figure and" in reference
    import residual_trace as rt

    undocumented = [name for name in rt.__all__ if name not in reference]  # every public name
    assert undocumented == []
    # the docstrings' Sphinx roles do not show as text (":func:" before a name)
    assert re.search(r":(func|class|meth|mod|data|attr|exc):<code>", reference) is None


def test_a_broken_link_fails_the_strict_build(tmp_path):
    """The check above can fail: a copy of the docs with one link to a missing page and one
    to a missing anchor does not build."""
    docs = tmp_path / "docs"
    shutil.copytree(DOCS, docs)
    page = docs / "errors.md"
    page.write_text(page.read_text() + "\nSee [nowhere](no-such-page.md).\n", encoding="utf-8")
    config = tmp_path / "mkdocs.yml"
    config.write_text(
        (ROOT / "mkdocs.yml").read_text().replace("docs_dir: docs", f"docs_dir: {docs}")
    )
    done = _build(config, tmp_path / "site")
    assert done.returncode != 0 and "no-such-page.md" in done.stderr, done.stderr[-1000:]


def test_every_relative_link_of_the_readme_resolves():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme)
    local = [link for link in links if not re.match(r"[a-z]+:", link)]
    assert len(local) >= 10, local
    missing = [link for link in local if not (ROOT / link).exists()]
    assert missing == []


_CHECK = """<script>
window.addEventListener('load', () => setTimeout(() => {
  const input = document.querySelector('.md-search__input');
  input.focus();
  input.value = 'drift';
  for (const kind of ['input', 'keyup', 'change'])
    input.dispatchEvent(new Event(kind, {bubbles: true}));
  setTimeout(() => {
    const requests = performance.getEntriesByType('resource').map(e => e.name);
    const meta = document.querySelector('.md-search-result__meta');
    const out = document.createElement('pre');
    out.id = 'rt-check';
    out.textContent = JSON.stringify({
      requests, title: document.title, sheets: document.styleSheets.length,
      search: meta ? meta.textContent : null,
      hits: document.querySelectorAll('.md-search-result__item').length});
    document.body.appendChild(out);
  }, 3000);
}, 1000));
</script>"""


def _open(chromium: str, page: Path, profile: Path) -> dict:
    dom = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={profile}", "--virtual-time-budget=10000",
         "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout  # fmt: skip
    found = re.search(r'<pre id="rt-check">([^<]*)</pre>', dom)
    assert found, dom[-500:]
    return json.loads(found.group(1).replace("&quot;", '"'))


def test_the_built_site_opens_from_disk_without_the_network(site, tmp_path):
    """The front page requests nothing outside the site (no web font, no CDN script: the
    search's Web Worker shim is shipped in docs/assets), its styles load from disk, and the
    offline search index is there. `make test` installs Debian's chromium."""
    chromium = shutil.which("chromium")
    assert chromium, "headless Chromium is needed: apt-get install chromium (make test does)"
    page = site / "index.html"
    original = page.read_text(encoding="utf-8")
    page.write_text(original.replace("</body>", _CHECK + "</body>"), encoding="utf-8")
    try:
        check = _open(chromium, page, tmp_path / "profile")
        # (Chromium lists no timing entry for a file:// resource: any entry is a request out)
        assert check["requests"] == [], check
        assert check["sheets"] >= 2 and check["title"] == "residual-trace", check
        # the search works from disk: typing a word lists the pages that hold it
        assert check["hits"] >= 3 and "matching" in (check["search"] or ""), check
        # the checker notices a page that reaches out (a refused local address)
        leaky = original.replace(
            "</body>", "<img src='http://127.0.0.1:9/x.png'>" + _CHECK + "</body>"
        )
        page.write_text(leaky, encoding="utf-8")
        leak = _open(chromium, page, tmp_path / "profile-leak")
        assert "http://127.0.0.1:9/x.png" in leak["requests"]
    finally:
        page.write_text(original, encoding="utf-8")


def test_each_verb_page_lists_every_option_of_its_command(site):
    """The options tables are generated from the options classes: every flag `trace VERB
    --help` shows is on the verb's page, and a page without its table would fail here."""
    from residual_trace.cli import trace
    from residual_trace.experiments.registry import EXPERIMENTS

    for experiment in EXPERIMENTS:
        page = (site / f"{experiment.name}.html").read_text(encoding="utf-8")
        command = trace.commands[experiment.name]
        flags = {o for p in command.params for o in p.opts if o.startswith("--")} - {"--help"}
        missing = sorted(f for f in flags if f"<code>{f}</code>" not in page)
        assert missing == [], (experiment.name, missing)


def test_no_list_renders_as_run_on_text(site):
    """Python-Markdown needs a blank line before a list (GitHub does not): a list written
    straight after a paragraph line ends up inside the paragraph as '- ...' text."""
    run_on = []
    for page in sorted(site.glob("*.html")):
        for paragraph in re.findall(r"<p>(.*?)</p>", page.read_text(encoding="utf-8"), re.S):
            if re.search(r"\n\s*(?:[-*]|\d+\.) \S", paragraph):
                run_on.append(f"{page.name}: {paragraph[:60]!r}")
    assert run_on == []
