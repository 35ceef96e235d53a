// Small shared pieces of the part-2 views: number formatting, tables and colour grids built
// from the API's numbers (every cell set as text), filter chips, a line chart over a numeric
// x axis (uPlot; dashed series, a per-point note in the legend) and an SVG box plot. Nothing
// here computes a statistic: the views pass the API's numbers and these only lay them out.

import { LINE_WIDTH, cssVar } from "./dash_lines.js";
import { getJSON } from "./dash_api.js";
import { errorPanel, h, note, setDebug, setViewReady, state, subscribe } from "./dash_state.js";

const SVG = "http://www.w3.org/2000/svg";

/** A number for a table cell: ``digits`` decimals, exponent for tiny/huge, "--" for none. */
export function fmt(value, digits = 3) {
  if (value === null || value === undefined || !Number.isFinite(Number(value))) return "--";
  const v = Number(value);
  const size = Math.abs(v);
  if (size !== 0 && (size < 1e-4 || size >= 1e6)) return v.toExponential(2);
  return Number.isInteger(v) ? String(v) : v.toFixed(digits);
}

/** ``{id, columns: [{key, label, format?(value, row), title?(row)}], rows, rowClass?}``:
 * a table whose cells are text. */
export function dataTable({ id = null, columns, rows, rowClass = null, empty = "No rows." }) {
  const head = h("thead", {}, h("tr", {}, columns.map((c) => h("th", { text: c.label,
    title: c.help ?? null }))));
  const body = h("tbody", {}, rows.map((row, i) => h("tr", { class: rowClass?.(row, i) ?? null },
    columns.map((c) => {
      const value = row[c.key];
      const text = c.format ? c.format(value, row) : (typeof value === "number" ? fmt(value)
        : String(value ?? "--"));
      return h("td", { text, title: c.title?.(row) ?? null, data: { key: c.key } });
    }))));
  const table = h("table", { id, class: "data-table" }, head, body);
  return rows.length ? table : h("div", { id }, h("p", { class: "note", text: empty }));
}

function rgb(hex) {
  const match = /^#?([0-9a-f]{6})$/i.exec(String(hex).trim());
  const n = match ? parseInt(match[1], 16) : 0x888888;
  return [(n >> 16) & 255, (n >> 8) & 255, n & 255];
}

function mix(a, b, t) {
  return [0, 1, 2].map((i) => Math.round(a[i] + (b[i] - a[i]) * t));
}

/** ``value -> [r, g, b]`` over ``values`` (the theme's heatmap colours): diverging around 0,
 * or sequential from the smallest to the largest value. */
function cellColour(values, scale) {
  const finite = values.filter(Number.isFinite);
  const low = finite.length ? Math.min(...finite) : 0;
  const high = finite.length ? Math.max(...finite) : 1;
  if (scale === "diverging") {
    const limit = Math.max(Math.abs(low), Math.abs(high)) || 1;
    const [neg, mid, pos] = ["--heat-neg", "--heat-mid", "--heat-pos"].map((n) => rgb(cssVar(n)));
    return (v) => (v < 0 ? mix(mid, neg, Math.min(1, -v / limit))
      : mix(mid, pos, Math.min(1, v / limit)));
  }
  const [lo, hi] = ["--heat-lo", "--heat-hi"].map((n) => rgb(cssVar(n)));
  const span = high - low || 1;
  return (v) => mix(lo, hi, Math.max(0, Math.min(1, (v - low) / span)));
}

/** Text that reads on ``background`` ([r, g, b]). */
function textOn([r, g, b]) {
  return 0.299 * r + 0.587 * g + 0.114 * b > 150 ? "#111827" : "#f8fafc";
}

/** A colour grid as a table: ``values[r][c]`` (null = no run) under column labels, the
 * ``best`` cell ([r, c]) outlined. Cells show the formatted value as text. */
export function gridTable({ id = null, rowLabels, colLabels, values, best = null, scale =
"sequential", format = fmt, corner = "", cellTitle = null }) {
  const colour = cellColour(values.flat().map((v) => (v === null ? NaN : Number(v))), scale);
  const rows = values.map((row, r) => h("tr", {}, h("th", { text: rowLabels[r] }),
    row.map((value, c) => {
      const isBest = best && best[0] === r && best[1] === c;
      const td = h("td", { class: isBest ? "grid-cell best" : "grid-cell",
        text: value === null || value === undefined ? "" : format(value),
        title: cellTitle?.(r, c, value) ?? null, data: { row: String(r), col: String(c) } });
      if (Number.isFinite(Number(value)) && value !== null) {
        const background = colour(Number(value));
        td.style.background = `rgb(${background.join(",")})`;
        td.style.color = textOn(background);
      }
      return td;
    })));
  return h("table", { id, class: "grid-table" },
    h("thead", {}, h("tr", {}, h("th", { text: corner }), colLabels.map((text) => h("th",
      { text: String(text) })))), h("tbody", {}, rows));
}

/** Toggle chips: ``options`` [value], ``selected`` a Set; ``onChange(Set)`` on each click. */
export function chips({ id, label, options, selected, onChange }) {
  return h("div", { class: "chips", id, role: "group", "aria-label": label },
    h("span", { class: "chips-label", text: label }),
    options.map((value) => h("button", { type: "button", text: String(value),
      class: selected.has(value) ? "chip on" : "chip", "aria-pressed": String(selected.has(value)),
      data: { value: String(value) },
      onclick: () => {
        const next = new Set(selected);
        if (next.has(value)) next.delete(value);
        else next.add(value);
        onChange(next);
      } })));
}

/** A line chart over a numeric x (layers, positions): ``series`` [{label, values, colour,
 * dash?, notes?}] where ``notes[i]`` (text) is shown in the legend next to the value. */
export class XYChart {
  constructor(el, { height = 240, xLabel = "", yLabel = "", integerX = true } = {}) {
    this.el = el;
    this.integerX = integerX; // x is layers or positions: ticks on whole numbers only
    this.height = height;
    this.xLabel = xLabel;
    this.yLabel = yLabel;
    this.plot = null;
  }

  draw({ x, series, yLabel = this.yLabel, xLabel = this.xLabel }) {
    this.plot?.destroy();
    const fg = cssVar("--fg");
    const grid = { stroke: cssVar("--grid"), width: 1 };
    const axis = { stroke: fg, grid, ticks: grid };
    const options = {
      width: Math.max(300, this.el.clientWidth), height: this.height,
      cursor: { drag: { x: false, y: false }, points: { size: 6 } },
      scales: { x: { time: false } },
      axes: [{ ...axis, label: xLabel, ...(this.integerX ? { incrs: [1, 2, 5, 10, 20, 50, 100,
        200, 500, 1000] } : {}) }, { ...axis, label: yLabel, size: 64 }],
      series: [{ label: xLabel, value: (u, v) => (v === null || v === undefined ? "--" : String(v)) },
        ...series.map((s) => ({ label: s.label, stroke: s.colour, width: LINE_WIDTH, dash: s.dash,
          spanGaps: false, points: { show: true, size: 5 },
          value: (u, v, si, i) => (v === null || v === undefined ? "--"
            : `${fmt(v)}${s.notes?.[i] ? ` (${s.notes[i]})` : ""}`) }))],
    };
    this.plot = new window.uPlot(options, [x, ...series.map((s) => s.values)], this.el);
  }

  resize() {
    this.plot?.setSize({ width: Math.max(300, this.el.clientWidth), height: this.height });
  }

  destroy() {
    this.plot?.destroy();
    this.plot = null;
  }
}

function svg(tag, attrs = {}, text = null) {
  const node = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, String(value));
  if (text !== null) node.textContent = String(text);
  return node;
}

/** An SVG box plot: ``boxes`` [{label, min, q1, median, q3, max, mean?}] (the API's
 * quantiles), one box per label, whiskers at min/max, the mean as a dot. */
export function boxPlot({ id = null, boxes, yLabel = "", width = 640, height = 260 }) {
  const pad = { left: 64, right: 16, top: 12, bottom: 36 };
  const all = boxes.flatMap((b) => [b.min, b.max, b.mean]).filter(Number.isFinite);
  let [lo, hi] = all.length ? [Math.min(...all), Math.max(...all)] : [0, 1];
  if (lo === hi) { lo -= 1; hi += 1; }
  const margin = (hi - lo) * 0.06;
  lo -= margin;
  hi += margin;
  const y = (v) => pad.top + (hi - v) / (hi - lo) * (height - pad.top - pad.bottom);
  const slot = (width - pad.left - pad.right) / Math.max(1, boxes.length);
  const root = svg("svg", { class: "box-plot", viewBox: `0 0 ${width} ${height}`, width, height,
    role: "img" });
  if (id) root.id = id;
  for (const tick of [0, 0.25, 0.5, 0.75, 1].map((t) => lo + t * (hi - lo))) {
    root.append(svg("line", { class: "grid", x1: pad.left, x2: width - pad.right, y1: y(tick),
      y2: y(tick) }), svg("text", { class: "tick", x: pad.left - 6, y: y(tick) + 4,
      "text-anchor": "end" }, fmt(tick, 2)));
  }
  root.append(svg("text", { class: "axis-label", x: 12, y: height / 2, transform:
    `rotate(-90 12 ${height / 2})`, "text-anchor": "middle" }, yLabel));
  boxes.forEach((b, i) => {
    const cx = pad.left + slot * (i + 0.5);
    const half = Math.min(28, slot * 0.3);
    const g = svg("g", { class: "box", "data-label": b.label });
    g.append(svg("title", {}, `${b.label}: min ${fmt(b.min)} · q1 ${fmt(b.q1)} · median ` +
      `${fmt(b.median)} · q3 ${fmt(b.q3)} · max ${fmt(b.max)}` +
      (Number.isFinite(b.mean) ? ` · mean ${fmt(b.mean)}` : "")));
    if ([b.min, b.q1, b.median, b.q3, b.max].every(Number.isFinite)) {
      g.append(svg("line", { class: "whisker", x1: cx, x2: cx, y1: y(b.max), y2: y(b.min) }),
        svg("rect", { class: "iqr", x: cx - half, width: 2 * half, y: y(b.q3),
          height: Math.max(1, y(b.q1) - y(b.q3)) }),
        svg("line", { class: "median", x1: cx - half, x2: cx + half, y1: y(b.median),
          y2: y(b.median) }));
    }
    if (Number.isFinite(b.mean)) g.append(svg("circle", { class: "mean", cx, cy: y(b.mean), r: 3 }));
    g.append(svg("text", { class: "tick", x: cx, y: height - pad.bottom + 16,
      "text-anchor": "middle" }, b.label));
    root.append(g);
  });
  return root;
}

/** What a failed request means for a panel: a 404 is data not made yet (the server's line
 * ends with the command that makes it), shown as a hint; anything else is an error. */
export function missingOrError(what, error) {
  if (error?.status !== 404) return errorPanel(what, error);
  return h("div", { class: "hint-panel missing" }, h("strong", { text: `No ${what} yet:` }),
    h("p", {}, h("code", { text: error.message ?? String(error) })));
}

/** The experiment's overview (what the part-2 views can show) for the render ``gen`` of
 * ``view``; null when there is no experiment (``onEmpty()`` then publishes the view's empty
 * debug data), the request failed (``view.root`` says why) or a newer render began. */
export async function experimentOverview(view, gen, onEmpty) {
  if (!state.exp) {
    view.root.replaceChildren(note("No experiment selected."));
    onEmpty();
    return null;
  }
  try {
    const overview = await getJSON("overview", { exp: state.exp });
    return gen === view.gen ? overview : null;
  } catch (error) {
    if (gen === view.gen) view.root.replaceChildren(missingOrError("experiment overview", error));
    return null;
  }
}

/** ``select`` with ``options`` [[value, text]] and ``value`` chosen, in a label. */
export function selectBox(id, label, options, value, onChange) {
  const select = h("select", { id, onchange: (e) => onChange(e.target.value) },
    options.map(([v, text]) => h("option", { value: String(v), text: String(text) })));
  select.value = String(value);
  select.disabled = options.length < 2;
  return h("label", {}, `${label} `, select);
}

/** A titled panel: ``h2`` then ``children``. */
export function panel(id, title, ...children) {
  return h("section", { class: "panel", id }, h("h2", { text: title }), ...children);
}

/** Prev/next buttons over a paginated answer ({total, offset, limit}). */
export function pager(id, page, onOffset) {
  const { total = 0, offset = 0, limit = 50 } = page;
  return h("span", { class: "pager", id },
    h("button", { type: "button", text: "‹", "aria-label": "previous page", disabled: offset <= 0,
      onclick: () => onOffset(Math.max(0, offset - limit)) }),
    h("span", { text: total ? `${offset + 1}–${Math.min(total, offset + limit)} of ${total}` : "0" }),
    h("button", { type: "button", text: "›", "aria-label": "next page",
      disabled: offset + limit >= total, onclick: () => onOffset(offset + limit) }));
}

/** ``data-view-ready`` for a view with several loads in flight: cleared by ``begin()``, set
 * again when every begun load has ended. A load of an older generation still ends. */
export class ReadyTracker {
  constructor(name) {
    this.name = name;
    this.pending = 0;
    this.stopped = false;
  }

  begin() {
    this.pending += 1;
    if (!this.stopped) setViewReady(null);
  }

  end() {
    this.pending = Math.max(0, this.pending - 1);
    if (!this.pending && !this.stopped) setViewReady(this.name);
  }

  /** The view is gone: never touch the flag again. */
  stop() {
    this.stopped = true;
  }

  /** ``await fn()`` between begin and end. */
  async run(fn) {
    this.begin();
    try {
      return await fn();
    } finally {
      this.end();
    }
  }
}

/** What every data view shares: a generation counter (a render bumps it; an answer for an
 * older one is dropped), the ready flag, its debug object published under its name, and a
 * redraw when a state key in ``redraw`` changes. A view implements ``render()``; its
 * ``destroy()`` calls this one first. */
export class DataView {
  constructor(root, name, redraw) {
    this.root = root;
    this.name = name;
    this.gen = 0;
    this.ready = new ReadyTracker(name);
    this.debug = {};
    this.unsubscribe = subscribe((changed) => {
      if (redraw.some((key) => changed.has(key))) this.render();
    });
  }

  publish(patch) {
    Object.assign(this.debug, patch);
    setDebug(this.name, this.debug);
  }

  destroy() {
    this.gen += 1;
    this.ready.stop();
    this.unsubscribe();
  }
}
