// The Live Chat chart: one line per trait over every token of the conversation, prompt (user)
// and generated (assistant) runs shaded behind the lines. Drawn with the vendored uPlot
// (loaded as a classic script before the modules), redrawn at most once per animation frame.

export const COLOURS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2",
  "#be185d", "#4d7c0f"];
const SHADE = { user: "rgba(37, 99, 235, 0.08)", assistant: "rgba(22, 163, 74, 0.08)" };
const HEIGHT = 260;
const SMOOTH_RADIUS = 2; // a centred window of 5 tokens

/** Centred moving average that skips missing values (null stays null). */
export function smooth(values, radius = SMOOTH_RADIUS) {
  return values.map((v, i) => {
    if (v == null) return null;
    let sum = 0;
    let n = 0;
    for (let j = Math.max(0, i - radius); j <= Math.min(values.length - 1, i + radius); j++) {
      if (values[j] != null) { sum += values[j]; n += 1; }
    }
    return sum / n;
  });
}

/** Runs of prompt (user side) and generated (assistant) tokens: [{start, end, prompt}]. */
export function regions(tokens) {
  const runs = [];
  tokens.forEach((t, i) => {
    const last = runs[runs.length - 1];
    if (last && last.prompt === t.prompt && last.end === i) last.end = i + 1;
    else runs.push({ start: i, end: i + 1, prompt: t.prompt });
  });
  return runs;
}

/** The chart in ``el``; ``show(tokens, names, options)`` schedules a redraw. */
export class TraitChart {
  constructor(el) {
    this.el = el;
    this.plot = null;
    this.key = "";   // trait names and metric the plot was built for
    this.frame = 0;
    this.tokens = [];
    this.names = [];
    this.options = { metric: "scores", smooth: false };
  }

  show(tokens, names, options) {
    Object.assign(this, { tokens, names, options });
    if (!this.frame) this.frame = requestAnimationFrame(() => this.draw());
  }

  draw() {
    this.frame = 0;
    const key = JSON.stringify([this.names, this.options.metric]);
    if (!this.plot || key !== this.key) this.build(key);
    else this.plot.setData(this.data());
    this.el.dataset.points = String(this.tokens.length);
  }

  data() {
    const { metric, smooth: smoothed } = this.options;
    const columns = this.names.map((name) => {
      const values = this.tokens.map((t) => t[metric]?.[name] ?? null);
      return smoothed ? smooth(values) : values;
    });
    return [this.tokens.map((_, i) => i), ...columns];
  }

  build(key) {
    this.plot?.destroy();
    const opts = {
      width: this.width(), height: HEIGHT,
      scales: { x: { time: false, range: (u, min, max) => [min - 0.5, max + 0.5] } },
      axes: [{ label: "token" },
        { label: this.options.metric === "scores" ? "cosine" : "projection" }],
      series: [{ label: "token" }, ...this.names.map((name, i) => ({
        label: name, stroke: COLOURS[i % COLOURS.length], width: 1, points: { show: false },
      }))],
      hooks: { drawClear: [(u) => this.shade(u)] },
    };
    this.plot = new window.uPlot(opts, this.data(), this.el);
    this.key = key;
  }

  /** Under the lines: a band per run of prompt or generated tokens. */
  shade(u) {
    const { left, top, width, height } = u.bbox;
    const ctx = u.ctx;
    ctx.save();
    ctx.beginPath();
    ctx.rect(left, top, width, height);
    ctx.clip();
    for (const run of regions(this.tokens)) {
      const x0 = u.valToPos(run.start - 0.5, "x", true);
      const x1 = u.valToPos(run.end - 0.5, "x", true);
      ctx.fillStyle = run.prompt ? SHADE.user : SHADE.assistant;
      ctx.fillRect(x0, top, x1 - x0, height);
    }
    ctx.restore();
  }

  /** Move the cursor to a token (its values then show in the legend). */
  pointAt(index) {
    const u = this.plot;
    if (u && index < u.data[0].length) {
      u.setCursor({ left: u.valToPos(index, "x"), top: u.bbox.height / (2 * devicePixelRatio) });
    }
  }

  width() {
    return Math.max(280, this.el.clientWidth);
  }

  resize() {
    this.plot?.setSize({ width: this.width(), height: HEIGHT });
  }
}
