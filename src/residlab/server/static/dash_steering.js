// The Steering view for one trait (and the variant that answered): a min-coherence slider
// (default 77) that re-requests the summary; per steering line (method, position, component,
// vector variant, direction) the best trait score per layer among the runs at or above the
// threshold, the baseline dashed and the coefficient of each best point in the legend;
// layer x coefficient grids of Δtrait and coherence (failing cells struck, best cells
// outlined); the perturbation ratio of every run; filter chips over the facets; and a
// response browser (filter, sort, expand a row to read the answer next to the baseline
// answer, the trait definition and the judge). Every number is the API's.

import { getJSON } from "./dash_api.js";
import { chips, dataTable, DataView, experimentOverview, fmt, gridTable, missingOrError, pager, panel, selectBox, XYChart } from "./dash_charts.js";
import { COLOURS } from "./dash_lines.js";
import { h, hintsPanel, note, setViewReady, state } from "./dash_state.js";

const REDRAW = ["exp", "meta", "theme"];
const FACETS = ["vector_variant", "method", "position", "component", "direction"];
const DEFAULT_COHERENCE = 77;
const SLIDER_DELAY_MS = 120;
const PAGE = 50;
const SORTS = [["layer", "layer"], ["coefficient", "coefficient"], ["trait", "trait score"],
  ["coherence", "coherence"]];

const entryKey = (e) => JSON.stringify([e.trait, e.variant]);
const setting = (l) => [l.method, l.position, l.component, l.vector_variant].join(" · ");
const lineLabel = (l) => `${setting(l)} ${l.direction}`;

function markCells(table, cells, cls) {
  for (const [r, c] of cells) {
    table.querySelector(`td[data-row="${r}"][data-col="${c}"]`)?.classList.add(cls);
  }
}

class SteeringView extends DataView {
  constructor(root) {
    super(root, "steering", REDRAW);
    this.summaryGen = 0;
    this.browserGen = 0;
    this.timer = 0;
    this.pick = "";
    this.minCoherence = DEFAULT_COHERENCE;
    this.chipState = null;       // {facet: Set} (null: every value on)
    this.browse = { layer: "all", direction: "all", sort: "layer", offset: 0 };
    this.expanded = null;        // the response row (its index) read in full
    this.chart = null;
    this.onResize = () => this.chart?.resize();
    window.addEventListener("resize", this.onResize);
    this.render();
  }

  async render() {
    const gen = ++this.gen;
    await this.ready.run(async () => {
      this.debug = {};
      const overview = await experimentOverview(this, gen, () => this.publish({ lines: [] }));
      if (!overview) return;
      this.entries = overview.steering ?? [];
      if (!this.entries.length) {
        this.root.replaceChildren(hintsPanel("No steering runs yet; make them with:",
          Object.fromEntries(Object.entries(overview.hints ?? {}).filter(([, c]) =>
            String(c).includes(" steer")))));
        this.publish({ lines: [], entries: [] });
        return;
      }
      if (!this.entries.some((e) => entryKey(e) === this.pick)) this.pick = entryKey(this.entries[0]);
      this.build();
      await Promise.all([this.loadSummary(), this.loadResponses()]);
    });
  }

  entry() {
    return this.entries.find((e) => entryKey(e) === this.pick);
  }

  build() {
    const slider = h("input", { id: "steer-coherence", type: "range", min: "0", max: "100",
      step: "1", value: String(this.minCoherence), "aria-label": "minimum coherence",
      oninput: (e) => this.slide(Number(e.target.value)) });
    this.sliderValue = h("output", { id: "steer-coherence-value", text: String(this.minCoherence) });
    this.chipsBox = h("div", { id: "steer-chips", class: "chip-rows" });
    this.definitionBox = h("p", { id: "steer-definition", class: "definition" });
    this.chartBox = h("div", { id: "steer-chart", class: "chart" });
    this.chartNote = h("div", { id: "steer-chart-note" });
    this.gridsBox = h("div", { id: "steer-grids" });
    this.runsBox = h("div", { id: "steer-runs", class: "scroll-box" });
    this.browserBox = h("div", { id: "steer-browser" });
    this.root.replaceChildren(
      h("div", { class: "view-controls" },
        selectBox("steer-trait", "trait", this.entries.map((e) => [entryKey(e),
          `${e.trait} (answered by ${e.variant}, ${e.n_rows} rows)`]), this.pick, (value) => {
          this.pick = value;
          this.chipState = null;
          this.browse.offset = 0;
          this.expanded = null;
          this.ready.run(() => Promise.all([this.loadSummary(), this.loadResponses()]));
        }),
        h("label", { class: "slider" }, "min coherence ", slider, " ", this.sliderValue)),
      this.chipsBox, this.definitionBox,
      panel("steer-chart-panel", "Best trait score per layer (runs at or above the coherence " +
        "threshold; baseline dashed)", this.chartNote, this.chartBox),
      panel("steer-grids-panel", "Δtrait and coherence by layer × coefficient", this.gridsBox),
      panel("steer-runs-panel", "Perturbation ratio per run (|coef| × ‖v‖ / ‖h‖)", this.runsBox),
      panel("steer-browser-panel", "Responses", this.browserBox));
    this.chart?.destroy();
    this.chart = new XYChart(this.chartBox, { height: 280, xLabel: "layer", yLabel: "trait score" });
  }

  slide(value) {
    this.minCoherence = value;
    this.sliderValue.textContent = String(value);
    setViewReady(null);
    clearTimeout(this.timer);
    this.timer = setTimeout(() => this.ready.run(() => this.loadSummary()), SLIDER_DELAY_MS);
  }

  async loadSummary() {
    const gen = ++this.summaryGen;
    const entry = this.entry();
    let data;
    try {
      data = await getJSON("steering", { exp: state.exp, trait: entry.trait,
        variant: entry.variant, min_coherence: this.minCoherence });
    } catch (error) {
      if (gen !== this.summaryGen) return;
      this.chartNote.replaceChildren(missingOrError("steering results", error));
      this.chart.destroy();
      this.publish({ lines: [], error: error.message });
      return;
    }
    if (gen !== this.summaryGen) return;
    this.data = data;
    this.chartNote.replaceChildren();
    this.definitionBox.textContent = data.definition ? `Definition: ${data.definition}` : "";
    if (!this.chipState) {
      this.chipState = Object.fromEntries(FACETS.map((f) => [f, new Set(data.facets?.[f] ?? [])]));
    }
    this.drawAll();
  }

  visible(item) {
    return FACETS.every((facet) => !(facet in item) || !this.chipState[facet]
      || this.chipState[facet].has(item[facet]) || !(this.data.facets?.[facet] ?? []).includes(item[facet]));
  }

  drawAll() {
    this.drawChips();
    const lines = (this.data.lines ?? []).filter((line) => this.visible(line));
    this.drawChart(lines);
    this.drawGrids(lines);
    this.drawRuns(lines);
  }

  drawChips() {
    this.chipsBox.replaceChildren(...FACETS.filter((f) => (this.data.facets?.[f] ?? []).length)
      .map((facet) => chips({ id: `steer-chips-${facet}`, label: facet.replace("_", " "),
        options: this.data.facets[facet], selected: this.chipState[facet], onChange: (next) => {
          this.chipState[facet] = next;
          this.drawAll();
        } })));
  }

  drawChart(lines) {
    const x = [...(this.data.facets?.layers ?? [])].filter((l) => l !== null);
    const colour = (line) => COLOURS[(this.data.lines.indexOf(line)) % COLOURS.length];
    const series = lines.map((line) => {
      const at = new Map((line.points ?? []).map((p) => [p.layer, p]));
      return { label: lineLabel(line), colour: colour(line),
        values: x.map((layer) => at.get(layer)?.trait ?? null),
        notes: x.map((layer) => (at.has(layer) ? `coef ${fmt(at.get(layer).coefficient)}, ` +
          `coherence ${fmt(at.get(layer).coherence, 1)}` : "")) };
    });
    const baselines = new Map();
    for (const line of lines) {
      if (line.baseline && !baselines.has(setting(line))) {
        baselines.set(setting(line), { label: `baseline ${setting(line)}`, colour: colour(line),
          dash: [6, 4], values: x.map(() => line.baseline.trait),
          notes: x.map(() => `coherence ${fmt(line.baseline.coherence, 1)}, n ${line.baseline.n}`) });
      }
    }
    if (!x.length || !lines.length) {
      this.chart.destroy();
      this.chartNote.replaceChildren(note(lines.length ? "No steered layers." :
        "No line matches the filter chips."));
    } else {
      this.chart.draw({ x, series: [...series, ...baselines.values()] });
    }
    this.publish({ trait: this.data.trait, variant: this.data.variant,
      minCoherence: this.data.min_coherence, x, facets: this.data.facets,
      chips: Object.fromEntries(FACETS.map((f) => [f, [...(this.chipState[f] ?? [])]])),
      visible: lines.map((l) => l.key),
      lines: (this.data.lines ?? []).map((line) => ({ key: line.key, label: lineLabel(line),
        direction: line.direction, method: line.method, baseline: line.baseline?.trait ?? null,
        layers: (line.points ?? []).map((p) => p.layer),
        trait: (line.points ?? []).map((p) => p.trait),
        coefficient: (line.points ?? []).map((p) => p.coefficient),
        coherence: (line.points ?? []).map((p) => p.coherence) })),
      series: series.map((s) => ({ label: s.label, values: s.values })),
      baselines: [...baselines.values()].map((b) => ({ label: b.label, value: b.values[0] })) });
  }

  drawGrids(lines) {
    const keys = new Set(lines.map((l) => l.key));
    const grids = (this.data.grids ?? []).filter((g) => keys.has(g.key_plus) || keys.has(g.key_minus));
    const runs = new Map((this.data.runs ?? []).map((r) => [JSON.stringify([r.key, r.layer,
      r.coefficient]), r]));
    const lineByKey = new Map((this.data.lines ?? []).map((l) => [l.key, l]));
    this.gridsBox.replaceChildren(...(grids.length ? grids.map((grid, i) => {
      const keyAt = (c) => (grid.coefficients[c] < 0 ? grid.key_minus : grid.key_plus);
      const failing = [];
      const best = [];
      grid.layers.forEach((layer, r) => grid.coefficients.forEach((coef, c) => {
        const run = runs.get(JSON.stringify([keyAt(c), layer, coef]));
        if (run && !run.passes) failing.push([r, c]);
        const point = lineByKey.get(keyAt(c))?.points?.find((p) => p.layer === layer);
        if (point && point.coefficient === coef) best.push([r, c]);
      }));
      const common = { rowLabels: grid.layers.map((l) => `L${l}`), colLabels: grid.coefficients,
        corner: "layer \\ coef" };
      const delta = gridTable({ ...common, id: `steer-delta-${i}`, values: grid.delta,
        scale: "diverging", format: (v) => fmt(v, 1) });
      const coherence = gridTable({ ...common, id: `steer-coh-${i}`, values: grid.coherence,
        format: (v) => fmt(v, 1) });
      for (const table of [delta, coherence]) {
        markCells(table, failing, "fails");
        markCells(table, best, "best");
      }
      return h("div", { class: "grid-pair" }, h("h3", { text: setting(grid) }),
        h("div", { class: "grid-row" },
          h("figure", {}, h("figcaption", { text: "Δtrait vs baseline" }), delta),
          h("figure", {}, h("figcaption", { text: "coherence (struck: below the threshold)" }),
            coherence)));
    }) : [note("No grid matches the filter chips.")]));
    this.publish({ grids: grids.map((g) => ({ key_plus: g.key_plus, key_minus: g.key_minus,
      layers: g.layers, coefficients: g.coefficients, delta: g.delta, coherence: g.coherence })) });
  }

  drawRuns(lines) {
    const byKey = new Map(lines.map((l) => [l.key, l]));
    const runs = (this.data.runs ?? []).filter((r) => byKey.has(r.key));
    const columns = [
      { key: "key", label: "line", format: (k) => lineLabel(byKey.get(k)) },
      { key: "layer", label: "layer" }, { key: "coefficient", label: "coef" },
      { key: "trait", label: "trait" }, { key: "delta", label: "Δtrait" },
      { key: "coherence", label: "coherence" },
      { key: "passes", label: "≥ threshold", format: (v) => (v ? "yes" : "no") },
      { key: "n", label: "n" }, { key: "h_norm", label: "‖h‖" },
      { key: "ratio", label: "ratio", format: (v) => fmt(v, 4) }];
    this.runsBox.replaceChildren(
      ...(this.data.ratio_hint ? [h("p", { class: "note", id: "steer-ratio-hint",
        text: `‖h‖ unknown: ${this.data.ratio_hint}` })] : []),
      dataTable({ id: "steer-runs-table", columns, rows: runs,
        rowClass: (r) => (r.passes ? null : "fails"), empty: "No run matches the filter chips." }));
    this.publish({ runs: runs.map((r) => ({ key: r.key, layer: r.layer, coefficient: r.coefficient,
      passes: r.passes, h_norm: r.h_norm, ratio: r.ratio })), ratioHint: this.data.ratio_hint ?? null });
  }

  // ------------------------------------------------------------ response browser

  async loadResponses() {
    const gen = ++this.browserGen;
    const entry = this.entry();
    const params = { exp: state.exp, trait: entry.trait, variant: entry.variant,
      layer: this.browse.layer, direction: this.browse.direction, sort: this.browse.sort,
      offset: this.browse.offset, limit: PAGE };
    let page;
    try {
      page = await getJSON("steering_responses", params);
    } catch (error) {
      if (gen === this.browserGen) {
        this.browserBox.replaceChildren(this.browserControls(null), missingOrError("responses", error));
      }
      return;
    }
    if (gen !== this.browserGen) return;
    this.page = page;
    this.drawResponses();
  }

  browserControls(page) {
    const set = (key) => (value) => {
      this.browse[key] = value;
      this.browse.offset = 0;
      this.expanded = null;
      this.ready.run(() => this.loadResponses());
    };
    const layers = (this.data?.facets?.layers ?? []).filter((l) => l !== null);
    return h("div", { class: "view-controls" },
      selectBox("steer-resp-layer", "layer", [["all", "all"], ...layers.map((l) => [String(l),
        String(l)])], this.browse.layer, set("layer")),
      selectBox("steer-resp-direction", "direction", [["all", "all"], ["+", "+ (raise)"],
        ["-", "− (lower)"]], this.browse.direction, set("direction")),
      selectBox("steer-resp-sort", "sort by", SORTS, this.browse.sort, set("sort")),
      page ? pager("steer-resp-pager", page, (offset) => {
        this.browse.offset = offset;
        this.expanded = null;
        this.ready.run(() => this.loadResponses());
      }) : null);
  }

  drawResponses() {
    const page = this.page;
    const body = h("tbody", {});
    for (const item of page.items ?? []) {
      const row = h("tr", { class: this.expanded === item.index ? "resp-row open" : "resp-row",
        data: { index: String(item.index) }, tabindex: "0", "aria-expanded": String(this.expanded === item.index),
        onclick: () => this.toggle(item.index),
        onkeydown: (e) => { if (e.key === "Enter") this.toggle(item.index); } },
      h("td", { text: String(item.layer ?? "--") }), h("td", { text: fmt(item.coefficient) }),
      h("td", { text: fmt(item.trait_score, 1) }), h("td", { text: fmt(item.coherence_score, 1) }),
      h("td", { class: "clip", text: item.question ?? "" }), h("td", { class: "clip", text: item.answer ?? "" }));
      body.append(row);
      if (this.expanded === item.index) body.append(this.detailRow(item, page));
    }
    this.browserBox.replaceChildren(this.browserControls(page),
      h("table", { class: "data-table responses", id: "steer-responses" },
        h("thead", {}, h("tr", {}, ["layer", "coef", "trait", "coherence", "question", "answer"]
          .map((text) => h("th", { text })))), body));
    this.publish({ responses: { total: page.total, offset: page.offset, sort: page.sort,
      layer: page.layer, direction: page.direction, expanded: this.expanded,
      items: (page.items ?? []).map((i) => ({ index: i.index, layer: i.layer,
        coefficient: i.coefficient, trait_score: i.trait_score, coherence_score: i.coherence_score,
        question: i.question, answer: i.answer, baseline_answer: i.baseline_answer, judge: i.judge })) } });
  }

  detailRow(item, page) {
    const side = (title, text, score) => h("div", { class: "answer-side" },
      h("h4", { text: `${title} · trait ${fmt(score, 1)}` }),
      h("p", { class: "answer-text", text: text ?? "(no baseline answer)" }));
    return h("tr", { class: "resp-detail" }, h("td", { colSpan: 6 },
      h("p", { class: "resp-question", text: `Q: ${item.question ?? ""}` }),
      h("div", { class: "answers" },
        side(`steered (layer ${item.layer}, coef ${fmt(item.coefficient)}, ${item.method} · ` +
          `${item.position} · ${item.component})`, item.answer, item.trait_score),
        side("baseline (no steering)", item.baseline_answer, item.baseline_trait_score)),
      h("p", { class: "resp-definition", text: `Trait definition: ${page.definition ?? "(none)"}` }),
      h("p", { class: "resp-judge", text: `Judge: ${item.judge ?? "?"} · coherence ` +
        `${fmt(item.coherence_score, 1)}` })));
  }

  toggle(index) {
    this.expanded = this.expanded === index ? null : index;
    this.drawResponses();
  }

  destroy() {
    super.destroy();
    this.summaryGen += 1;
    this.browserGen += 1;
    clearTimeout(this.timer);
    window.removeEventListener("resize", this.onResize);
    this.chart?.destroy();
  }
}

export function createSteeringView(root) {
  return new SteeringView(root);
}
