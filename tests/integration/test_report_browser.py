"""The comparison report on the three embedded models (SmolLM2, Gemma 3, Qwen2.5), rendered in headless
Chromium, as `atlas compare llama gemma qwen --out report.html` writes it.

Checks: no network request at all, every plot rendered, plotly inlined once, numbers on the page equal the
atlas (heatmaps, top heads, role counts, the cross-model consistency table); and head matching pairs each
model's role heads with the other model's heads of the same role.
Set ATLAS_REPORT_SCREENSHOT=docs/report.png to also save the README screenshot.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest

from atlas.match import Matcher
from atlas.queries import rank_heads
from atlas.report import compare, write_report
from atlas.store import Atlas

pytestmark = pytest.mark.slow

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1400,1000"]


@pytest.fixture(scope="module")
def real_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from workers.build import build

    db = tmp_path_factory.mktemp("report-real") / "atlas.duckdb"
    report = build(["llama", "gemma", "qwen"], ["patterns"], db, device="cpu", executor="local")
    assert not report.failed, report.failed
    return db


@pytest.fixture()
def browser():
    if not CHROMIUM.exists() or not CHROMEDRIVER.exists():
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver; "
                    "listed in .ci/apt-packages.txt)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    with tempfile.TemporaryDirectory() as profile:
        for flag in [*FLAGS, f"--user-data-dir={profile}"]:
            options.add_argument(flag)
        options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
        driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
        try:
            yield driver
        finally:
            driver.quit()


def _requests(driver) -> list[str]:
    events = [json.loads(entry["message"])["message"] for entry in driver.get_log("performance")]
    return [e["params"]["request"]["url"] for e in events if e["method"] == "Network.requestWillBeSent"]


def test_report_renders_offline_with_the_atlas_numbers(real_db: Path, tmp_path: Path, browser) -> None:
    from selenium.webdriver.support.ui import WebDriverWait
    from typer.testing import CliRunner

    from cli.main import app

    with Atlas(real_db) as atlas:
        data = compare(atlas, ["llama", "gemma", "qwen"])
        top = {(r["model_key"], r["metric"], r["layer"], r["head"]): r
               for metric in data["metrics"] for r in rank_heads(atlas, metric, top=data["top"]).to_pylist()}
        grids = {(r["model_key"], r["metric"], r["layer"], r["head"]): r["value"]
                 for r in atlas.execute("SELECT * FROM latest_metrics").to_pylist()}
        labels = {(r["model_key"], r["metric"]): r["n"] for r in atlas.execute(
            "SELECT model_key, metric, count(*) AS n FROM head_labels GROUP BY ALL").to_pylist()}
    page = write_report(data, tmp_path / "report.html")
    # the command a user runs writes the same report (generated_at aside)
    cli_page = tmp_path / "cli-report.html"
    result = CliRunner().invoke(app, ["compare", "llama", "gemma", "qwen", "--out", str(cli_page),
                                      "--db", str(real_db)])
    assert result.exit_code == 0, result.output
    html = cli_page.read_text(encoding="utf-8")
    assert html.count("plotly.js v") == 1  # plotly inlined once, however many models and plots
    assert cli_page.stat().st_size < 8_000_000, cli_page.stat().st_size
    _requests(browser)  # drop what the browser did before opening the page
    browser.get(page.as_uri())
    WebDriverWait(browser, 60).until(lambda d: d.execute_script("return document.body.dataset.rendered"))

    # 1. no network: every request is the page itself or inline data; no resource entries; nothing blocked
    requests = _requests(browser)
    assert requests and all(u == page.as_uri() or u.startswith(("data:", "blob:")) for u in requests), requests
    assert browser.execute_script("return performance.getEntriesByType('resource')"
                                  ".filter(e => !/^(data|blob):/.test(e.name)).length") == 0
    assert browser.execute_script("return window.atlasBlocked") == []

    # 2. every plot rendered: a plotly graph with an SVG (and heatmaps with their raster image)
    plots = browser.execute_script("""return [...document.querySelectorAll('div.plot')].map(d => [d.id,
        d.classList.contains('js-plotly-plot'), d.querySelectorAll('svg.main-svg').length,
        d.querySelectorAll('.hm image, .heatmaplayer image').length])""")
    n_models, n_metrics = len(data["models"]), len(data["metrics"])
    assert len(plots) == n_metrics * (n_models + 1) + len(data["roles"])
    for div_id, is_plot, svgs, images in plots:
        assert is_plot and svgs >= 1, div_id
        if div_id.startswith("heat-"):
            assert images == 1, div_id

    # 3. numbers: heatmaps, top-head tables and role counts equal the atlas
    keys = [m["model_key"] for m in data["models"]]
    for mi, metric in enumerate(data["metrics"]):
        for i, key in enumerate(keys):
            z, x, y = browser.execute_script(
                f"const g = document.getElementById('heat-{mi}-{i}'); return [g.data[0].z, g.data[0].x, g.data[0].y]")
            info = data["models"][i]
            assert z == [[grids[(key, metric, layer, head)] for head in range(info["n_heads"])]
                         for layer in range(info["n_layers"])]
            assert x == [f"H{h}·kv{h // info['group']}" for h in range(info["n_heads"])]  # GQA
            assert y[-1] == f"L{info['n_layers'] - 1} (1.00)" and y[0] == "L0 (0.00)"  # normalized depth
    rows = browser.execute_script("""return [...document.querySelectorAll('table.top-heads tr[data-model]')].map(r =>
        [r.closest('table').dataset.metric, r.dataset.model, +r.dataset.layer, +r.dataset.head,
         r.querySelector('td.value').dataset.value, r.querySelector('td.value').textContent, r.cells[5].textContent,
         r.cells[6].textContent])""")
    assert len(rows) == n_metrics * n_models * data["top"]
    for metric, key, layer, head, exact, shown, kv_head, depth in rows:
        stored = top[(key, metric, layer, head)]
        assert float(exact) == stored["value"] and shown == f"{stored['value']:.4g}"
        assert int(kv_head) == stored["kv_head"] and float(depth) == pytest.approx(stored["depth"], abs=1e-3)
    counts = browser.execute_script("""return [...document.querySelectorAll('#role-counts td.count')].map(c =>
        [c.closest('tr').dataset.metric, c.dataset.model, +c.dataset.count])""")
    assert len(counts) == len(data["roles"]) * n_models
    for metric, key, count in counts:
        assert count == labels.get((key, metric), 0)

    # 3b. the cross-model table: one row per (property, view) as computed, findings as written
    shown = browser.execute_script("""return [...document.querySelectorAll('#across-table tr.across')].map(r =>
        [r.dataset.property, r.dataset.view, r.querySelector('td.observed').dataset.value,
         r.querySelector('td.p').dataset.value, r.querySelector('td.q').dataset.value])""")
    expected_rows = [(e["property"], v, s["observed"], s["p"], s["q"]) for e in data["across"]
                     for v, s in e["views"].items()]
    assert len(data["across"]) == len(data["roles"]) and len(shown) == len(expected_rows)
    for (prop, view, obs, p, q), (eprop, eview, eobs, ep, eq) in zip(shown, expected_rows, strict=True):
        assert (prop, view) == (eprop, eview) and float(obs) == eobs and float(p) == ep and float(q) == eq
    findings = browser.execute_script("return [...document.querySelectorAll('#across-table tr.finding')]"
                                      ".map(r => r.textContent.trim())")
    assert findings == [e["finding"] for e in data["across"]]

    # 4. thresholds are configurable in the page: recount at 0.2 equals the atlas at 0.2
    recount = browser.execute_script("""
        const i = document.querySelector('input.threshold[data-metric="patterns.induction"]');
        i.value = '0.2'; i.dispatchEvent(new Event('input'));
        return [...i.closest('tr').querySelectorAll('td.count')].map(c => [c.dataset.model, +c.dataset.count])""")
    for key, count in recount:
        assert count == sum(1 for (k, m, _, _), v in grids.items() if (k, m) == (key, "patterns.induction") and v > 0.2)

    shot = os.environ.get("ATLAS_REPORT_SCREENSHOT")
    if shot:
        browser.set_window_size(1400, 1300)
        browser.execute_script("document.querySelector('section.metric[data-metric=\"patterns.induction\"]')"
                               ".scrollIntoView()")
        browser.save_screenshot(shot)


@pytest.mark.parametrize("metric", ["patterns.induction", "patterns.prev_token"])
def test_matching_pairs_role_heads_across_models(real_db: Path, metric: str) -> None:
    """The top-3 heads of a role in one model find the other model's heads of that role near the top
    of their match lists (mean percentile well below the 0.5 of chance), by rank profile alone."""
    with Atlas(real_db) as atlas:
        threshold = atlas.con.execute("SELECT threshold FROM role_thresholds WHERE metric = ?",
                                      [metric]).fetchall()[0][0]
        for a, b in (("llama", "gemma"), ("gemma", "llama"), ("llama", "qwen"), ("qwen", "gemma")):
            matcher = Matcher(atlas, a, b)
            role_b = {(r["layer"], r["head"]) for r in atlas.execute(
                "SELECT layer, head FROM latest_metrics WHERE model_key = ? AND metric = ? AND value > ?",
                [matcher.b["model_key"], metric, threshold]).to_pylist()}
            assert role_b, f"{b} has no {metric} head above {threshold}"
            percentiles = []
            for head in rank_heads(atlas, metric, a, 3).to_pylist()[:3]:
                rows = matcher.match(head["layer"], head["head"], top=len(matcher.heads_b), by="profile")
                percentiles += [(r["rank"] - 1) / (len(rows) - 1) for r in rows if (r["layer"], r["head"]) in role_b]
            mean = sum(percentiles) / len(percentiles)
            assert mean < 0.25, (a, b, metric, mean)
