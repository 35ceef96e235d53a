// Small shared pieces of the part-2 views: number formatting, tables and colour grids built
// from the API's numbers (every cell set as text), filter chips, a line chart over a numeric
// x axis (uPlot; dashed series, a per-point note in the legend) and an SVG box plot. Nothing
// here computes a statistic: the views pass the API's numbers and these only lay them out.

import { cssVar } from "./dash_lines.js";
import { h } from "./dash_state.js";

const SVG = "http://www.w3.org/2000/svg";

/** A number for a table cell: ``digits`` decimals, exponent for tiny/huge, "--" for none. */
export function fmt(value, digits = 3) {
  if (value === null || value === undefined || !Number.isFinite(Number(value))) return "--";
  const v = Number(value);
  const size = Math.abs(v);
  if (size !== 0 && (size < 10 ** -digits || size >= 1e6)) return v.toExponential(2);
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
  return `rgb(${[0, 1, 2].map((i) => Math.round(a[i] + (b[i] - a[i]) * t)).join(",")})`;
}

/** ``value -> css colour`` over ``values`` (the theme's heatmap colours). */
function cellColour(values, scale) {
  let limit = 0;
  let low = Infinity;
  for (const v of values) {
    if (Number.isFinite(v)) {
      limit = Math.max(limit, Math.abs(v));
      low = Math.min(low, v);
    }
  }
  limit = limit || 1;
  if (scale === "diverging") {
    const [neg, mid, pos] = ["--heat-neg", "--heat-mid", "--heat-pos"].map((n) => rgb(cssVar(n)));
    return (v) => (v < 0 ? mix(mid, neg, Math.min(1, -v / limit))
      : mix(mid, pos, Math.min(1, v / limit)));
  }
  const [lo, hi] = ["--heat-lo", "--heat-hi"].map((n) => rgb(cssVar(n)));
  const base = low >= 0 ? 0 : low;
  const span = limit - base || 1;
  return (v) => mix(lo, hi, Math.max(0, Math.min(1, (v - base) / span)));
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
      if (Number.isFinite(Number(value)) && value !== null) td.style.background = colour(Number(value));
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
  constructor(el, { height = 240, xLabel = "", yLabel = "" } = {}) {
    this.el = el;
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
      axes: [{ ...axis, label: xLabel }, { ...axis, label: yLabel, size: 64 }],
      series: [{ label: xLabel, value: (u, v) => (v === null || v === undefined ? "--" : String(v)) },
        ...series.map((s) => ({ label: s.label, stroke: s.colour, width: 1.5, dash: s.dash,
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
  const y = (v) => pad.top + (hi - v) / (hi - lo) * (height - pad.top - pad.bottom);
  const slot = (width - pad.left - pad.right) / Math.max(1, boxes.length);
  const root = svg("svg", { class: "box-plot", viewBox: `0 0 ${width} ${height}`, width, height,
    role: "img" });
  if (id) root.id = id;
  for (const tick of [lo, (lo + hi) / 2, hi]) {
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
