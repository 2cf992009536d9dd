"""The live device monitor in a real JupyterLab (Debian's chromium through Playwright): it updates
at least once a second under load while the kernel runs another cell, then shows its stopped
summary. Screenshots: tests/ui/artifacts/monitor-*.png."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from conftest import ARTIFACTS

ROOT = Path(__file__).resolve().parents[2]
MODEL = "monitor_species"


def _notebook(cells: list[str]) -> str:
    return json.dumps({
        "cells": [{"cell_type": "code", "execution_count": None, "id": f"c{i}", "metadata": {}, "outputs": [],
                   "source": src} for i, src in enumerate(cells)],
        "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
        "nbformat": 4, "nbformat_minor": 5})


def _run_cell(page, index: int) -> None:
    """Shift+Enter in cell ``index``, again if the prompt does not show it queued or run (a kernel
    still connecting drops the first one)."""
    cell = page.locator(".jp-Notebook .jp-Cell").nth(index)
    prompt = cell.locator(".jp-InputPrompt")
    for _ in range(5):
        cell.locator(".jp-InputArea-editor").click()
        page.keyboard.press("Shift+Enter")
        deadline = time.time() + 4
        while time.time() < deadline:
            if any(ch in (prompt.text_content() or "") for ch in "*0123456789"):
                return
            page.wait_for_timeout(100)
    raise AssertionError(f"cell {index} did not start")


def test_monitor_updates_every_second_under_load_while_another_cell_runs(lab_server, lab_workspace, local_agent,
                                                                          browser_page):
    import mlsql
    import mlsql.datasets

    device, agent_url, token = local_agent
    url, _, root = lab_server
    s = mlsql.connect(lab_workspace)
    try:
        if "penguins" not in s.sql("SHOW TABLES").to_arrow().column(0).to_pylist():
            mlsql.datasets.load("penguins", session=s)
        s.sql(f"""CREATE OR REPLACE MODEL {MODEL} OPTIONS (model_type = 'boosted_tree_classifier',
                  input_label_cols = ['species'], max_iterations = 5)
                  AS SELECT island, bill_length_mm, bill_depth_mm, flipper_length_mm, species FROM penguins""")
        s.sql(f"DEPLOY MODEL {MODEL} TO DEVICE '{device}'")
        s.sql("CREATE OR REPLACE DEVICE 'monitor_nowhere' OPTIONS (url = 'http://127.0.0.1:9', timeout_s = 2)")
        rows = s.sql("SELECT island, bill_length_mm, bill_depth_mm, flipper_length_mm FROM penguins "
                     "WHERE bill_length_mm IS NOT NULL LIMIT 8").to_arrow().to_pylist()
    finally:
        s.close()
    body = Path(root) / "monitor_body.json"
    body.write_text(json.dumps({"rows": rows}))
    (Path(root) / "monitor.ipynb").write_text(_notebook([
        f"import mlsql\nm = mlsql.monitor('{device}', model='{MODEL}', interval=0.5)\nm",
        "import time\ns = mlsql.connect()\nn, t = 0, time.time()\nwhile time.time() - t < 6:\n"
        "    n += s.sql('SELECT count(*) FROM penguins').scalar() > 0\nprint('selects', n)",
        "m.stop()",
        "gone = mlsql.monitor('monitor_nowhere')\ngone",
    ]))
    gen = subprocess.Popen([sys.executable, str(ROOT / "bench" / "loadgen.py"), agent_url,
                            f"/v1/models/{MODEL}/predict", "application/json", str(body), "--clients", "2",
                            "--seconds", "40", "--token", token], stdout=subprocess.PIPE, text=True)
    page = browser_page
    try:
        page.goto(f"{url}/lab/workspaces/monitor/tree/monitor.ipynb?reset")
        page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=60_000)
        page.wait_for_function("document.querySelector('.jp-StatusBar-Widget') && "
                               "document.body.innerText.includes('| Idle')", timeout=60_000)
        _run_cell(page, 0)
        mon = page.locator(".mlsql-mon")
        mon.wait_for(timeout=60_000)
        page.wait_for_selector(".mlsql-mon[data-status='live']", timeout=30_000)
        page.wait_for_function("document.querySelector('.mlsql-mon').dataset.updates >= 3", timeout=20_000)
        # the other cell: 6 s of SELECTs; the kernel is busy, the monitor keeps moving
        _run_cell(page, 1)
        page.wait_for_function(
            "document.querySelectorAll('.jp-Notebook .jp-Cell')[1].querySelector('.jp-InputPrompt')"
            ".textContent.includes('*')", timeout=10_000)
        seen = []
        t0 = time.time()
        while time.time() - t0 < 4.0:
            seen.append((time.time() - t0, int(mon.get_attribute("data-updates"))))
            page.wait_for_timeout(200)
        busy = page.locator(".jp-Notebook .jp-Cell").nth(1).locator(".jp-InputPrompt").text_content()
        page.screenshot(path=str(ARTIFACTS / "monitor-live.png"), full_page=True)
        mon.screenshot(path=str(ARTIFACTS / "monitor-live-panel.png"))
        assert "*" in busy, "the SELECT cell finished before the monitor was watched"
        counts = [c for _, c in seen]
        # every second of the four has at least one new update (interval 0.5 s)
        for second in range(4):
            inside = [c for t, c in seen if second <= t < second + 1]
            before = [c for t, c in seen if t < second] or [counts[0] - 1]
            assert inside and max(inside) > max(before), (second, seen)
        assert counts[-1] - counts[0] >= 5, seen
        # what it shows: the model, where it runs, charts with lines, numbers that move
        text = mon.inner_text()
        assert f"{MODEL}@" in text and "runs on CPU" in text
        assert mon.locator("svg path").count() >= 5   # p50, p95, p99, req/s, rows/s
        assert mon.locator(".mlsql-mon-badge-live").count() == 1
        page.wait_for_function(
            "document.querySelectorAll('.jp-Notebook .jp-Cell')[1].querySelector('.jp-OutputArea')"
            ".textContent.includes('selects')", timeout=30_000)
        out = page.locator(".jp-Notebook .jp-Cell").nth(1).locator(".jp-OutputArea").inner_text()
        assert int(out.split("selects")[1].split()[0]) >= 10
        # stop: the live view becomes the summary of the last values, marked stopped
        _run_cell(page, 2)
        summary = page.locator(".mlsql-monitor-summary")
        summary.wait_for(timeout=20_000)
        page.screenshot(path=str(ARTIFACTS / "monitor-stopped.png"), full_page=True)
        stext = summary.inner_text()
        assert "stopped" in stext and f"{MODEL}@" in stext and "p95 ms" in stext
        assert page.locator(".mlsql-mon").count() == 0
        # an agent nobody answers for: the panel says so, with the error, and keeps trying
        _run_cell(page, 3)
        page.wait_for_selector(".mlsql-mon[data-status='disconnected']", timeout=20_000)
        gone = page.locator(".mlsql-mon")
        gone.screenshot(path=str(ARTIFACTS / "monitor-disconnected.png"))
        alert = gone.locator(".mlsql-mon-alert").inner_text()
        assert "127.0.0.1:9" in alert and "unreachable" in alert and "retrying every 1 s" in alert
    finally:
        gen.kill()
        gen.wait()


def test_latency_tiles_show_the_legends_window(_browser):
    """monitor.js alone in chromium, fed the state the kernel sends when the newest interval had
    no requests (latest p50 null, history ending in null latencies): the p50/p95/p99 tiles show the
    same window as the latency chart's legend (the newest with requests) and how old it is."""
    static = ROOT / "mlsql" / "static"
    page = _browser.new_context(viewport={"width": 1000, "height": 700}).new_page()
    try:
        def serve(route):
            name = route.request.url.rsplit("/", 1)[-1]
            if name == "monitor.js":
                route.fulfill(body=(static / "monitor.js").read_text(), content_type="text/javascript")
            else:
                route.fulfill(body=f"<html><head><style>{(static / 'monitor.css').read_text()}</style></head>"
                                   "<body><div id='out'></div></body></html>", content_type="text/html")

        page.route("http://mlsql.test/**", serve)
        page.goto("http://mlsql.test/index.html")
        page.evaluate("""async () => {
            const t = Date.now() / 1000;
            const state = {
              status: 'live', device_name: 'd1', url: 'http://d1', error: '', last_ok: t, updates: 4, interval: 1,
              model: 'species', version: 1, providers: ['CPUExecutionProvider'], node_providers: {}, models: [],
              latest: {total_requests: 12, requests_per_s: 0, rows_per_s: 0, error_rate: 0,
                       p50_ms: null, p95_ms: null, p99_ms: null},
              history_fields: ['t', 'p50_ms', 'p95_ms', 'p99_ms', 'requests_per_s', 'rows_per_s', 'error_rate', 'requests'],
              history: [[t - 3, 80.1, 95, 99, 2, 16, 0, 10], [t - 2, 89.3, 120, 130, 2, 16, 0, 12],
                        [t - 1, null, null, null, 0, 0, 0, 12], [t, null, null, null, 0, 0, 0, 12]],
              drift: [], drift_note: '', drift_threshold: 3, events: []};
            const model = {get: k => state[k], on() {}, off() {}};
            const m = await import('/monitor.js');
            m.default.render({model, el: document.getElementById('out')});
        }""")
        tiles = {page.locator(f"[data-tile='{k}'] .mlsql-mon-tile-v").inner_text(): k
                 for k in ("p50 ms", "p95 ms", "p99 ms")}
        legend = page.locator(".mlsql-mon-chart").first.locator(".mlsql-mon-key").all_inner_texts()
        page.locator(".mlsql-mon").screenshot(path=str(ARTIFACTS / "monitor-tiles-legend.png"))
        assert legend == ["p50 89.3", "p95 120", "p99 130"], legend
        assert tiles == {"89.3": "p50 ms", "120": "p95 ms", "130": "p99 ms"}, tiles
        assert page.locator("[data-tile='p50 ms'] .mlsql-mon-tile-note").inner_text() == "2 s ago"
    finally:
        page.context.close()
