// Canvas heatmaps (rows x columns of floats) with a hover readout. The cells are painted once
// into an offscreen canvas of one pixel per cell and scaled up without smoothing, so a 30 x
// 2,000 matrix costs one drawImage; the marker column is drawn on top from that cache. Row
// labels are drawn on the canvas; every string shown in the readout is set as text.

import { cssVar } from "./dash_lines.js";

const LABEL_FONT = "11px system-ui, sans-serif";

function rgb(hex) {
  const match = /^#?([0-9a-f]{6})$/i.exec(hex.trim());
  const n = match ? parseInt(match[1], 16) : 0x888888;
  return [(n >> 16) & 255, (n >> 8) & 255, n & 255];
}

function mix(a, b, t) {
  return [0, 1, 2].map((i) => Math.round(a[i] + (b[i] - a[i]) * t));
}

/** ``value -> [r, g, b]`` for ``values`` (NaN skipped): diverging around 0 (symmetric), or
 * sequential from 0 to the largest value. Returns the scale and its limit. */
function colourScale(values, kind) {
  let limit = 0;
  for (const v of values) if (Number.isFinite(v)) limit = Math.max(limit, Math.abs(v));
  limit = limit || 1;
  if (kind === "diverging") {
    const [neg, mid, pos] = ["--heat-neg", "--heat-mid", "--heat-pos"].map((n) => rgb(cssVar(n)));
    return { kind, limit, colour: (v) => (v < 0 ? mix(mid, neg, Math.min(1, -v / limit))
      : mix(mid, pos, Math.min(1, v / limit))) };
  }
  const [lo, hi] = ["--heat-lo", "--heat-hi"].map((n) => rgb(cssVar(n)));
  return { kind, limit, colour: (v) => mix(lo, hi, Math.max(0, Math.min(1, v / limit))) };
}

/** A heatmap in ``el``: a canvas and a readout line under it. */
export class Heatmap {
  constructor(el, { onHoverRow = null, onSelectCol = null, describe = null } = {}) {
    this.el = el;
    this.onHoverRow = onHoverRow;   // (row) when the pointer enters a row
    this.onSelectCol = onSelectCol; // (column index + colOffset) on click
    this.describe = describe;       // (row, col, value) -> readout text
    this.canvas = document.createElement("canvas");
    this.canvas.className = "heatmap-canvas";
    this.readout = document.createElement("div");
    this.readout.className = "readout";
    el.replaceChildren(this.canvas, this.readout);
    this.cells = document.createElement("canvas");
    this.data = null;
    this.marker = null;
    this.hoverRow = -1;
    this.canvas.addEventListener("mousemove", (e) => this.hover(e));
    this.canvas.addEventListener("mouseleave", () => this.leave());
    this.canvas.addEventListener("click", (e) => this.click(e));
  }

  /** ``values``: row-major Float32Array (rows x cols), NaN = no value. ``colOffset``: the
   * absolute index of column 0 (for the marker, clicks and the readout). */
  draw({ values, rows, cols, rowLabels, colOffset = 0, scale = "diverging", marker = null }) {
    this.data = { values, rows, cols, rowLabels, colOffset };
    this.marker = marker;
    this.scale = colourScale(values, scale);
    this.cells.width = Math.max(1, cols);
    this.cells.height = Math.max(1, rows);
    const ctx = this.cells.getContext("2d");
    const image = ctx.createImageData(this.cells.width, this.cells.height);
    const blank = rgb(cssVar("--panel", "#ffffff"));
    const pixels = image.data;
    for (let i = 0; i < rows * cols; i++) {
      const v = values[i];
      const colour = Number.isFinite(v) ? this.scale.colour(v) : blank;
      pixels[4 * i] = colour[0];
      pixels[4 * i + 1] = colour[1];
      pixels[4 * i + 2] = colour[2];
      pixels[4 * i + 3] = 255;
    }
    ctx.putImageData(image, 0, 0);
    this.layout();
    this.paint();
    this.readout.textContent = this.legend();
  }

  legend() {
    const { limit } = this.scale;
    return `colour: ${this.scale.kind === "diverging" ? (-limit).toPrecision(3) : "0"} … ` +
      `${limit.toPrecision(3)}; hover a cell to read it`;
  }

  layout() {
    const { rows, rowLabels } = this.data;
    const ctx = this.canvas.getContext("2d");
    ctx.font = LABEL_FONT;
    const widest = Math.max(0, ...rowLabels.map((label) => ctx.measureText(label).width));
    this.labelWidth = Math.min(160, Math.ceil(widest) + 8);
    this.rowHeight = Math.max(4, Math.min(22, Math.floor(260 / Math.max(1, rows))));
    this.cssWidth = Math.max(300, this.el.clientWidth);
    this.cssHeight = rows * this.rowHeight;
    const dpr = window.devicePixelRatio || 1;
    this.canvas.width = Math.round(this.cssWidth * dpr);
    this.canvas.height = Math.round(this.cssHeight * dpr);
    this.canvas.style.width = `${this.cssWidth}px`;
    this.canvas.style.height = `${this.cssHeight}px`;
  }

  /** Cells, row labels and marker, from the cached cells. */
  paint() {
    if (!this.data) return;
    const { rows, cols, rowLabels, colOffset } = this.data;
    const ctx = this.canvas.getContext("2d");
    const dpr = window.devicePixelRatio || 1;
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, this.cssWidth, this.cssHeight);
    ctx.imageSmoothingEnabled = false;
    const plotWidth = this.cssWidth - this.labelWidth;
    ctx.drawImage(this.cells, this.labelWidth, 0, plotWidth, this.cssHeight);
    ctx.font = LABEL_FONT;
    ctx.fillStyle = cssVar("--fg");
    ctx.textBaseline = "middle";
    if (this.rowHeight >= 9) {
      rowLabels.forEach((label, r) => {
        ctx.fillText(this.fit(ctx, label), 2, (r + 0.5) * this.rowHeight);
      });
    }
    if (this.marker !== null && this.marker >= colOffset && this.marker < colOffset + cols) {
      const cell = plotWidth / cols;
      const x = this.labelWidth + (this.marker - colOffset) * cell;
      ctx.strokeStyle = cssVar("--marker");
      ctx.lineWidth = 1.5;
      ctx.strokeRect(x, 0.75, Math.max(cell, 1.5), rows * this.rowHeight - 1.5);
    }
  }

  /** ``label`` cut to the label column, with an ellipsis. */
  fit(ctx, label) {
    const room = this.labelWidth - 6;
    if (ctx.measureText(label).width <= room) return label;
    let n = label.length;
    while (n > 1 && ctx.measureText(`${label.slice(0, n)}…`).width > room) n -= 1;
    return `${label.slice(0, n)}…`;
  }

  /** (row, column) under a mouse event, or null. */
  cellAt(event) {
    if (!this.data) return null;
    const box = this.canvas.getBoundingClientRect();
    const x = event.clientX - box.left - this.labelWidth;
    const y = event.clientY - box.top;
    const plotWidth = this.cssWidth - this.labelWidth;
    if (x < 0 || x >= plotWidth || y < 0 || y >= this.cssHeight) return null;
    return { row: Math.floor(y / this.rowHeight),
      col: Math.floor((x / plotWidth) * this.data.cols) };
  }

  hover(event) {
    const cell = this.cellAt(event);
    if (!cell) return;
    const { values, cols, rowLabels, colOffset } = this.data;
    const value = values[cell.row * cols + cell.col];
    this.readout.textContent = this.describe
      ? this.describe(cell.row, cell.col + colOffset, value)
      : `${rowLabels[cell.row]} · ${cell.col + colOffset} · ${value}`;
    if (cell.row !== this.hoverRow) {
      this.hoverRow = cell.row;
      this.onHoverRow?.(cell.row);
    }
  }

  leave() {
    this.hoverRow = -1;
    if (this.data) this.readout.textContent = this.legend();
  }

  click(event) {
    const cell = this.cellAt(event);
    if (cell && this.onSelectCol) this.onSelectCol(cell.col + this.data.colOffset);
  }

  setMarker(index) {
    this.marker = index;
    this.paint();
  }

  resize() {
    if (!this.data) return;
    this.layout();
    this.paint();
  }
}
