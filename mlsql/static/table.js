// The browser side of mlsql.tables.TablePager: draws the page the kernel sent, and asks for
// another page or another sort by changing traits. No rows are kept here but the current page.
function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function render({ model, el: root }) {
  root.classList.add("mlsql-pager");
  const msgs = el("div", "mlsql-pager-messages");
  const wrap = el("div", "mlsql-pager-scroll");
  const table = el("table", "mlsql-result");
  wrap.appendChild(table);
  const nav = el("div", "mlsql-pager-nav");
  root.append(msgs, wrap, nav);

  // requests to the kernel, which owns the state: the view draws what it answers. `want` is the
  // state asked for last, so a click made before the previous answer arrived builds on it
  const state = () => ({ page: model.get("page"), page_size: model.get("page_size"),
                         sort_by: model.get("sort_by"), descending: model.get("descending") });
  let want = state(), seq = 0;
  const set = (changes) => {
    want = { ...want, ...changes };
    model.set("request", { ...want, seq: ++seq });
    model.save_changes();
  };
  const follow = (key) => () => { want[key] = model.get(key); };  // set from Python, e.g. w.page = 3
  for (const key of ["page", "page_size", "sort_by", "descending"]) model.on(`change:${key}`, follow(key));

  function drawMessages() {
    msgs.innerHTML = (model.get("messages") || []).join("\n");  // built and escaped by the kernel
  }

  function drawTable() {
    const cols = model.get("columns"), numeric = model.get("numeric"), sortable = model.get("sortable");
    const sortBy = model.get("sort_by"), desc = model.get("descending");
    table.replaceChildren();
    const thead = el("thead"), hr = el("tr");
    cols.forEach((c, i) => {
      const th = el("th", numeric[i] ? "num" : "");
      th.textContent = c + (c === sortBy ? (desc ? " ▼" : " ▲") : "");
      if (sortable[i]) {
        th.classList.add("sortable");
        th.title = "sort by " + c;
        th.onclick = () => {
          if (c !== want.sort_by) set({ sort_by: c, descending: false, page: 0 });
          else if (!want.descending) set({ descending: true, page: 0 });
          else set({ sort_by: "", descending: false, page: 0 });
        };
      }
      hr.appendChild(th);
    });
    thead.appendChild(hr);
    const tbody = el("tbody");
    for (const row of model.get("rows")) {
      const tr = el("tr");
      row.forEach((v, i) => {
        const td = el("td", numeric[i] ? "num" : "");
        if (!numeric[i] && (v.includes("\n") || v.length > 60)) {
          const box = el("div", "mlsql-cell-box" + (v[0] === "{" || v[0] === "[" ? " json" : ""), v);
          td.appendChild(box);
        } else {
          td.textContent = v;
        }
        tr.appendChild(td);
      });
      tbody.appendChild(tr);
    }
    table.append(thead, tbody);
  }

  function drawNav() {
    const total = model.get("total"), size = model.get("page_size"), page = model.get("page");
    const pages = Math.max(1, Math.ceil(total / size));
    const first = total ? page * size + 1 : 0, last = Math.min(total, (page + 1) * size);
    nav.replaceChildren();
    const btn = (label, title, target, disabled) => {
      const b = el("button", "", label);
      b.title = title;
      b.disabled = disabled;
      b.onclick = () => set({ page: Math.min(Math.max(target(want.page), 0), pages - 1) });
      return b;
    };
    nav.append(
      btn("«", "first page", () => 0, page === 0),
      btn("‹", "previous page", (p) => p - 1, page === 0),
      el("span", "mlsql-pager-pos", `rows ${first.toLocaleString()}–${last.toLocaleString()} of ${total.toLocaleString()} · page ${page + 1} of ${pages.toLocaleString()}`),
      btn("›", "next page", (p) => p + 1, page >= pages - 1),
      btn("»", "last page", () => pages - 1, page >= pages - 1),
    );
    const sel = el("select");
    for (const n of [10, 25, 50, 100]) {
      const o = el("option", "", `${n} / page`);
      o.value = String(n);
      if (n === size) o.selected = true;
      sel.appendChild(o);
    }
    if (![10, 25, 50, 100].includes(size)) {
      const o = el("option", "", `${size} / page`);
      o.value = String(size);
      o.selected = true;
      sel.appendChild(o);
    }
    sel.onchange = () => set({ page_size: Number(sel.value), page: 0 });
    nav.appendChild(sel);
    const foot = el("span", "mlsql-pager-footer", model.get("footer") || "");
    nav.appendChild(foot);
  }

  const all = () => { drawMessages(); drawTable(); drawNav(); };
  model.on("change:rows", () => { drawTable(); drawNav(); });
  model.on("change:sort_by", drawTable);
  model.on("change:descending", drawTable);
  model.on("change:page", drawNav);
  model.on("change:messages", drawMessages);
  model.on("change:footer", drawNav);
  model.on("change:total", drawNav);
  all();
}

export default { render };
