"""The first hour, as a new user spends it: every notebook in notebooks/, opened in a real JupyterLab
(Debian's chromium through Playwright), run with Run > Run All Cells, one after another on one
workspace, next to a local device agent as `make lab` starts one. A notebook passes when every
code cell ran, no cell shows an error, and no cell shows stderr output that the notebook did not
ask for (a cell asks by the tag ``stderr-expected``). Screenshots of each notebook after Run All:
tests/ui/artifacts/notebook-<name>.png."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ARTIFACTS, _stop, free_port, running_lab

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
NAMES = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))
AGENT_TOKEN = "local-dev-token"  # make lab's local agent
EXPECTED_TAG = "stderr-expected"
# What a notebook's outputs must say, checked here on the notebook as it ran in the browser. The Spark
# notebook (the slowest, about 80 s) is executed only here, not also by nbclient in tests/test_notebooks.py.
SHOWS = {"02_spark.ipynb": ["Created model late_model_spark version 1", "late_model_spark", "parity max diff"]}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def first_hour(tmp_path_factory, _browser):
    """A lab of its own (its own workspace: the other browser tests' models stay out of it), the
    notebooks copied into its root, and make lab's `local` agent."""
    home = tmp_path_factory.mktemp("first-hour")
    ws, root = home / "ws", home / "root"
    root.mkdir()
    port = free_port()
    for name in NAMES:
        text = (NOTEBOOKS / name).read_text()
        # 05's parameters cell names make lab's agent at port 7070: here it listens on a free port
        (root / name).write_text(text.replace("http://127.0.0.1:7070", f"http://127.0.0.1:{port}"))
    log = home / "agent.log"
    with open(log, "w") as out:
        agent = subprocess.Popen([sys.executable, "-m", "mlsql.cli", "device", "serve", "--workspace", str(ws),
                                  "--name", "local", "--port", str(port), "--token", AGENT_TOKEN],
                                 stdout=out, stderr=subprocess.STDOUT)
    try:
        with running_lab(home, ws, root) as (url, token, _):
            context = _browser.new_context(viewport={"width": 1400, "height": 1000})
            page = context.new_page()
            page.set_default_timeout(30_000)
            page.goto(f"{url}/lab?token={token}")
            yield {"url": url, "root": root, "page": page, "ws": ws}
            context.close()
    finally:
        _stop(agent)


def _run_all(page, url: str, name: str, timeout_s: float) -> None:
    page.goto(f"{url}/lab/workspaces/{name.split('_')[0]}/tree/{name}?reset")
    page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=60_000)
    page.wait_for_function("document.body.innerText.includes('| Idle')", timeout=120_000)
    page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
    page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()
    # done: no cell waits or runs ([*]) and the kernel is idle, either because every code cell ran
    # or because one failed (Run All stops there)
    page.wait_for_function("""() => {
        const prompts = [...document.querySelectorAll('.jp-Notebook .jp-CodeCell .jp-InputPrompt')]
            .map(p => p.textContent.trim());
        const failed = document.querySelector('.jp-Notebook .jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]');
        return prompts.length > 0 && !prompts.some(p => p.includes('*'))
            && (prompts.every(p => /\\[\\d+\\]/.test(p)) || failed)
            && document.body.innerText.includes('| Idle');
    }""", timeout=timeout_s * 1000, polling=1000)
    page.keyboard.press("Control+s")
    page.wait_for_timeout(1500)


def _screenshots(page, stem: str, most: int = 30) -> None:
    """notebook-<stem>-NN.png: the notebook from top to bottom, one screenful each (JupyterLab
    renders only the cells in view, so one full-page shot would miss the rest)."""
    ARTIFACTS.mkdir(exist_ok=True)
    for old in ARTIFACTS.glob(f"notebook-{stem}-*.png"):
        old.unlink()
    scroller = ".jp-NotebookPanel:not(.lm-mod-hidden) .jp-WindowedPanel-outer"
    page.evaluate(f"document.querySelector('{scroller}').scrollTop = 0")
    for i in range(most):
        page.wait_for_timeout(400)
        page.screenshot(path=str(ARTIFACTS / f"notebook-{stem}-{i:02d}.png"))
        # on to the next screenful, unless the last cell is already in view (past it is padding)
        moved = page.evaluate(f"""() => {{ const el = document.querySelector('{scroller}');
            const cells = el.querySelectorAll('.jp-Cell'), last = cells[cells.length - 1];
            if (!last || last.getBoundingClientRect().bottom <= el.getBoundingClientRect().bottom) return false;
            const before = el.scrollTop; el.scrollTop = before + el.clientHeight - 80; return el.scrollTop > before; }}""")
        if not moved:
            break


def _problems(saved: dict, shown: str) -> list[str]:
    """What a new user would trip on: cells not run, errors, stderr nobody asked for."""
    out = []
    for i, cell in enumerate(saved["cells"]):
        if cell["cell_type"] != "code":
            continue
        src = "".join(cell["source"]).strip().splitlines()
        where = f"cell {i} ({src[0][:50] if src else 'empty'})"
        if src and cell.get("execution_count") is None:
            out.append(f"{where} did not run")
        expected = EXPECTED_TAG in cell.get("metadata", {}).get("tags", [])
        for o in cell.get("outputs", []):
            if o["output_type"] == "error":
                out.append(f"{where} failed: {o['ename']}: {o['evalue'][:300]}")
            elif o["output_type"] == "stream" and o["name"] == "stderr" and not expected:
                out.append(f"{where} printed to stderr: {''.join(o['text'])[:300]!r}")
    for bad in ("Error displaying widget", "model not found", "Traceback (most recent call last)"):
        if bad in shown:
            out.append(f"the page shows {bad!r}")
    return out


@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_clean_from_the_ui(first_hour, name):
    page, url, root = first_hour["page"], first_hour["url"], first_hour["root"]
    t0 = time.monotonic()
    _run_all(page, url, name, timeout_s=900)
    took = time.monotonic() - t0
    _screenshots(page, name.removesuffix(".ipynb"))
    saved = json.loads((root / name).read_text())
    shown = page.locator(".jp-Notebook").inner_text()
    problems = _problems(saved, shown)
    said = "\n".join("".join(o.get("text", "")) + "".join(o.get("data", {}).get("text/plain", ""))
                     + "".join(o.get("data", {}).get("text/html", ""))
                     for c in saved["cells"] for o in c.get("outputs", []))
    problems += [f"no output says {want!r}" for want in SHOWS.get(name, []) if want not in said]
    if problems:  # keep the notebook as it ran, beside its screenshot
        shutil.copy(root / name, ARTIFACTS / f"notebook-{name}")
    assert not problems, f"{name} after Run All ({took:.0f} s):\n  " + "\n  ".join(problems)
