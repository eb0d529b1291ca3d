"""viewer.html in a real browser (Debian's chromium driven by selenium and chromedriver).

Each verb's page on a packaged model loads from ``file://`` with no outside request and no
JavaScript error; every control changes what is drawn; a hovered cell shows the value the
CSV holds for it (within the stated quantisation step); clicking a token or a head does what
the page says. ``make test`` installs chromium and chromium-driver.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest

import residual_trace as rt

pytestmark = pytest.mark.slow

#: Display rounding (4 decimals) plus the 16-bit step of a range of at most 1.
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def runs(packaged_runs, tmp_path_factory):
    """The viewers of minilm's decompose and perturb and smollm2's lens and patch, saved."""
    out = tmp_path_factory.mktemp("viewer")
    results = {
        "decompose": packaged_runs["minilm"]["decompose"],
        "perturb": packaged_runs["minilm"]["perturb"],
        "lens": packaged_runs["smollm2"]["lens"],
        "patch": packaged_runs["smollm2"]["patch"],
    }
    for name, result in results.items():
        result.save(out / name)
    return out, results


@pytest.fixture(scope="module")
def driver():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium and chromedriver, "apt-get install chromium chromium-driver (make test does)"
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1600",
                 "--disable-background-networking", "--disable-component-update"):  # fmt: skip
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    browser = webdriver.Chrome(options=options, service=Service(chromedriver))
    yield browser
    browser.quit()


def _open(driver, page: Path) -> dict:
    """Load ``page``; the requests it made beyond itself and its severe console messages."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get_log("performance"), driver.get_log("browser")  # drop what came before
    driver.get(page.as_uri())
    WebDriverWait(driver, 30).until(
        lambda d: (
            d.execute_script("return document.body.getAttribute('data-ready')") == "1"
            or d.get_log("browser")
        )
    )
    requests = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            url = message["params"]["request"]["url"]
            if not url.startswith(("file:", "data:", "blob:")):
                requests.append(url)
    errors = [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    return {"requests": requests, "errors": errors}


def _signatures(section) -> list[str]:
    return [
        svg.get_attribute("data-signature") for svg in section.find_elements("css selector", "svg")
    ]


def _hover(driver, section, name: str, row: int, column: int) -> str:
    from selenium.webdriver.common.action_chains import ActionChains

    cell = section.find_element(
        "css selector", f'svg[data-name="{name}"] rect[data-r="{row}"][data-c="{column}"]'
    )
    ActionChains(driver).move_to_element(cell).perform()
    return driver.find_element("css selector", ".rt-tip").text


def _value(tip: str) -> float:
    found = re.search(r"(?:=|effect|weight|index) (-?[0-9.e+-]+|n/a)", tip)
    assert found, tip
    return float("nan") if found.group(1) == "n/a" else float(found.group(1))


def _choose(section, control: str, value: str) -> None:
    from selenium.webdriver.support.ui import Select

    Select(
        section.find_element("css selector", f'select[data-control="{control}"]')
    ).select_by_value(value)


def _every_control_changes_the_drawing(section) -> int:
    """Each enabled control, set to each of its other values, changes some drawn map."""
    from selenium.webdriver.support.ui import Select

    changed = 0
    for box in section.find_elements("css selector", "select"):
        if not box.is_enabled():
            continue
        choice = Select(box)
        values = [o.get_attribute("value") for o in choice.options]
        for value in values[1:]:
            before = _signatures(section)
            choice.select_by_value(value)
            assert _signatures(section) != before, (box.get_attribute("data-control"), value)
            changed += 1
        choice.select_by_value(values[0])
    return changed


def test_pages_load_offline_without_errors_and_every_control_draws(runs, driver, tmp_path):
    out, _ = runs
    for name in ("decompose", "perturb", "lens", "patch"):
        page = out / name / "viewer.html"
        found = _open(driver, page)
        assert found == {"requests": [], "errors": []}, name
        section = driver.find_element("css selector", "section.rt-view")
        assert section.get_attribute("data-ready") == "1"
        assert _every_control_changes_the_drawing(section) >= 1, name
        urls = set(re.findall(r"https?://[^\s\"']+", page.read_text()))
        assert urls == set(), urls
    # the checks notice a page that reaches out (a refused local address)
    leaky = tmp_path / "leaky.html"
    text = (out / "lens" / "viewer.html").read_text()
    leaky.write_text(text.replace("<h2>", "<img src='http://127.0.0.1:9/x.png'><h2>", 1))
    leak = _open(driver, leaky)
    assert leak["requests"] or any("127.0.0.1" in e for e in leak["errors"])


def _weight(heads: pd.DataFrame, block: int) -> pd.DataFrame:
    """attention_heads.csv's row of text 1, head 5, target 4 and source 2 at ``block``."""
    where = (heads["text_id"] == 1) & (heads["block"] == block) & (heads["head"] == 5)
    return heads[where & (heads["target"] == 4) & (heads["source"] == 2)]


def test_hovered_cells_show_the_csv_values(runs, driver):
    out, _ = runs
    # decompose: text 1, block 2, ALTI and one head's weight
    _open(driver, out / "decompose" / "viewer.html")
    section = driver.find_element("css selector", "section.rt-view")
    _choose(section, "text", "1")
    _choose(section, "block", "2")
    pairs = pd.read_csv(out / "decompose" / "mixing_pairs.csv")
    for measure, column in (("alti", "alti"), ("share", "share"), ("vz", "vz")):
        _choose(section, "measure", measure)
        row = pairs[
            (pairs.text_id == 1) & (pairs.block == 2) & (pairs.target == 4) & (pairs.source == 2)
        ]
        assert (
            abs(_value(_hover(driver, section, "decompose", 4, 2)) - row[column].item()) < TOLERANCE
        )
    _choose(section, "measure", "attention")
    _choose(section, "head", "5")
    heads = pd.read_csv(out / "decompose" / "attention_heads.csv")
    row = _weight(heads, block=2)
    tip = _hover(driver, section, "decompose", 4, 2)
    assert abs(_value(tip) - row["attention"].item()) < TOLERANCE
    assert "'dog'" in tip or "'a'" in tip  # both tokens named, markers removed
    # clicking a token draws its row across blocks, equal to the map's row at each block
    section.find_element("css selector", 'svg[data-name="decompose"] text[data-row="4"]').click()
    tip = _hover(driver, section, "row", 3, 2)
    assert "block 3" in tip
    row = _weight(heads, block=3)
    assert abs(_value(tip) - row["attention"].item()) < TOLERANCE


def test_perturb_lens_and_patch_cells_equal_their_tables(runs, driver):
    out, results = runs
    _open(driver, out / "perturb" / "viewer.html")
    section = driver.find_element("css selector", "section.rt-view")
    heads = pd.read_csv(out / "perturb" / "heads.csv")
    mode = results["perturb"].mode
    row = heads[(heads.perturbation == mode) & (heads.block == 3) & (heads["head"] == 7)].iloc[0]
    tip = _hover(driver, section, "grid", 3, 7)
    assert abs(_value(tip) - row["follow_index"]) < 1e-3 and str(row["verdict"]) in tip
    # a click on a head in the grid shows that head's patterns and verdict
    section.find_element(
        "css selector", 'svg[data-name="grid"] rect[data-r="3"][data-c="7"]'
    ).click()
    assert "L3H7" in section.find_element("css selector", ".rt-info").text
    example = results["perturb"].example
    tip = _hover(driver, section, "original", 2, 1)
    assert abs(_value(tip) - float(example.original[(3, 7)][2, 1])) < TOLERANCE
    # lens: the top token and its probability at text 1, position 3, layer 10
    _open(driver, out / "lens" / "viewer.html")
    section = driver.find_element("css selector", "section.rt-view")
    _choose(section, "text", "1")
    lens = pd.read_csv(out / "lens" / "lens.csv")
    n_layers = lens["layer"].max() + 1
    cell = lens[
        (lens.text_id == 1) & (lens.position == 3) & (lens.layer == 10) & (lens.site == "post")
    ]
    tip = _hover(driver, section, "lens", n_layers - 1 - 10, 3)
    assert abs(_value(tip) - cell["top_prob"].item()) < TOLERANCE
    assert "layer 10" in tip
    # patch: head 3 of block 5 (every position at once), then the residual stream
    _open(driver, out / "patch" / "viewer.html")
    section = driver.find_element("css selector", "section.rt-view")
    patch = pd.read_csv(out / "patch" / "patch.csv")
    patched = patch[patch["condition"] == "patch"]
    _choose(section, "site", "head")
    cell = patched[(patched.site == "head") & (patched.block == 5) & (patched["head"] == 3)]
    tip = _hover(driver, section, "patch", 5, 3)
    assert "block 5, head 3" in tip and abs(_value(tip) - cell["effect"].item()) < 1e-3
    _choose(section, "site", "resid")
    cell = patched[(patched.site == "resid") & (patched.layer == 12) & (patched.position == 3)]
    assert abs(_value(_hover(driver, section, "patch", 3, 12)) - cell["effect"].item()) < 1e-3


def test_two_texts_of_128_tokens_on_minilm_stay_within_5_mb(packaged_runs, driver, tmp_path):
    """The budget the pages promise: decompose with every head's weights and perturb with every
    head's patterns, on two texts truncated to 128 tokens; the pages load and draw."""
    from residual_trace.experiments import bundled_sentences
    from residual_trace.viewer import PAGE_BUDGET

    model = packaged_runs["minilm"]["decompose"].model
    sentences = bundled_sentences()
    texts = [" ".join(sentences[:40]), " ".join(sentences[40:80])]
    options = {"max_length": 128, "quiet": True}  # the truncation warnings are expected
    decompose = rt.decompose(model, texts, per_head=True, **options)
    perturb = rt.perturb(model, texts, **options)
    assert set(decompose.tables["mixing"].groupby("text_id").size() // model.n_blocks) == {128}
    for name, result in (("decompose", decompose), ("perturb", perturb)):
        page = result.viewer_html()
        assert page is not None and len(page.encode()) <= PAGE_BUDGET, (name, len(page))
        assert "not drawn" not in page  # everything fits: nothing was left out
        path = tmp_path / f"{name}.html"
        path.write_text(page, encoding="utf-8")
        assert _open(driver, path) == {"requests": [], "errors": []}
        section = driver.find_element("css selector", "section.rt-view")
        assert section.get_attribute("data-ready") == "1"
