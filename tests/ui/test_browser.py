"""The MLSQL JupyterLab extension in a real JupyterLab and Debian's chromium (Playwright): a typed
``%%mlsql`` cell is highlighted as SQL, Tab inserts a table and a column (their only match) at once,
``CREATE MODEL`` runs, the Deploy button deploys the new model to a real local agent (the dialog's
status line then shows it running there) and the side panel shows it too; the panel's jobs fit the
sidebar; a failed statement marks its span in the cell.
Screenshots: tests/ui/artifacts/extension-*.png."""

from __future__ import annotations

import json
import time
from pathlib import Path

from conftest import ARTIFACTS

MODEL = "ui_species"


def _notebook(cells: list[str], kernel: str = "python3") -> str:
    spec = {"python3": {"name": "python3", "display_name": "Python 3", "language": "python"},
            "mlsql": {"name": "mlsql", "display_name": "MLSQL", "language": "sql"}}[kernel]
    return json.dumps({
        "cells": [{"cell_type": "code", "execution_count": None, "id": f"c{i}", "metadata": {}, "outputs": [],
                   "source": src} for i, src in enumerate(cells)],
        "metadata": {"kernelspec": spec}, "nbformat": 4, "nbformat_minor": 5})


def _open(page, url: str, name: str, kernel: str = "Python 3 (ipykernel)") -> None:
    """Open ``name`` alone in a workspace of its own, and wait for its kernel to be idle."""
    page.goto(f"{url}/lab/workspaces/{Path(name).stem}/tree/{name}?reset")
    page.wait_for_selector(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook .jp-Cell", timeout=60_000)
    page.wait_for_function(f"document.body.innerText.includes({json.dumps(kernel + ' | Idle')})", timeout=90_000)


def _run_cell(page, index: int, timeout: float = 120) -> None:
    """Shift+Enter in cell ``index`` and wait until it has an execution count."""
    cell = page.locator(".jp-Notebook .jp-Cell").nth(index)
    prompt = cell.locator(".jp-InputPrompt")
    for _ in range(5):
        cell.locator(".jp-InputArea-editor").click()
        page.keyboard.press("Shift+Enter")
        deadline = time.time() + 4
        while time.time() < deadline and not any(ch in (prompt.text_content() or "") for ch in "*0123456789"):
            page.wait_for_timeout(100)
        if any(ch in (prompt.text_content() or "") for ch in "*0123456789"):
            break
    deadline = time.time() + timeout
    while "*" in (prompt.text_content() or "") or not any(ch in (prompt.text_content() or "") for ch in "0123456789"):
        assert time.time() < deadline, f"cell {index} did not finish: {prompt.text_content()!r}"
        page.wait_for_timeout(200)


def _cell_text(page, index: int) -> str:
    return page.locator(".jp-Notebook .jp-Cell").nth(index).locator(".cm-content").inner_text()


def _tab_inserts(page, index: int, expect: str) -> None:
    """Press Tab at a prefix only ``expect`` completes: the word must go into the cell at once,
    not be listed for a second Tab or a click. Tab is pressed again only when nothing came:
    JupyterLab drops a kernel's answer that takes over 1 s (the completer's providerTimeout), and
    the kernel's first MLSQL completion opens the workspace catalog (about 1.4 s here)."""
    listed = page.locator(".jp-Completer:not(.lm-mod-hidden) .jp-Completer-item")
    for _ in range(4):
        page.keyboard.press("Tab")
        deadline = time.time() + 3
        while time.time() < deadline:
            if expect in _cell_text(page, index):
                return
            page.wait_for_timeout(100)
        if listed.count():
            page.screenshot(path=str(ARTIFACTS / "extension-tab-listed-failed.png"))
            raise AssertionError(f"Tab listed {listed.all_inner_texts()} instead of inserting {expect!r}")
    raise AssertionError(f"Tab did not complete {expect!r}: {_cell_text(page, index)!r}")


def _prepare(lab_workspace) -> None:
    import mlsql
    import mlsql.datasets

    s = mlsql.connect(lab_workspace)
    try:
        if "penguins" not in s.sql("SHOW TABLES").to_arrow().column(0).to_pylist():
            mlsql.datasets.load("penguins", session=s)
    finally:
        s.close()


def test_highlight_complete_train_deploy(lab_server, lab_workspace, local_agent, browser_page):
    url, _, root = lab_server
    device = local_agent[0]
    _prepare(lab_workspace)
    (Path(root) / "extension.ipynb").write_text(_notebook(["%load_ext mlsql", ""]))
    page = browser_page
    _open(page, url, "extension.ipynb")
    _run_cell(page, 0)

    # type a %%mlsql cell: it becomes MLSQL (SQL highlighting), Tab completes a table, then a column
    cell = page.locator(".jp-Notebook .jp-Cell").nth(1)
    cell.locator(".jp-InputArea-editor").click()
    page.keyboard.type("%%mlsql\nSELECT count(*) AS n FROM pengu")
    _tab_inserts(page, 1, "penguins")  # the one table that starts so: in the cell at the first Tab
    assert _cell_text(page, 1) == "%%mlsql\nSELECT count(*) AS n FROM penguins"  # the prefix replaced
    page.screenshot(path=str(ARTIFACTS / "extension-1a-tab-inserts.png"))
    # Shift-Tab on the table: the kernel's inspection shows its schema in JupyterLab's tooltip
    page.keyboard.press("Shift+Tab")
    tooltip = page.locator(".jp-Tooltip")
    tooltip.wait_for(timeout=20_000)
    deadline = time.time() + 20
    while "bill_depth_mm" not in (tooltip.inner_text() if tooltip.count() else ""):
        assert time.time() < deadline, f"Shift-Tab on penguins showed {tooltip.inner_text()!r}"
        page.wait_for_timeout(200)
    page.screenshot(path=str(ARTIFACTS / "extension-1b-inspect.png"))
    page.keyboard.press("Escape")
    cell.locator(".jp-InputArea-editor").click()
    page.keyboard.press("Control+End")
    page.keyboard.type(" WHERE bill_dep")
    _tab_inserts(page, 1, "bill_depth_mm")
    assert _cell_text(page, 1).endswith(" WHERE bill_depth_mm")
    page.keyboard.type(" > 18")
    keywords = cell.locator(".cm-content .tok-keyword").all_inner_texts()
    assert {"SELECT", "AS", "FROM", "WHERE"} <= {k.upper() for k in keywords}, keywords
    page.screenshot(path=str(ARTIFACTS / "extension-1-highlight-complete.png"))
    _run_cell(page, 1)
    assert "n" in cell.locator(".jp-OutputArea").inner_text()

    # a Python cell stays Python (no MLSQL tokens); removing the magic line turns a cell back
    page.keyboard.press("Escape")
    page.keyboard.press("b")
    py = page.locator(".jp-Notebook .jp-Cell").nth(2)
    py.locator(".jp-InputArea-editor").click()
    page.keyboard.type("%%mlsql\nselect = [x for x in range(2)]")
    assert "select" in [k.lower() for k in py.locator(".cm-content .tok-keyword").all_inner_texts()]
    page.keyboard.press("Control+Home")
    page.keyboard.press("Shift+End")
    page.keyboard.press("Delete")
    page.keyboard.press("Delete")
    page.wait_for_timeout(300)
    assert _cell_text(page, 2) == "select = [x for x in range(2)]"
    assert py.locator(".cm-content .tok-keyword").count() == 0

    # CREATE MODEL, then Deploy from the toolbar: the model and the local agent, one click
    page.keyboard.press("Escape")
    page.keyboard.press("b")
    train = page.locator(".jp-Notebook .jp-Cell").nth(3)
    train.locator(".jp-InputArea-editor").click()
    page.keyboard.insert_text(
        f"%%mlsql\nCREATE OR REPLACE MODEL {MODEL}\nOPTIONS (model_type = 'boosted_tree_classifier', "
        "input_label_cols = ['species'], max_iterations = 10, data_split_method = 'random', "
        "data_split_eval_fraction = 0.2)\nAS SELECT species, island, bill_length_mm, "
        "bill_depth_mm, flipper_length_mm FROM penguins")
    _run_cell(page, 3, timeout=240)
    assert MODEL in train.locator(".jp-OutputArea").inner_text()

    # the cell's context menu offers to deploy the model it created
    train.locator(".jp-InputArea-editor").click(button="right")
    item = page.locator(".lm-Menu-itemLabel", has_text=f"Deploy {MODEL}…")
    item.wait_for(timeout=10_000)
    page.keyboard.press("Escape")

    page.locator(".mlsql-deploy-toolbar").first.click()
    dialog = page.locator(".jp-Dialog .mlsql-deploy")
    dialog.wait_for()
    page.set_viewport_size({"width": 800, "height": 760})  # a laptop's window: the long steps wrap
    page.wait_for_function(
        f"[...document.querySelectorAll('.mlsql-deploy-model option')].some(o => o.value === '{MODEL}')",
        timeout=30_000)
    dialog.locator(".mlsql-deploy-model").select_option(MODEL)
    dialog.locator(".mlsql-deploy-target").select_option(f"device:{device}")
    status = dialog.locator(".mlsql-deploy-target-status")
    assert "online" in status.inner_text()
    assert f"{MODEL}@" not in status.inner_text()  # nothing of it deployed yet
    # the version's metrics say which rows they are on: the held-out fifth of the penguins
    metrics = dialog.locator(".mlsql-deploy-metrics").inner_text()
    held_out = int(metrics.split("(on ")[1].split(" held-out rows)")[0])
    assert 40 < held_out < 100, metrics
    page.screenshot(path=str(ARTIFACTS / "extension-2-deploy-dialog.png"))
    dialog.locator(".mlsql-deploy-button").click()
    page.wait_for_selector(".mlsql-deploy-outcome.mlsql-done, .mlsql-deploy-outcome.mlsql-failed", timeout=180_000)
    outcome = dialog.locator(".mlsql-deploy-outcome").inner_text()
    assert f"to {device}" in outcome and "Deployed" in outcome, outcome
    assert "CPU" in outcome and "passed" in outcome and " ms" in outcome, outcome
    # the parity gate's figure names its rows, and why it is not ML.EVALUATE's
    assert " on 344 rows of the training query: native " in outcome, outcome
    note = dialog.locator(".mlsql-deploy-note").inner_text()
    assert "rows of the training query, training rows included" in note, note
    assert f"ML.EVALUATE) are computed on its {held_out} held-out rows" in note, note
    # the target's status line follows the deploy: the device now runs the model
    page.wait_for_function(  # "active ui_species@1", or beside another model the agent runs
        "(t => /active (.*, )?" + MODEL + "@/.test(t))"
        "(document.querySelector('.mlsql-deploy-target-status').textContent)", timeout=30_000)
    assert "nothing deployed" not in status.inner_text()
    target = dialog.locator(".mlsql-deploy-target option:checked").inner_text()
    assert f"runs {MODEL}@" in target or f", {MODEL}@" in target, target
    # every step whole: the list shows them all without a scroll bar, the last one in view
    steps = dialog.locator(".mlsql-deploy-steps")
    box = steps.evaluate("e => ({n: e.children.length, sh: e.scrollHeight, ch: e.clientHeight})")
    assert box["n"] >= 4 and box["sh"] <= box["ch"] + 1, box
    last = steps.locator("li").last
    assert last.inner_text().startswith(f"Deployed {MODEL}@"), last.inner_text()
    # ... and in view as the deploy ends, with the result: the dialog grew instead of scrolling
    view = page.locator(".jp-Dialog-body").bounding_box()
    for part in (last, dialog.locator(".mlsql-deploy-summary")):
        b = part.bounding_box()
        assert view["y"] <= b["y"] and b["y"] + b["height"] <= view["y"] + view["height"] + 0.5, (b, view)
    page.screenshot(path=str(ARTIFACTS / "extension-3-deployed.png"))
    page.locator(".jp-Dialog button", has_text="Close").click()
    page.set_viewport_size({"width": 1400, "height": 900})

    # the side panel: the device runs the new model, the deploy is listed as done
    page.locator(".jp-SideBar [data-id='mlsql-panel']").click()
    page.wait_for_function(
        "[...document.querySelectorAll('.mlsql-device.mlsql-online .mlsql-active')]"
        f".some(e => e.textContent.split(', ').some(m => m.startsWith('{MODEL}@')))", timeout=30_000)
    panel = page.locator("#mlsql-panel")
    assert MODEL in panel.locator(".mlsql-panel-models").inner_text()
    assert "Deployed" in panel.locator(".mlsql-deploy-entry.mlsql-done").first.inner_text()
    page.screenshot(path=str(ARTIFACTS / "extension-4-panel.png"))


def test_panel_jobs_fit_the_sidebar(lab_server, lab_workspace, browser_page):
    """The side panel's Jobs section in JupyterLab's default sidebar width: every job's name,
    schedule, next run, last status and output link inside the panel, nothing cut."""
    from mlsql.jobs import JobSpec, JobStore, resolve_job_options, run_job

    store = JobStore(lab_workspace)
    store.create(JobSpec("ui_nightly_retrain", "sql", "SELECT 42 AS answer",
                         resolve_job_options({"schedule": "0 3 * * *", "timezone": "Europe/Berlin"})), replace=True)
    run = run_job(lab_workspace, "ui_nightly_retrain")
    assert run.status == "succeeded", run.error
    page = browser_page
    page.locator(".jp-SideBar [data-id='mlsql-panel']").click()
    job = page.locator("#mlsql-panel .mlsql-job", has_text="ui_nightly_retrain")
    job.wait_for(timeout=30_000)
    text = job.inner_text()
    assert "last: succeeded" in text and "output" in text and "cron '0 3 * * *' (Europe/Berlin)" in text, text
    panel = page.locator("#mlsql-panel").bounding_box()
    jobs = page.locator("#mlsql-panel .mlsql-panel-jobs")
    assert jobs.evaluate("e => e.scrollWidth <= e.clientWidth"), "the Jobs section scrolls sideways"
    for part in (".mlsql-name", ".mlsql-job-last", ".mlsql-job-output", ".mlsql-job-when"):
        b = job.locator(part).first.bounding_box()
        assert b and b["x"] + b["width"] <= panel["x"] + panel["width"] + 0.5, (part, b, panel)
    # ... and readable: the name and the last status each whole on one line, not broken letter by letter
    for part in (".mlsql-name", ".mlsql-job-last"):
        lines = job.locator(part).first.evaluate(
            "e => { const r = document.createRange(); r.selectNodeContents(e);"
            " return new Set([...r.getClientRects()].map(x => Math.round(x.top))).size; }")
        assert lines == 1, (part, lines)
    page.locator(".mlsql-panel-jobs").scroll_into_view_if_needed()
    page.screenshot(path=str(ARTIFACTS / "extension-6-panel-jobs.png"))


def test_panel_alerts_show_fired_and_failing(lab_server, lab_workspace, browser_page):
    """The side panel's Alerts section: an alert checked for real that fired and whose webhook
    was down shows its last check, how often it fired and the notification's error, marked as
    firing, inside the sidebar's width."""
    from mlsql.jobs import AlertSpec, AlertStore, check_alert, resolve_alert_options

    store = AlertStore(lab_workspace)
    store.create(AlertSpec("ui_low_accuracy", "SELECT 42 AS answer", resolve_alert_options(
        {"every": "1h", "notify": ["json://127.0.0.1:9/hook"], "retries": 0})), replace=True)
    c = check_alert(lab_workspace, "ui_low_accuracy")
    assert c.status == "fired" and not c.notified and c.error, c
    page = browser_page
    page.locator(".jp-SideBar [data-id='mlsql-panel']").wait_for(timeout=60_000)
    if not page.locator("#mlsql-panel").is_visible():  # JupyterLab restores a panel an earlier test opened
        page.locator(".jp-SideBar [data-id='mlsql-panel']").click()
    page.locator("#mlsql-panel .mlsql-panel-refresh").click()
    alert = page.locator("#mlsql-panel .mlsql-alert.mlsql-alert-fired", has_text="ui_low_accuracy")
    alert.wait_for(timeout=30_000)
    text = alert.inner_text()
    assert "last: fired" in text and "(1 time)" in text and "every 1h" in text, text
    assert "Notification failed after 1 attempt" in alert.locator(".mlsql-alert-error").inner_text()
    panel = page.locator("#mlsql-panel").bounding_box()
    assert page.locator("#mlsql-panel .mlsql-panel-alerts").evaluate("e => e.scrollWidth <= e.clientWidth")
    for part in (".mlsql-name", ".mlsql-alert-last-fired", ".mlsql-alert-error", ".mlsql-alert-when"):
        b = alert.locator(part).first.bounding_box()
        assert b and b["x"] + b["width"] <= panel["x"] + panel["width"] + 0.5, (part, b, panel)
    page.locator(".mlsql-panel-alerts").scroll_into_view_if_needed()
    page.screenshot(path=str(ARTIFACTS / "extension-7-panel-alerts.png"))


def test_error_span_marked_and_cleared(lab_server, lab_workspace, browser_page):
    url, _, root = lab_server
    _prepare(lab_workspace)
    (Path(root) / "errors.ipynb").write_text(_notebook(
        ["%load_ext mlsql", "%%mlsql\nSELECT species,\n       bil_length\nFROM penguins"]))
    page = browser_page
    _open(page, url, "errors.ipynb")
    _run_cell(page, 0)
    _run_cell(page, 1)
    cell = page.locator(".jp-Notebook .jp-Cell").nth(1)
    link = cell.locator(".mlsql-error-position a")
    link.wait_for(timeout=30_000)
    assert link.inner_text() == "line 3, column 8"
    page.wait_for_selector(".mlsql-error-span", timeout=10_000)
    assert cell.locator(".mlsql-error-span").inner_text() == "bil_length"
    page.screenshot(path=str(ARTIFACTS / "extension-5-error-span.png"))
    link.click()
    page.keyboard.type("x")  # the click selected the span: typing replaces it, and the mark goes
    assert cell.locator(".mlsql-error-span").count() == 0
    assert "x\nFROM penguins" in _cell_text(page, 1)


def test_mlsql_kernel_cells_are_mlsql(lab_server, browser_page):
    url, _, root = lab_server
    (Path(root) / "kernel.ipynb").write_text(_notebook(["SELECT 42 AS answer GROUP BY ALL ORDER BY ALL"], kernel="mlsql"))
    page = browser_page
    _open(page, url, "kernel.ipynb", kernel="MLSQL")
    cell = page.locator(".jp-Notebook .jp-Cell").nth(0)
    cell.locator(".tok-keyword").first.wait_for(timeout=10_000)
    keywords = {k.upper() for k in cell.locator(".cm-content .tok-keyword").all_inner_texts()}
    assert {"SELECT", "AS", "GROUP", "BY", "ALL", "ORDER"} <= keywords, keywords
    _run_cell(page, 0)
    assert "42" in cell.locator(".jp-OutputArea").inner_text()
