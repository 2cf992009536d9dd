// The experiment monitor's view (anywidget ES module): the arms side by side, the primary metric over
// time with each arm's confidence band, the sample-ratio flag and a Promote button per arm, drawn from
// the synced traits of mlsql/notebook/experiment_monitor.py as HTML and inline SVG (no library, no network).

const SVG = "http://www.w3.org/2000/svg";
const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"];

function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function s(tag, attrs = {}) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  return node;
}

function num(v, digits = 4) {
  if (v === null || v === undefined || Number.isNaN(v)) return "–";
  if (Math.abs(v) >= 1000) return v.toFixed(0);
  return Number(v).toPrecision(digits);
}

function pval(p) {
  if (p === null || p === undefined) return "–";
  return p < 1e-4 ? p.toExponential(1) : p.toFixed(4);
}

function armsTable(model) {
  const arms = model.get("arms") || [];
  const metrics = arms.length ? Object.keys(arms[0].metrics) : [];
  const head = h("tr", {}, h("th", {}, "metric"), ...arms.map((a, i) =>
    h("th", { style: `color:${COLORS[i % COLORS.length]}` }, `${a.arm}: ${a.model}`)));
  const rows = metrics.map((m) => h("tr", {},
    h("td", {}, m === model.get("primary_metric") ? `${m} (primary)` : m),
    ...arms.map((a, i) => {
      const r = a.metrics[m] || {};
      const lines = [`${num(r.value)} [${num(r.ci_low)}, ${num(r.ci_high)}]`, `n = ${r.n ?? 0}`];
      if (i > 0) {
        lines.push(`Δ ${num(r.delta_vs_control)} [${num(r.delta_ci_low)}, ${num(r.delta_ci_high)}]`);
        lines.push(`p = ${pval(r.p_value)}${r.significant ? (r.better ? " better" : " worse") : ""}`);
      }
      if (r.samples_needed) lines.push(`needs ${r.samples_needed} more`);
      return h("td", { class: r.significant ? (r.better ? "mlsql-expt-better" : "mlsql-expt-worse") : "" },
        ...lines.flatMap((l, j) => (j ? [h("br"), l] : [l])));
    })));
  return h("table", { class: "mlsql-expt-table" }, h("thead", {}, head), h("tbody", {}, ...rows));
}

function chart(model) {
  const hist = model.get("history") || [];
  const W = 520, H = 180, L = 56, R = 10, T = 10, B = 24;
  const svg = s("svg", { width: W, height: H, viewBox: `0 0 ${W} ${H}` });
  if (!hist.length) return svg;
  const ts = hist.map((p) => p[0]);
  const ys = hist.flatMap((p) => [p[3], p[4], p[2]]).filter((v) => v !== null && v !== undefined);
  const t0 = Math.min(...ts), t1 = Math.max(...ts) || t0 + 1;
  let y0 = Math.min(...ys), y1 = Math.max(...ys);
  if (y0 === y1) { y0 -= 0.01; y1 += 0.01; }
  const x = (t) => L + ((t - t0) / Math.max(t1 - t0, 1e-9)) * (W - L - R);
  const y = (v) => T + (1 - (v - y0) / (y1 - y0)) * (H - T - B);
  const arms = [...new Set(hist.map((p) => p[1]))].sort();
  arms.forEach((arm, i) => {
    const pts = hist.filter((p) => p[1] === arm && p[2] !== null);
    if (!pts.length) return;
    const color = COLORS[i % COLORS.length];
    const band = pts.filter((p) => p[3] !== null && p[4] !== null);
    if (band.length) {
      const d = band.map((p) => `${x(p[0])},${y(p[4])}`).concat(band.slice().reverse().map((p) => `${x(p[0])},${y(p[3])}`));
      svg.append(s("polygon", { points: d.join(" "), fill: color, "fill-opacity": 0.15, stroke: "none" }));
    }
    svg.append(s("polyline", { points: pts.map((p) => `${x(p[0])},${y(p[2])}`).join(" "), fill: "none", stroke: color,
      "stroke-width": 2 }));
    for (const p of pts) svg.append(s("circle", { cx: x(p[0]), cy: y(p[2]), r: 2.5, fill: color }));
  });
  for (const v of [y0, (y0 + y1) / 2, y1]) {
    const t = s("text", { x: L - 4, y: y(v) + 4, "text-anchor": "end", "font-size": 10 });
    t.textContent = num(v, 3);
    svg.append(t);
  }
  return svg;
}

function render({ model, el }) {
  const root = h("div", { class: "mlsql-expt" });
  el.append(root);
  const draw = () => {
    root.replaceChildren();
    const status = model.get("status");
    const trust = model.get("trustworthy");
    root.append(h("div", { class: "mlsql-expt-head" },
      h("b", {}, `experiment ${model.get("experiment")}`), ` · ${status}`,
      h("span", { class: trust ? "mlsql-expt-ok" : "mlsql-expt-srm" },
        trust ? " · sample ratio ok" : ` · SAMPLE RATIO MISMATCH (p = ${pval(model.get("srm_p_value"))}): not trustworthy`)));
    if (model.get("error")) root.append(h("div", { class: "mlsql-expt-error" }, model.get("error")));
    root.append(armsTable(model));
    root.append(h("div", {}, `${model.get("primary_metric")} over time (value and interval per arm)`), chart(model));
    if (status === "running") {
      root.append(h("div", { class: "mlsql-expt-actions" }, ...(model.get("arms") || []).map((a) =>
        h("button", { onclick: () => model.send({ promote: a.model }) }, `Promote ${a.model}`))));
    }
    if (model.get("promote_result")) root.append(h("div", { class: "mlsql-expt-result" }, model.get("promote_result")));
  };
  for (const k of ["arms", "history", "status", "trustworthy", "error", "promote_result", "primary_metric"]) {
    model.on(`change:${k}`, draw);
  }
  draw();
}

export default { render };
