"""Headless Chromium (Debian's chromium + chromium-driver) against a real `atlas serve`: the head
page and the concept page show the atlas's numbers, and the search box finds a head."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from atlas.pages.data import concept_heads, head_card
from atlas.store import Atlas
from tests.integration.test_server_support import add_concept_run, build_tiny_atlas, serve
from tests.tiny import save_tiny

CHROMIUM = Path("/usr/bin/chromium")
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"

pytestmark = [pytest.mark.slow,  # a real server process and a browser: the slow set, out of `make check`
              pytest.mark.skipif(not CHROMIUM.exists(),
                                 reason="Debian chromium is not installed (.ci/apt-packages.txt)")]


@pytest.fixture(scope="module")
def site(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """Two tiny models with patterns metrics and concept scores; expectations read before serving."""
    root = tmp_path_factory.mktemp("browser")
    db = root / "atlas.duckdb"
    build_tiny_atlas(db, [tiny_dir, save_tiny(root / "tiny-qwen2", "Qwen2ForCausalLM", seed=2)])
    add_concept_run(db)
    with Atlas(db) as atlas:
        key = atlas.execute("SELECT model_key FROM models ORDER BY model_key").column(0)[0].as_py()
        card = head_card(atlas, key, 1, 2)
        colors = concept_heads(atlas, "colors", top=3).to_pylist()
    with serve(db, "--executor", "local") as url:
        yield {"url": url, "key": key, "card": card, "colors": colors}


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def cells(driver: Any, selector: str) -> list[Any]:
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


def test_head_page_shows_the_atlas_numbers(site: dict[str, Any], browser: Any) -> None:
    from urllib.parse import quote

    card = site["card"]
    browser.get(f"{site['url']}/{quote(site['key'], safe='')}/1/2")
    assert "layer 1" in browser.find_element("id", "head-title").text
    shown = {row.get_attribute("data-metric"): row for row in cells(browser, "#metrics tr[data-metric]")}
    assert set(shown) == {m["metric"] for m in card["metrics"]} and shown
    for m in card["metrics"]:
        value = cells(shown[m["metric"]], "td.value")[0]
        assert float(value.get_attribute("data-value")) == m["value"]  # exact, from the page's markup
        assert float(value.text) == pytest.approx(m["value"], rel=1e-3, abs=1e-4)  # what a reader sees
        assert cells(shown[m["metric"]], "td.rank")[0].text == f"{m['rank']} / {m['of']}"
    concepts = {r.get_attribute("data-concept"): r for r in cells(browser, "#concepts tr[data-concept]")}
    for c in card["concepts"]:
        assert float(cells(concepts[c["concept"]], "td.value")[0].get_attribute("data-value")) == c["score"]


def test_concept_page_lists_top_heads_across_models(site: dict[str, Any], browser: Any) -> None:
    browser.get(f"{site['url']}/concept/colors?top=3")
    tables = cells(browser, "table.concept-heads")
    assert len(tables) == 2  # both models
    expected: dict[str, list[tuple[int, int, float]]] = {}
    for r in site["colors"]:
        expected.setdefault(r["model"], []).append((r["layer"], r["head"], r["score"]))
    for table in tables:
        rows = cells(table, "tr[data-layer]")
        got = [(int(r.get_attribute("data-layer")), int(r.get_attribute("data-head")),
                float(cells(r, "td.value")[0].get_attribute("data-value"))) for r in rows]
        assert got == expected[table.get_attribute("data-model")]


def test_search_box_opens_a_head_and_the_model_heatmap(site: dict[str, Any], browser: Any) -> None:
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 30)  # submitting a form navigates asynchronously: wait, never race
    browser.get(site["url"] + "/")
    box = browser.find_element("id", "search")
    box.send_keys(f"{site['key']} 1.2", Keys.ENTER)
    wait.until(ec.url_matches(r"/1/2$"))
    wait.until(ec.presence_of_element_located(("id", "head-title")))
    assert "head 2" in browser.find_element("id", "head-title").text
    browser.find_element("link text", f"all heads of {site['card']['model']}").click()
    selector = "table.heat[data-metric='patterns.induction'] td[data-layer='1'][data-head='2']"
    wait.until(ec.presence_of_element_located(("css selector", selector)))
    heat = cells(browser, selector)
    induction = next(m for m in site["card"]["metrics"] if m["metric"] == "patterns.induction")
    assert float(heat[0].get_attribute("data-value")) == induction["value"]
