// The device monitor's view (anywidget ES module). Everything is drawn here as inline SVG from the
// synced traits (see mlsql/widgets.py): no library, no network.

const SVG = "http://www.w3.org/2000/svg";
const STATES = {
  connecting: "connecting…",
  live: "live",
  disconnected: "disconnected",
  stopped: "stopped",
};

function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
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

function fmt(v, unit = "") {
  if (v === null || v === undefined || Number.isNaN(v)) return "–";
  if (v === 0) return "0" + unit;
  if (unit === "%") return (v * 100).toFixed(v < 0.001 && v > 0 ? 3 : 2) + "%";
  const a = Math.abs(v);
  let out;
  if (a >= 1e6) out = (v / 1e6).toFixed(2) + "M";
  else if (a >= 1e4) out = (v / 1e3).toFixed(1) + "k";
  else if (a >= 100 || Number.isInteger(v)) out = v.toFixed(0);  // counts: "1", not "1.00"
  else if (a >= 10) out = v.toFixed(1);
  else if (a >= 1) out = v.toFixed(2);
  else out = v.toPrecision(2);
  return out + unit;
}

function clock(t) {
  if (!t) return "never";
  return new Date(t * 1000).toLocaleTimeString([], { hour12: false });
}

// The smallest 1, 2 or 5 times a power of ten at or above v (round axis labels).
function niceCeil(v) {
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 2, 5, 10]) if (m * p >= v - 1e-12) return m * p;
  return 10 * p;
}

// The newest point of a series that has a value, and its time: {v, t} ({v: null} when none).
// An interval without requests has no latency: legends and tiles both show the newest window
// that had one, so they always agree.
function lastPoint(times, values) {
  for (let i = values.length - 1; i >= 0; i--) {
    if (values[i] !== null && values[i] !== undefined) return { v: values[i], t: times[i] };
  }
  return { v: null, t: null };
}

// One line chart: series = [{name, color, values}], times = epoch seconds.
function chart(title, times, series, unit, opts = {}) {
  const W = 300, H = 120, L = 42, R = 6, T = 6, B = 18;
  const box = h("div", { class: "mlsql-mon-chart" });
  box.append(h("div", { class: "mlsql-mon-chart-title" }, title));
  const legend = h("div", { class: "mlsql-mon-legend" });
  for (const sr of series) {
    const last = lastPoint(times, sr.values).v;
    legend.append(h("span", { class: "mlsql-mon-key", "data-series": sr.name },
      h("i", { style: `background:${sr.color}` }), `${sr.name} ${fmt(last, unit)}`));
  }
  box.append(legend);
  const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, width: "100%", height: H, preserveAspectRatio: "none",
                         role: "img", "aria-label": title });
  let max = 0;
  for (const sr of series) for (const v of sr.values) if (v !== null && v !== undefined && v > max) max = v;
  if (opts.minMax) max = Math.max(max, opts.minMax);
  max = niceCeil(max > 0 ? max * 1.05 : 1);
  const n = times.length;
  const t0 = n ? times[0] : 0, t1 = n ? times[n - 1] : 1;
  const span = Math.max(t1 - t0, 1);
  const x = (t) => L + ((t - t0) / span) * (W - L - R);
  const y = (v) => T + (1 - v / max) * (H - T - B);
  for (const f of [0, 0.5, 1]) {
    const v = max * f;
    svg.append(s("line", { x1: L, x2: W - R, y1: y(v), y2: y(v), class: "mlsql-mon-grid" }));
    const lab = s("text", { x: L - 4, y: y(v) + 3, "text-anchor": "end", class: "mlsql-mon-axis" });
    lab.textContent = unit === "%" ? fmt(v, "%") : fmt(v);
    svg.append(lab);
  }
  const ago = s("text", { x: L, y: H - 4, class: "mlsql-mon-axis" });
  ago.textContent = n > 1 ? `-${Math.round(span)} s` : "";
  svg.append(ago);
  const now = s("text", { x: W - R, y: H - 4, "text-anchor": "end", class: "mlsql-mon-axis" });
  now.textContent = n ? clock(t1) : "no data yet";
  svg.append(now);
  for (const sr of series) {
    // a gap (no requests in an interval) breaks the line
    let d = "", pen = false, lastPt = null, segments = 0;
    sr.values.forEach((v, i) => {
      if (v === null || v === undefined) { pen = false; return; }
      d += `${pen ? "L" : "M"}${x(times[i]).toFixed(1)},${y(v).toFixed(1)}`;
      if (!pen) segments++;
      pen = true;
      lastPt = [x(times[i]), y(v)];
    });
    if (d) svg.append(s("path", { d, fill: "none", stroke: sr.color, "stroke-width": 1.6,
                                  "vector-effect": "non-scaling-stroke" }));
    if (lastPt) svg.append(s("circle", { cx: lastPt[0], cy: lastPt[1], r: 2.2, fill: sr.color }));
  }
  box.append(svg);
  return box;
}

function tile(label, value, cls = "", note = "") {
  return h("div", { class: `mlsql-mon-tile ${cls}`, "data-tile": label },
           h("div", { class: "mlsql-mon-tile-v" }, value),
           h("div", { class: "mlsql-mon-tile-l" }, label),
           note ? h("div", { class: "mlsql-mon-tile-note" }, note) : null);
}

// A latency tile: the same window as the chart's legend; "12 s ago" when that is not the newest
// interval (no requests since).
function latencyTile(label, times, values) {
  const p = lastPoint(times, values);
  const newest = times.length ? times[times.length - 1] : null;
  const note = p.t !== null && newest !== null && p.t < newest ? `${Math.round(newest - p.t)} s ago` : "";
  return tile(label, fmt(p.v), "", note);
}

function draw(model, el) {
  const status = model.get("status");
  const latest = model.get("latest") || {};
  const fields = model.get("history_fields") || [];
  const hist = model.get("history") || [];
  const col = (name) => { const i = fields.indexOf(name); return hist.map((p) => p[i]); };
  const times = col("t");
  const root = h("div", { class: `mlsql-mon mlsql-mon-${status}`, "data-status": status,
                          "data-updates": String(model.get("updates")) });

  // header: device, state badge, model and where it really runs
  const head = h("div", { class: "mlsql-mon-head" },
    h("span", { class: "mlsql-mon-title" }, `device ${model.get("device_name")}`),
    h("span", { class: `mlsql-mon-badge mlsql-mon-badge-${status}`, "data-status": status }, STATES[status] || status));
  const mname = model.get("model");
  if (mname) {
    const ver = model.get("version");
    head.append(h("span", { class: "mlsql-mon-model" }, `${mname}@${ver || "–"}`));
    const provs = model.get("providers") || [];
    const nodes = model.get("node_providers") || {};
    const ptxt = provs.map((p) => {
      const short = p.replace("ExecutionProvider", "");
      return nodes[p] !== undefined ? `${short} (${nodes[p]} nodes)` : short;
    }).join(", ");
    head.append(h("span", { class: "mlsql-mon-prov" }, `runs on ${ptxt || "–"}`));
    if (latest.suspended) head.append(h("span", { class: "mlsql-mon-badge mlsql-mon-badge-disconnected" }, "suspended"));
  }
  head.append(h("span", { class: "mlsql-mon-updated" }, `updated ${clock(model.get("last_ok"))}`));
  root.append(head);

  if (status === "disconnected") {
    const since = model.get("last_ok");
    root.append(h("div", { class: "mlsql-mon-alert" },
      h("b", {}, "⚠ "), `${model.get("error")}. `,
      since ? `Last good update ${clock(since)} (${Math.round(Date.now() / 1000 - since)} s ago); retrying every ${model.get("interval")} s.`
            : `No update yet; retrying every ${model.get("interval")} s.`));
  } else if (status === "stopped") {
    root.append(h("div", { class: "mlsql-mon-note" }, `Stopped: no more updates. Last values from ${clock(model.get("last_ok"))}.`));
  } else if (status === "connecting") {
    root.append(h("div", { class: "mlsql-mon-note" }, `Connecting to ${model.get("url")}…`));
  }

  const tiles = h("div", { class: "mlsql-mon-tiles" },
    tile("requests", fmt(latest.total_requests)),
    tile("req/s", fmt(latest.requests_per_s)),
    tile("rows/s", fmt(latest.rows_per_s)),
    tile("error rate", fmt(latest.error_rate, "%"), latest.error_rate > 0.01 ? "mlsql-mon-bad" : ""),
    latencyTile("p50 ms", times, col("p50_ms")),
    latencyTile("p95 ms", times, col("p95_ms")),
    latencyTile("p99 ms", times, col("p99_ms")));
  root.append(tiles);
  // how the model shares the device: its class, queue, refusals, missed deadlines, worker restarts
  const sh = latest.sharing || {};
  if (sh.priority) {
    const bits = [sh.priority, sh.isolation === "process" ? "own process" : "in the agent",
                  `queue ${fmt(sh.queue_length)}`, `rejected ${fmt(sh.rejected)}`,
                  `deadline misses ${fmt(sh.deadline_misses)}`];
    if (sh.isolation === "process") bits.push(`restarts ${fmt(sh.worker_restarts)}`);
    if (sh.memory_mb != null) bits.push(`${fmt(sh.memory_mb)} MB`);
    const bad = (sh.rejected || 0) + (sh.deadline_misses || 0) + (sh.worker_restarts || 0) > 0;
    root.append(h("div", { class: "mlsql-mon-small mlsql-mon-sharing" + (bad ? " mlsql-mon-bad" : "") },
      "sharing: " + bits.join(" · ")));
  }

  const charts = h("div", { class: "mlsql-mon-charts" },
    chart("latency (ms)", times, [
      { name: "p50", color: "#1f77b4", values: col("p50_ms") },
      { name: "p95", color: "#ff7f0e", values: col("p95_ms") },
      { name: "p99", color: "#d62728", values: col("p99_ms") }], ""),
    chart("requests/s", times, [{ name: "req/s", color: "#2ca02c", values: col("requests_per_s") }], ""),
    chart("rows/s", times, [{ name: "rows/s", color: "#9467bd", values: col("rows_per_s") }], ""),
    chart("error rate", times, [{ name: "errors", color: "#d62728", values: col("error_rate") }], "%", { minMax: 0.01 }));
  root.append(charts);

  const lower = h("div", { class: "mlsql-mon-lower" });
  // drift per input column
  const drift = model.get("drift") || [];
  const dbox = h("div", { class: "mlsql-mon-drift" }, h("b", {}, "input drift"));
  if (drift.length) {
    const thr = model.get("drift_threshold");
    const table = h("table", {}, h("tr", {}, h("th", {}, "column"), h("th", {}, "live mean"),
      h("th", {}, "training mean ± std"), h("th", {}, "shift"), h("th", {}, "")));
    for (const d of drift) {
      table.append(h("tr", { class: d.flagged ? "mlsql-mon-flag" : "" },
        h("td", {}, d.column),
        h("td", {}, d.kind === "string" ? "–" : fmt(d.live_mean)),
        h("td", {}, d.train_mean === null || d.train_mean === undefined ? "–" : `${fmt(d.train_mean)} ± ${fmt(d.train_std)}`),
        h("td", {}, d.note || ""),
        h("td", {}, d.flagged ? "⚠ drift" : (d.score === null || d.score === undefined ? "" : "ok"))));
    }
    dbox.append(table, h("div", { class: "mlsql-mon-small" },
      `numeric: |live mean − training mean| / training std, flagged above ${thr}; strings: share unseen in training`));
  } else {
    dbox.append(h("div", { class: "mlsql-mon-small" }, model.get("drift_note") || "no input statistics yet"));
  }
  lower.append(dbox);

  // events: deploys, rollbacks, breaker trips
  const events = model.get("events") || [];
  const ebox = h("div", { class: "mlsql-mon-events" }, h("b", {}, "events"));
  if (events.length) {
    const ul = h("ul", {});
    for (const ev of events) {
      ul.append(h("li", { class: `mlsql-mon-ev-${ev.kind}` }, h("span", { class: "mlsql-mon-time" }, clock(ev.time)), " ", ev.text));
    }
    ebox.append(ul);
  } else {
    ebox.append(h("div", { class: "mlsql-mon-small" }, "none yet"));
  }
  lower.append(ebox);
  root.append(lower);

  const others = (model.get("models") || []).filter((m) => m.model !== mname);
  if (others.length) {
    root.append(h("div", { class: "mlsql-mon-small" },
      "also on this device: " + others.map((m) => `${m.model}@${m.active ?? "–"} (${m.priority ? m.priority + ", " : ""}${fmt(m.requests)} requests)`).join(", ")));
  }
  // keep one panel element for the widget's life and swap only its contents: a panel replaced at
  // every update would flicker, lose a text selection and detach whatever a page holds on to
  const panel = el.firstElementChild;
  if (panel && panel.classList.contains("mlsql-mon")) {
    panel.className = root.className;
    panel.dataset.status = root.dataset.status;
    panel.dataset.updates = root.dataset.updates;
    panel.replaceChildren(...root.childNodes);
  } else {
    el.replaceChildren(root);
  }
}

function render({ model, el }) {
  let pending = false;
  const redraw = () => {
    if (pending) return;
    pending = true;
    // all traits of one update arrive in one message: draw once for them
    requestAnimationFrame(() => { pending = false; draw(model, el); });
  };
  const names = ["status", "error", "last_ok", "updates", "model", "version", "providers", "node_providers",
                 "latest", "history", "drift", "drift_note", "events", "models"];
  for (const n of names) model.on(`change:${n}`, redraw);
  // keep the "N s ago" of a disconnected panel current
  const timer = setInterval(() => { if (model.get("status") === "disconnected") redraw(); }, 1000);
  draw(model, el);
  return () => {
    clearInterval(timer);
    for (const n of names) model.off(`change:${n}`, redraw);
  };
}

export default { render };
