"""Charts in a real JupyterLab (Debian's chromium through Playwright): the live loss curve beside the
progress bar while a model trains, the line that replaces them, the ROC curve and confusion matrix
of ML.EVALUATE, and the same outputs after the notebook is saved and reopened (no "model not
found"). Screenshots: tests/ui/artifacts/outputs-*.png."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import ARTIFACTS

CELLS = [
    "%load_ext mlsql\n"
    "%mlsql CREATE OR REPLACE TABLE ui_rows AS SELECT a, b, c, (a + 0.5 * b + 0.6 * random()) > 1 AS y "
    "FROM (SELECT random() AS a, random() AS b, random() AS c FROM range(150000))",
    "%%mlsql\nCREATE OR REPLACE MODEL ui_late OPTIONS (model_type = 'boosted_tree_classifier', "
    "input_label_cols = ['y'], max_iterations = 80, early_stop = FALSE, data_split_method = 'random', "
    "data_split_eval_fraction = 0.2)\nAS SELECT * FROM ui_rows",
    "%mlsql SELECT * FROM ML.EVALUATE(MODEL ui_late)",
    "%mlsql SELECT i, (i * 7919) % 1000 AS v, 'row ' || i AS s FROM range(1000) t(i)",
]


def _notebook(cells: list[str]) -> str:
    return json.dumps({
        "cells": [{"cell_type": "code", "execution_count": None, "id": f"c{i}", "metadata": {}, "outputs": [],
                   "source": src} for i, src in enumerate(cells)],
        "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
        "nbformat": 4, "nbformat_minor": 5})


def _cell(page, i: int):
    return page.locator(".jp-Notebook .jp-Cell").nth(i)


def _run_cell(page, i: int) -> None:
    _cell(page, i).locator(".jp-InputArea-editor").click()
    page.keyboard.press("Shift+Enter")


def _wait_done(page, i: int, timeout: int = 180_000) -> None:
    page.wait_for_function(
        f"(() => {{ const p = document.querySelectorAll('.jp-Notebook .jp-Cell')[{i}]"
        ".querySelector('.jp-InputPrompt'); return p && /\\[\\d+\\]/.test(p.textContent); })()", timeout=timeout)


def test_loss_curve_while_training_then_roc_curve_and_reopen(lab_server, browser_page):
    url, _, root = lab_server
    (Path(root) / "outputs.ipynb").write_text(_notebook(CELLS))
    page = browser_page
    page.set_viewport_size({"width": 1300, "height": 1000})
    page.goto(f"{url}/lab/workspaces/outputs/tree/outputs.ipynb?reset")
    page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=60_000)
    page.wait_for_function("document.body.innerText.includes('| Idle')", timeout=60_000)
    _run_cell(page, 0)
    _wait_done(page, 0)

    # while training: the bar and, beside it, the loss curve drawn so far
    _run_cell(page, 1)
    training = _cell(page, 1).locator(".jp-OutputArea")
    training.locator(".widget-image, img").first.wait_for(timeout=120_000)
    assert "/80 · loss" in training.inner_text()  # the bar's status: iteration and losses so far
    page.screenshot(path=str(ARTIFACTS / "outputs-training-live.png"), full_page=True)
    live = training.locator("img").first.get_attribute("src") or ""
    assert live.startswith("blob:") or live.startswith("data:image/png")

    # at the end: one line instead of the widgets, and the final curve with the result
    _wait_done(page, 1)
    page.wait_for_function("document.querySelectorAll('.jp-Notebook .jp-Cell')[1].innerText.includes('✔ Trained ui_late')",
                           timeout=30_000)
    out1 = training.inner_text()
    assert "80/80 iterations" in out1 and "Created model ui_late version" in out1
    assert training.locator(".jupyter-widgets").count() == 0
    assert training.locator("img").count() == 1  # the loss curve of the result

    # ML.EVALUATE: the metrics table, then the ROC curve and the confusion matrix
    _run_cell(page, 2)
    _wait_done(page, 2)
    evaluation = _cell(page, 2).locator(".jp-OutputArea")
    evaluation.locator("img").first.wait_for(timeout=30_000)
    assert "roc_auc" in evaluation.inner_text()
    box = evaluation.locator("img").first.bounding_box()
    assert box and box["width"] > 400 and box["height"] > 200
    _cell(page, 1).scroll_into_view_if_needed()
    page.screenshot(path=str(ARTIFACTS / "outputs-loss-and-roc.png"), full_page=True)
    evaluation.screenshot(path=str(ARTIFACTS / "outputs-roc.png"))

    # a long result: sorted by a header click in the kernel, paged one page at a time
    _run_cell(page, 3)
    _wait_done(page, 3)
    pager = _cell(page, 3).locator(".mlsql-pager")
    pager.wait_for(timeout=30_000)
    assert "rows 1–10 of 1,000" in pager.inner_text()
    pager.locator("th", has_text="v").click()
    page.wait_for_function("document.querySelector('.mlsql-pager th.num:nth-child(2)').textContent.includes('▲')")
    pager.locator("th", has_text="v").click()
    page.wait_for_function("document.querySelector('.mlsql-pager th.num:nth-child(2)').textContent.includes('▼')")
    # (no wait for the sorted page: a click before the answer builds on what was asked)
    pager.locator("button[title='next page']").click()
    page.wait_for_function("document.querySelector('.mlsql-pager').innerText.includes('rows 11–20 of 1,000')")
    page.wait_for_function("document.querySelector('.mlsql-pager tbody tr td:nth-child(2)').textContent === '989'")
    shown = [int(t) for t in pager.locator("tbody tr td:nth-child(2)").all_inner_texts()]
    assert shown == list(range(989, 979, -1))
    pager.screenshot(path=str(ARTIFACTS / "outputs-pager.png"))

    # saved and reopened: the charts are still there and no widget is missing its model
    page.keyboard.press("Control+s")
    page.wait_for_timeout(1500)
    page.reload()
    page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=60_000)
    page.wait_for_function("document.querySelectorAll('.jp-Notebook img').length >= 2", timeout=30_000)
    page.wait_for_timeout(1500)
    # (the pager of cell 3 is a live widget: reopened without its kernel it has no model; README says so)
    text = "\n".join(_cell(page, i).inner_text() for i in range(3))
    assert "model not found" not in text and "Error displaying widget" not in text
    assert "✔ Trained ui_late" in text
    page.screenshot(path=str(ARTIFACTS / "outputs-reopened.png"), full_page=True)
