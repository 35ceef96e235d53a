// Per-token line charts: one uPlot per chart (the vendored uPlot, a classic script that sets
// window.uPlot), x = token index. Drawn over the lines: the prompt/response divider, a
// highlighted span and the current token's marker; moving the marker only repaints (no new
// paths). Clicking the plot selects the token under the pointer. Also the series maths of
// the Inference view (units, moving average, centring, delta, first difference), all on plain
// arrays where null means "no value at this token".

import { floats } from "./dash_api.js";

export const COLOURS = ["#3b82f6", "#ef4444", "#22c55e", "#a855f7", "#f97316", "#06b6d4",
  "#ec4899", "#84cc16", "#eab308", "#64748b"];
const SYNC_KEY = "residlab-tokens";
/** Line width in CSS pixels. One pixel, not more: the canvas strokes a width-1 line on its
 * fast hairline path, while a wider anti-aliased stroke over 2,000 jagged points took about
 * 160 ms per page of three charts to rasterise in software (the benchmark's main cost). */
export const LINE_WIDTH = 1;

/** Centred moving average over ``window`` tokens, skipping nulls (null stays null). */
export function movingAverage(values, window) {
  if (window <= 1) return values.slice();
  const left = Math.floor((window - 1) / 2);
  const right = window - 1 - left;
  return values.map((value, i) => {
    if (value === null) return null;
    let sum = 0;
    let n = 0;
    for (let j = Math.max(0, i - left); j <= Math.min(values.length - 1, i + right); j++) {
      if (values[j] !== null) { sum += values[j]; n += 1; }
    }
    return sum / n;
  });
}

/** ``values`` minus the value at its first token that has one. */
export function centreOnFirst(values) {
  const first = values.find((value) => value !== null);
  if (first === undefined) return values.slice();
  return values.map((value) => (value === null ? null : value - first));
}

/** The first difference: ``out[i] = v[i] - v[i-1]`` (null where either is missing). */
export function firstDifference(values) {
  return values.map((value, i) => (i === 0 || value === null || values[i - 1] === null
    ? null : value - values[i - 1]));
}

/** One line's values per token (null where not projected), in the chosen mode. */
export function lineValues(payload, layer, normsPayload, mode) {
  const n = payload.n_tokens;
  const entry = payload.layers.find((l) => l.layer === layer)
    ?? payload.layers.find((l) => l.layer === payload.default_layer) ?? payload.layers[0];
  const out = new Array(n).fill(null);
  if (!entry) return out;
  const projection = floats(entry.projection_b64);
  const start = entry.start ?? payload.start ?? 0;
  const norms = normsPayload ? floats(normsPayload.norms_b64) : null;
  const normStart = normsPayload?.start ?? 0;
  const mean = entry.mean_response_norm;
  for (let i = 0; i < projection.length && start + i < n; i++) {
    const t = start + i;
    if (mode === "raw") out[t] = projection[i];
    else if (mode === "normalised") out[t] = mean > 0 ? projection[i] / mean : null;
    else {
      const norm = norms?.[t - normStart];
      out[t] = norm > 0 ? projection[i] / norm : null;
    }
  }
  return out;
}

/** The drawn series from the loaded data (``b``, and ``a`` in diff mode: {proj: Map trait ->
 * projections answer, norms: Map layer -> norms answer}): mode, centring, delta, smoothing. */
export function computeSeries(s, lines, b, a) {
  const one = (data, line) => {
    const values = lineValues(data.proj.get(line.trait), line.layer, data.norms.get(line.layer),
      s.mode);
    return s.centre ? centreOnFirst(values) : values;
  };
  return lines.map((line) => {
    let values = one(b, line);
    if (a) {
      const other = one(a, line);
      const n = Math.min(values.length, other.length);
      values = values.slice(0, n).map((v, i) => (v === null || other[i] === null ? null
        : v - other[i]));
    }
    return { label: a ? `Δ ${line.label}` : line.label, colour: line.colour,
      values: movingAverage(values, s.smooth) };
  });
}

/** The activation norm per token at ``layer`` (null before the first stored token). */
export function normSeries(data, layer, n, colour) {
  const payload = data.norms.get(layer);
  const values = new Array(n).fill(null);
  const norms = floats(payload?.norms_b64);
  const start = payload?.start ?? 0;
  for (let i = 0; i < norms.length && start + i < n; i++) values[start + i] = norms[i];
  return { label: `‖h‖ ${data.variant} L${layer}`, colour, values };
}

/** A CSS custom property of the page (the theme's colours). */
export function cssVar(name, fallback = "#888") {
  const value = getComputedStyle(document.documentElement).getPropertyValue(name).trim();
  return value || fallback;
}

function formatValue(value) {
  if (value === null || value === undefined || Number.isNaN(value)) return "--";
  const size = Math.abs(value);
  return size !== 0 && (size < 1e-3 || size >= 1e5) ? value.toExponential(3) : value.toFixed(4);
}

/** A line chart in ``el``. ``draw()`` shows data; ``setMarker`` / ``setBand`` repaint only. */
export class LineChart {
  constructor(el, { height = 240, yLabel = "", onSelect = null, tokenText = null } = {}) {
    this.el = el;
    this.height = height;
    this.yLabel = yLabel;
    this.onSelect = onSelect;
    this.tokenText = tokenText; // (i) -> the token's text, for the legend
    this.plot = null;
    this.key = "";
    this.divider = null;
    this.marker = null;
    this.band = null;
  }

  /** ``series``: [{label, values, colour}] over ``x`` (token indices). */
  draw({ x, series, divider = null, marker = null, band = null, yLabel = this.yLabel }) {
    Object.assign(this, { divider, marker, band, yLabel });
    const data = [x, ...series.map((s) => s.values)];
    const key = JSON.stringify([series.map((s) => [s.label, s.colour]), yLabel,
      document.documentElement.dataset.theme ?? ""]);
    if (this.plot && key === this.key) {
      this.plot.setData(data);
      return;
    }
    this.plot?.destroy();
    this.plot = new window.uPlot(this.options(series), data, this.el);
    this.plot.over.addEventListener("click", () => this.select());
    this.key = key;
  }

  options(series) {
    const fg = cssVar("--fg");
    const grid = { stroke: cssVar("--grid"), width: 1 };
    const axis = { stroke: fg, grid, ticks: grid };
    return {
      width: this.width(), height: this.height,
      cursor: { drag: { x: false, y: false }, sync: { key: SYNC_KEY }, points: { size: 6 } },
      scales: { x: { time: false, range: (u, min, max) => [min - 0.5, max + 0.5] } },
      axes: [{ ...axis, label: "token" }, { ...axis, label: this.yLabel, size: 64 }],
      series: [
        { label: "token", value: (u, i) => this.xLegend(i) },
        ...series.map((s) => ({ label: s.label, stroke: s.colour, width: LINE_WIDTH,
          points: { show: false }, value: (u, v) => formatValue(v) })),
      ],
      hooks: { drawClear: [(u) => this.underlay(u)], draw: [(u) => this.overlay(u)] },
    };
  }

  xLegend(i) {
    if (i === null || i === undefined) return "--";
    const text = this.tokenText ? this.tokenText(i) : null;
    return text === null ? String(i) : `${i} ${JSON.stringify(text)}`;
  }

  select() {
    const u = this.plot;
    if (!u || !this.onSelect || u.cursor.left == null || u.cursor.left < 0) return;
    const xs = u.data[0];
    if (!xs.length) return;
    const value = Math.round(u.posToVal(u.cursor.left, "x"));
    this.onSelect(Math.max(xs[0], Math.min(xs[xs.length - 1], value)));
  }

  /** Under the lines: the prompt tokens shaded, then the highlighted span. */
  underlay(u) {
    const { left, top, width, height } = u.bbox;
    const ctx = u.ctx;
    ctx.save();
    ctx.beginPath();
    ctx.rect(left, top, width, height);
    ctx.clip();
    if (this.divider !== null) {
      const x1 = u.valToPos(this.divider - 0.5, "x", true);
      ctx.fillStyle = cssVar("--prompt-shade", "rgba(128,128,128,.08)");
      ctx.fillRect(left, top, Math.max(0, x1 - left), height);
    }
    if (this.band) {
      const x0 = u.valToPos(this.band[0] - 0.5, "x", true);
      const x1 = u.valToPos(this.band[1] - 0.5, "x", true);
      ctx.fillStyle = cssVar("--band", "rgba(234,179,8,.25)");
      ctx.fillRect(x0, top, x1 - x0, height);
    }
    ctx.restore();
  }

  /** Over the lines: the divider (dashed) and the current token's marker. */
  overlay(u) {
    const ctx = u.ctx;
    const line = (value, colour, dash) => {
      const x = Math.round(u.valToPos(value, "x", true)) + 0.5;
      if (x < u.bbox.left || x > u.bbox.left + u.bbox.width) return;
      ctx.strokeStyle = colour;
      ctx.setLineDash(dash);
      ctx.lineWidth = devicePixelRatio;
      ctx.beginPath();
      ctx.moveTo(x, u.bbox.top);
      ctx.lineTo(x, u.bbox.top + u.bbox.height);
      ctx.stroke();
    };
    ctx.save();
    if (this.divider !== null) line(this.divider - 0.5, cssVar("--divider"), [4, 4]);
    if (this.marker !== null) line(this.marker, cssVar("--marker"), []);
    ctx.restore();
  }

  setMarker(index) {
    this.marker = index;
    this.plot?.redraw(false, false);
  }

  setBand(band) {
    this.band = band;
    this.plot?.redraw(false, false);
  }

  width() {
    return Math.max(300, this.el.clientWidth);
  }

  resize() {
    this.plot?.setSize({ width: this.width(), height: this.height });
  }

  destroy() {
    this.plot?.destroy();
    this.plot = null;
    this.key = "";
  }
}
