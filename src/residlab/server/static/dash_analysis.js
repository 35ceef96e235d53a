// The Model Analysis view. From a variant's calibration: the activation norm by layer
// (residual, and the attention and MLP contributions when recorded), the massive dims across
// layers (flagging the dims in the top 5 at >= 3 layers: what "top5" cleaning removes) and the
// cosine between the layer means. From a model diff (variant pair and prompt set): the summary
// table per trait (peak d at its layer, spread of A and B), the effect size and the cosine of
// the diff vector with each trait vector by layer, and the behavioural diff (mean log-prob
// delta and KL per response position). Every number is the API's.

import { floats, getJSON } from "./dash_api.js";
import { dataTable, DataView, experimentOverview, fmt, gridTable, missingOrError, panel, selectBox, XYChart } from "./dash_charts.js";
import { Heatmap } from "./dash_heatmap.js";
import { COLOURS } from "./dash_lines.js";
import { h, hintsPanel, note, state } from "./dash_state.js";

const REDRAW = ["exp", "meta", "theme"];
const MASSIVE_ROWS = 24; // dims shown in the layer grid (the API sorts them by top-5 count)

const pairKey = (d, set) => JSON.stringify([d.variant_a, d.variant_b, set]);

function hintsAbout(hints, word) {
  return Object.fromEntries(Object.entries(hints ?? {}).filter(([, c]) => String(c).includes(word)));
}

/** The union of ``layers`` lists, ascending. */
function unionLayers(lists) {
  return [...new Set(lists.flat())].sort((a, b) => a - b);
}

function byLayer(layers, x, values) {
  const at = new Map(layers.map((layer, i) => [layer, values?.[i] ?? null]));
  return x.map((layer) => at.get(layer) ?? null);
}

class AnalysisView extends DataView {
  constructor(root) {
    super(root, "analysis", REDRAW);
    this.variant = "";
    this.pair = "";
    this.charts = [];
    this.onResize = () => { for (const chart of this.charts) chart.resize(); };
    window.addEventListener("resize", this.onResize);
    this.render();
  }

  chart(el, options) {
    const chart = new XYChart(el, options);
    this.charts.push(chart);
    return chart;
  }

  clearCharts(which) {
    for (const chart of this.charts.filter((c) => c.group === which)) chart.destroy();
    this.charts = this.charts.filter((c) => c.group !== which);
  }

  async render() {
    const gen = ++this.gen;
    await this.ready.run(async () => {
      this.debug = { calibration: null, diff: null, logprobs: null };
      const overview = await experimentOverview(this, gen, () => this.publish({}));
      if (!overview) return;
      this.overview = overview;
      this.calBox = h("div", { id: "an-calibration" });
      this.diffBox = h("div", { id: "an-diff" });
      this.root.replaceChildren(this.calBox, this.diffBox);
      await Promise.all([this.calibrationPart(gen), this.diffPart(gen)]);
    });
  }

  // ------------------------------------------------------------ calibration

  async calibrationPart(gen) {
    const variants = this.overview.calibration ?? [];
    if (!variants.length) {
      this.calBox.replaceChildren(panel("an-cal-missing", "Calibration",
        hintsPanel("No calibration yet; make it with:", hintsAbout(this.overview.hints, "calibrate"))));
      return;
    }
    if (!variants.includes(this.variant)) {
      this.variant = variants.includes(state.variant) ? state.variant : variants[0];
    }
    this.calBody = h("div", {});
    this.calBox.replaceChildren(h("div", { class: "view-controls" },
      selectBox("an-variant", "calibration of", variants.map((v) => [v, v]), this.variant, (v) => {
        this.variant = v;
        this.ready.run(() => this.loadCalibration(this.gen));
      })), this.calBody);
    await this.loadCalibration(gen);
  }

  async loadCalibration(gen) {
    let cal;
    try {
      cal = await getJSON("calibration", { exp: state.exp, variant: this.variant });
    } catch (error) {
      if (gen === this.gen) this.calBody.replaceChildren(missingOrError("calibration", error));
      return;
    }
    if (gen !== this.gen) return;
    this.clearCharts("cal");
    const normBox = h("div", { id: "an-norms", class: "chart" });
    const adjacentBox = h("div", { id: "an-adjacent", class: "chart" });
    const cosineBox = h("div", { id: "an-cosine", class: "chart" });
    const massive = cal.massive ?? {};
    this.calBody.replaceChildren(
      panel("an-norms-panel", `Activation norm by layer · ${cal.variant} on ${cal.prompt_set}`,
        cal.norms_hint ? h("p", { class: "note", id: "an-norms-hint", text: cal.norms_hint }) : null,
        normBox),
      panel("an-massive-panel", "Massive dims across layers",
        h("p", { class: "note", id: "an-criterion", text: `In the top 5 at ≥ ${massive.top5_min_layers
          ?? 3} layers (removed by "top5" cleaning): ${(massive.criterion_dims ?? []).join(", ")
          || "none"}` }),
        this.massiveGrid(cal), this.massiveTable(massive)),
      panel("an-cosine-panel", "Cosine between layer means", cosineBox,
        h("h3", { text: "adjacent layers" }), adjacentBox));
    const series = [["residual", cal.norms?.residual], ["attention", cal.norms?.attn],
      ["MLP", cal.norms?.mlp]].filter(([, v]) => Array.isArray(v))
      .map(([label, values], i) => ({ label, values, colour: COLOURS[i] }));
    const norms = this.chart(normBox, { height: 220, xLabel: "layer", yLabel: "mean ‖·‖" });
    norms.group = "cal";
    norms.draw({ x: cal.layers, series });
    const cosine = cal.cosine ?? { layers: [], n: 0 };
    const matrix = floats(cosine.matrix_b64);
    new Heatmap(cosineBox, { describe: (r, c, v) => `L${cosine.layers[r]} · L${cosine.layers[c]} · ` +
      `cosine ${fmt(v, 4)}` }).draw({ values: matrix, rows: cosine.n, cols: cosine.n,
      rowLabels: cosine.layers.map((l) => `L${l}`), scale: "diverging" });
    const adjacent = this.chart(adjacentBox, { height: 180, xLabel: "layer → next", yLabel: "cosine" });
    adjacent.group = "cal";
    adjacent.draw({ x: cosine.layers.slice(0, -1), series: [{ label: "cos(mean_l, mean_l+1)",
      values: cosine.adjacent ?? [], colour: COLOURS[0] }] });
    const rows = Array.from({ length: cosine.n }, (_, r) => Array.from(
      matrix.subarray(r * cosine.n, (r + 1) * cosine.n)));
    this.publish({ calibration: { variant: cal.variant, layers: cal.layers,
      residual: cal.norms?.residual ?? null, attn: cal.norms?.attn ?? null, mlp: cal.norms?.mlp ?? null,
      criterion_dims: massive.criterion_dims ?? [], dims: (massive.dims ?? []).map((d) => ({
        dim: d.dim, top5_count: d.top5_count, criterion: d.criterion })),
      cosine: { layers: cosine.layers, matrix: rows, adjacent: cosine.adjacent ?? [] } } });
  }

  massiveGrid(cal) {
    const dims = (cal.massive?.dims ?? []).slice(0, MASSIVE_ROWS);
    if (!dims.length) return note("No massive dims recorded.");
    const table = gridTable({ id: "an-massive-grid", rowLabels: dims.map((d) =>
      `${d.criterion ? "★ " : ""}dim ${d.dim}`), colLabels: cal.layers.map((l) => `L${l}`),
    values: dims.map((d) => d.value_by_layer), scale: "diverging", format: (v) => fmt(v, 1),
    corner: "dim \\ layer", cellTitle: (r, c, v) => `dim ${dims[r].dim} · layer ${cal.layers[c]} · ` +
      `mean ${fmt(v)} · ratio ${fmt(dims[r].ratio_by_layer?.[c], 1)}` });
    return h("figure", { class: "wide" }, h("figcaption", { text: "value of the layer mean on " +
      "each dim (★: the top-5 criterion)" }), table);
  }

  massiveTable(massive) {
    return dataTable({ id: "an-massive-table", rows: massive.dims ?? [], empty: "No dims.",
      rowClass: (d) => (d.criterion ? "criterion" : null),
      columns: [{ key: "dim", label: "dim" }, { key: "top5_count", label: "layers in top 5" },
        { key: "top5_layers", label: "top-5 layers", format: (v) => (v ?? []).join(", ") },
        { key: "criterion", label: "top5 cleaning", format: (v) => (v ? "removed" : "kept") }] });
  }

  // ------------------------------------------------------------ model diff

  pairs() {
    const out = [];
    for (const d of this.overview.diffs ?? []) {
      for (const set of [...new Set([...(d.compare ?? []), ...(d.logprobs ?? [])])].sort()) {
        out.push({ a: d.variant_a, b: d.variant_b, set, compare: (d.compare ?? []).includes(set),
          logprobs: (d.logprobs ?? []).includes(set), key: pairKey(d, set) });
      }
    }
    return out;
  }

  async diffPart(gen) {
    const pairs = this.pairs();
    if (!pairs.length) {
      this.diffBox.replaceChildren(panel("an-diff-missing", "Model diff",
        hintsPanel("No model diff yet; make one with:", hintsAbout(this.overview.hints, " diff "))));
      return;
    }
    if (!pairs.some((p) => p.key === this.pair)) this.pair = pairs[0].key;
    this.diffBody = h("div", {});
    this.diffBox.replaceChildren(h("div", { class: "view-controls" },
      selectBox("an-pair", "model diff", pairs.map((p) => [p.key, `${p.b} vs ${p.a} · ${p.set}`]),
        this.pair, (value) => {
          this.pair = value;
          this.ready.run(() => this.loadDiff(this.gen, this.pairs().find((p) => p.key === value)));
        })), this.diffBody);
    await this.loadDiff(gen, pairs.find((p) => p.key === this.pair));
  }

  async loadDiff(gen, pair) {
    const params = { exp: state.exp, a: pair.a, b: pair.b, set: pair.set };
    const [diff, logprobs] = await Promise.allSettled([
      pair.compare ? getJSON("model_diff", params) : Promise.reject(null),
      pair.logprobs ? getJSON("logprob_diff", params) : Promise.reject(null)]);
    if (gen !== this.gen) return;
    this.clearCharts("diff");
    const hint = (word) => hintsPanel("Not made yet; make it with:", hintsAbout(this.overview.hints, word));
    const compareBox = h("div", { id: "an-compare" });
    const logprobBox = h("div", { id: "an-logprobs" });
    this.diffBody.replaceChildren(
      panel("an-compare-panel", `Trait shift ${pair.b} (B) vs ${pair.a} (A) on ${pair.set}`, compareBox),
      panel("an-logprobs-panel", `Behavioural diff: log p(B) − log p(A) per response position`,
        logprobBox));
    if (diff.status === "fulfilled") this.drawCompare(compareBox, diff.value);
    else compareBox.replaceChildren(diff.reason ? missingOrError("model diff", diff.reason)
      : hint("diff compare"));
    if (logprobs.status === "fulfilled") this.drawLogprobs(logprobBox, logprobs.value);
    else logprobBox.replaceChildren(logprobs.reason ? missingOrError("log-prob diff", logprobs.reason)
      : hint("diff logprobs"));
  }

  drawCompare(box, diff) {
    const traits = diff.traits ?? [];
    const x = unionLayers(traits.map((t) => t.layers ?? []));
    const effectBox = h("div", { id: "an-effect", class: "chart" });
    const cosineBox = h("div", { id: "an-diff-cosine", class: "chart" });
    box.replaceChildren(
      dataTable({ id: "an-diff-table", rows: traits, empty: "No traits in this diff.", columns: [
        { key: "trait", label: "trait" }, { key: "method", label: "vector" , format: (v, t) =>
          `${v} · ${t.position} · ${t.component}`, title: (t) => t.selection ?? "" },
        { key: "peak_layer", label: "peak layer" }, { key: "peak_effect_size", label: "peak d" },
        { key: "peak_paired_effect_size", label: "paired d" },
        { key: "spread_a", label: `spread ${diff.variant_a} (A)` },
        { key: "spread_b", label: `spread ${diff.variant_b} (B)` }] }),
      h("h3", { text: "effect size (Cohen's d of B vs A) by layer" }), effectBox,
      h("h3", { text: "cosine of the diff vector (mean B − A) with the trait vector" }), cosineBox);
    const series = (field) => traits.map((t, i) => ({ label: t.trait, colour: COLOURS[i % COLOURS.length],
      values: byLayer(t.layers ?? [], x, t[field]) }));
    for (const [el, field, yLabel] of [[effectBox, "effect_size", "d"], [cosineBox, "cosine", "cosine"]]) {
      const chart = this.chart(el, { height: 200, xLabel: "layer", yLabel });
      chart.group = "diff";
      chart.draw({ x, series: series(field) });
    }
    this.publish({ diff: { a: diff.variant_a, b: diff.variant_b, set: diff.prompt_set, x,
      traits: traits.map((t) => ({ trait: t.trait, peak_layer: t.peak_layer,
        peak_effect_size: t.peak_effect_size, spread_a: t.spread_a, spread_b: t.spread_b,
        layers: t.layers, effect_size: t.effect_size, cosine: t.cosine })) } });
  }

  drawLogprobs(box, lp) {
    const chartBox = h("div", { id: "an-logprob-chart", class: "chart" });
    const overall = lp.overall ?? {};
    box.replaceChildren(
      h("p", { class: "note", id: "an-logprob-overall", text: `over ${overall.n_tokens ?? "?"} ` +
        `tokens of ${lp.n_prompts} prompts: mean Δ log p ${fmt(overall.mean_delta, 4)}, ` +
        `mean KL ${fmt(overall.mean_kl, 4)}` }),
      chartBox,
      dataTable({ id: "an-logprob-prompts", rows: lp.prompts ?? [], columns: [
        { key: "prompt_id", label: "prompt" }, { key: "n_tokens", label: "tokens" },
        { key: "mean_delta", label: "mean Δ log p", format: (v) => fmt(v, 4) },
        { key: "mean_kl", label: "mean KL", format: (v) => fmt(v, 4) }] }));
    const x = Array.from({ length: lp.n_positions ?? (lp.mean_delta ?? []).length }, (_, i) => i);
    const chart = this.chart(chartBox, { height: 200, xLabel: "response position", yLabel: "nats" });
    chart.group = "diff";
    chart.draw({ x, series: [
      { label: "mean Δ log p (B − A)", values: lp.mean_delta ?? [], colour: COLOURS[0],
        notes: (lp.n_at ?? []).map((n) => `n ${n}`) },
      { label: "mean KL", values: lp.mean_kl ?? [], colour: COLOURS[1] }] });
    this.publish({ logprobs: { a: lp.variant_a, b: lp.variant_b, set: lp.prompt_set,
      mean_delta: lp.mean_delta, mean_kl: lp.mean_kl, n_at: lp.n_at, overall } });
  }

  destroy() {
    super.destroy();
    window.removeEventListener("resize", this.onResize);
    for (const chart of this.charts) chart.destroy();
  }
}

export function createAnalysisView(root) {
  return new AnalysisView(root);
}
