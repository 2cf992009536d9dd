"""The experiment monitor's view (mlsql/static/experiment.js) alone in chromium, fed the traits the
kernel sends (mlsql/notebook/experiment_monitor.py): the arms side by side, one confidence band and
one line per arm, the sample-ratio flag, and the Promote button sending what the kernel runs.
The Python side (traits from a real readout, the button's statement) is tests/test_experiment_fleet.py.
Screenshot: tests/ui/artifacts/experiment-view.png."""

from __future__ import annotations

from pathlib import Path

from conftest import ARTIFACTS

ROOT = Path(__file__).resolve().parents[2]


def test_experiment_view_shows_arms_bands_srm_and_promotes(_browser):
    static = ROOT / "mlsql" / "static"
    page = _browser.new_context(viewport={"width": 1000, "height": 700}).new_page()
    try:

        def serve(route):
            name = route.request.url.rsplit("/", 1)[-1]
            if name == "experiment.js":
                route.fulfill(body=(static / "experiment.js").read_text(), content_type="text/javascript")
            else:
                route.fulfill(
                    body=f"<html><head><style>{(static / 'monitor.css').read_text()}</style></head>"
                    "<body><div id='out'></div></body></html>",
                    content_type="text/html",
                )

        page.route("http://mlsql.test/**", serve)
        page.goto("http://mlsql.test/index.html")
        page.evaluate("""async () => {
            const t = Date.now() / 1000;
            const acc = (v, lo, hi, n, d, p, sig, better) => ({test: 'two_proportion_z', n, value: v, ci_low: lo,
              ci_high: hi, delta_vs_control: d, delta_ci_low: d === null ? null : d - 0.02,
              delta_ci_high: d === null ? null : d + 0.02, p_value: p, significant: sig, better, samples_needed: 0});
            const state = {experiment: 'ab', status: 'running', error: '', primary_metric: 'accuracy',
              trustworthy: false, srm_p_value: 0.0002, promote_result: '',
              arms: [{arm: 'A', model: 'm@1', metrics: {accuracy: acc(0.87, 0.86, 0.88, 3200, null, null, null, null)}},
                     {arm: 'B', model: 'm@2', metrics: {accuracy: acc(0.83, 0.82, 0.84, 3200, -0.04, 1e-5, true, false)}}],
              history: [[t - 2, 'A', 0.86, 0.84, 0.88, 1000], [t - 2, 'B', 0.82, 0.80, 0.84, 1000],
                        [t - 1, 'A', 0.87, 0.86, 0.88, 3200], [t - 1, 'B', 0.83, 0.82, 0.84, 3200]]};
            window.sent = [];
            const model = {get: k => state[k], on() {}, off() {}, send: m => window.sent.push(m)};
            const m = await import('/experiment.js');
            m.default.render({model, el: document.getElementById('out')});
        }""")
        view = page.locator(".mlsql-expt")
        view.screenshot(path=str(ARTIFACTS / "experiment-view.png"))
        heads = page.locator(".mlsql-expt-table th").all_inner_texts()
        assert heads == ["metric", "A: m@1", "B: m@2"], heads
        b_cell = page.locator(".mlsql-expt-table td").nth(2).inner_text()
        assert "0.8300 [0.8200, 0.8400]" in b_cell and "p = 1.0e-5 worse" in b_cell, b_cell
        assert page.locator(".mlsql-expt-worse").count() == 1
        assert "SAMPLE RATIO MISMATCH (p = 0.0002)" in page.locator(".mlsql-expt-srm").inner_text()
        assert page.locator("svg polygon").count() == 2 and page.locator("svg polyline").count() == 2
        page.get_by_text("Promote m@2").click()
        assert page.evaluate("window.sent") == [{"promote": "m@2"}]
    finally:
        page.close()
