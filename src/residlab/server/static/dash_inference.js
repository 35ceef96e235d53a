// The Inference view: one line per selected trait over every prompt and response token of
// one prompt, in cosine (projection / token norm), normalised (projection / mean response
// norm) or raw units; smoothing, centring on the first token and massive-dims cleaning; a
// layers mode (one line per layer of one trait) and a diff mode against another variant
// (B = the current variant, A = the other; delta B - A, trimmed to the shorter length) with
// its Top Spans; a trait x token heatmap, the activation norm and the velocity per token.
// All requests of one draw go out together; each chart is one uPlot fed whole arrays.

import { getJSON } from "./dash_api.js";
import { Heatmap } from "./dash_heatmap.js";
import { COLOURS, LineChart, computeSeries, firstDifference, normSeries } from "./dash_lines.js";
import { SPAN_WINDOWS, errorPanel, h, hintsPanel, note, setDebug, setViewReady, state, subscribe, update } from "./dash_state.js";

const REDRAW = ["exp", "variant", "set", "id", "traits", "mode", "smooth", "centre", "clean",
  "layers", "diff", "meta", "theme"];
const SPAN_KEYS = ["spans", "window", "scope"];
const Y_LABEL = { cosine: "cosine", normalised: "proj / mean norm", raw: "projection" };
const TOP_SPANS = 20;
const CLAUSE_WINDOW = 8; // sent (unused) with clause spans: one request key per view state

/** ``{trait: {layers, default_layer}}`` projected for this variant and set. */
export function projectedTraits(meta, variant, set) {
  return meta?.projections?.[variant]?.[set] ?? {};
}

/** The lines to draw: [{trait, layer, label, colour}] (layers mode: one per layer). */
function linePlan(s) {
  const known = projectedTraits(s.meta, s.variant, s.set);
  if (s.layers && known[s.layers]?.layers?.length > 1) {
    const info = known[s.layers];
    return info.layers.map((layer, i) => ({ trait: s.layers, layer, label: `${s.layers} L${layer}`,
      colour: COLOURS[i % COLOURS.length] }));
  }
  return (s.traits ?? []).filter((t) => known[t]).map((trait) => ({
    trait, layer: known[trait].default_layer, label: trait,
    colour: COLOURS[s.traits.indexOf(trait) % COLOURS.length] }));
}

function labelled(promise, what) {
  return promise.catch((error) => {
    throw Object.assign(new Error(error.message), { what });
  });
}

/** ``endpoint`` with the chosen cleaning; where that file cannot be cleaned (no massive dims
 * recorded, no calibration), the uncleaned answer and why, in ``uncleaned``. */
function cleanedOrNot(endpoint, params, what, uncleaned) {
  const asked = getJSON(endpoint, params);
  if (params.clean === "none") return labelled(asked, what);
  return labelled(asked.catch((error) => {
    if (error.status !== 404 && error.status !== 400) throw error;
    uncleaned.push({ what, message: error.message });
    return getJSON(endpoint, { ...params, clean: "none" });
  }), what);
}

/** Projections (one request per trait) and norms (one per layer) of one variant, together. */
async function loadVariant(s, variant, lines, normLayers) {
  const base = { exp: s.exp, variant, set: s.set, id: s.id };
  const traits = [...new Set(lines.map((line) => line.trait))];
  const uncleaned = [];
  const [projections, norms] = await Promise.all([
    Promise.all(traits.map((trait) => cleanedOrNot("projections", { ...base, trait,
      clean: s.clean }, `the projections of ${trait} (${variant})`, uncleaned))),
    Promise.all(normLayers.map((layer) => cleanedOrNot("norms", { ...base, layer,
      clean: s.clean }, `the activation norms at layer ${layer} (${variant})`, uncleaned))),
  ]);
  return { variant, uncleaned, proj: new Map(traits.map((t, i) => [t, projections[i]])),
    norms: new Map(normLayers.map((layer, i) => [layer, norms[i]])) };
}

function selectBox(id, label, options, value, onChange) {
  const select = h("select", { id, onchange: (e) => onChange(e.target.value) },
    options.map(([v, text]) => h("option", { value: v, text })));
  select.value = value;
  return h("label", {}, `${label} `, select);
}

/** The view; created by the app when its tab opens, destroyed when another opens. */
class InferenceView {
  constructor(root) {
    this.root = root;
    this.gen = 0;
    this.spanGen = 0;
    this.response = null;
    this.drawn = null;
    this.spanTrait = "";
    this.build();
    this.unsubscribe = subscribe((changed) => this.changed(changed));
    this.onResize = () => this.resize();
    window.addEventListener("resize", this.onResize);
    this.render();
  }

  build() {
    const panel = (id, title, extra = null) => h("section", { class: "panel", id: `${id}-panel` },
      h("h2", { text: title }), extra, h("div", { id, class: "chart" }));
    this.controls = h("div", { class: "view-controls" });
    this.message = h("div", { class: "view-message" });
    this.spansBox = h("section", { class: "panel", id: "inf-spans-panel", hidden: true });
    this.panels = h("div", { class: "panels" }, panel("inf-chart", "Trait projections per token"),
      this.spansBox, panel("inf-heatmap", "Trait × token"),
      panel("inf-norms", "Activation norm per token"), panel("inf-velocity", "Velocity (first difference)"));
    this.root.replaceChildren(this.controls, this.message, this.panels);
    const select = (i) => update({ token: i }, { history: "replace" });
    const tokenText = (i) => this.response?.tokens?.[i] ?? null;
    const $ = (id) => this.panels.querySelector(`#${id}`);
    this.chart = new LineChart($("inf-chart"), { height: 280, onSelect: select, tokenText });
    this.normChart = new LineChart($("inf-norms"), { height: 160, yLabel: "norm", onSelect: select, tokenText });
    this.velocityChart = new LineChart($("inf-velocity"), { height: 160, onSelect: select, tokenText });
    this.heatmap = new Heatmap($("inf-heatmap"), { onSelectCol: select,
      describe: (row, col, value) => this.describeCell(row, col, value) });
  }

  describeCell(row, col, value) {
    const label = this.drawn?.series[row]?.label ?? "";
    const token = this.response?.tokens?.[col];
    const shown = Number.isFinite(value) ? value.toFixed(4) : "--";
    return `${label} · token ${col} ${JSON.stringify(String(token ?? ""))} · ${shown}`;
  }

  renderControls() {
    const s = state;
    const known = projectedTraits(s.meta, s.variant, s.set);
    const multi = Object.keys(known).filter((t) => known[t]?.layers?.length > 1);
    const others = (s.meta?.variants ?? []).filter((v) => v !== s.variant
      && Object.keys(projectedTraits(s.meta, v, s.set)).length);
    const set = (key) => (value) => update({ [key]: value });
    const smooth = h("input", { id: "inf-smooth", type: "number", min: "1", max: "200",
      value: String(s.smooth), onchange: (e) => update({ smooth: Math.max(1, Math.min(200,
        Math.round(Number(e.target.value)) || 1)) }) });
    const centre = h("input", { id: "inf-centre", type: "checkbox", checked: s.centre,
      onchange: (e) => update({ centre: e.target.checked }) });
    this.controls.replaceChildren(
      selectBox("inf-mode", "show", [["cosine", "cosine"], ["normalised", "normalised"],
        ["raw", "raw projection"]], s.mode, set("mode")),
      h("label", {}, "smoothing window ", smooth),
      h("label", {}, centre, " centre on first token"),
      selectBox("inf-clean", "massive dims", [["none", "keep all"],
        ["top5", "remove top-5 at ≥3 layers"], ["all", "remove all recorded"]], s.clean, set("clean")),
      selectBox("inf-layers", "layers of", [["", "off (best layer)"],
        ...multi.map((t) => [t, t])], multi.includes(s.layers) ? s.layers : "", set("layers")),
      selectBox("inf-diff", "diff against", [["", "off"], ...others.map((v) => [v, `${v} (A)`])],
        others.includes(s.diff) ? s.diff : "", set("diff")));
  }

  changed(changed) {
    if (REDRAW.some((key) => changed.has(key))) {
      this.render();
      return;
    }
    if (changed.has("token")) this.moveMarker();
    if (changed.has("span")) this.showBand();
    if (SPAN_KEYS.some((key) => changed.has(key))) this.loadSpans();
  }

  /** Everything that must be true before drawing, else a message; null when all is well. */
  blocker(s) {
    if (!s.meta) return note("No experiment selected.");
    if (!s.set) {
      return hintsPanel(`Variant ${s.variant} has no prompt sets with responses yet; make ` +
        "them with:", s.meta.hints);
    }
    if (!s.id) return note("No prompt selected: choose an id below.");
    const known = projectedTraits(s.meta, s.variant, s.set);
    if (!Object.keys(known).length) {
      return hintsPanel(`No projections for variant ${s.variant}, prompt set ${s.set} yet; ` +
        "make them with:", s.meta.hints);
    }
    if (!linePlan(s).length) return note("Select one or more traits on the left.");
    return null;
  }

  /** ``node`` above the charts; ``hide`` (a blocker or an error) hides the charts. */
  showMessage(node, hide = false) {
    this.message.replaceChildren(...(node ? [node] : []));
    this.panels.hidden = hide;
  }

  uncleanedNote(s, { b, a }) {
    const missed = [...b.uncleaned, ...(a?.uncleaned ?? [])];
    if (!missed.length) return null;
    return h("div", { class: "hint-panel", id: "inf-uncleaned" },
      h("strong", { text: `Shown without cleaning (clean=${s.clean} is not available for):` }),
      h("ul", {}, missed.map(({ what, message }) => h("li", { text: `${what}: ${message}` }))));
  }

  async render() {
    const gen = ++this.gen;
    setViewReady(null);
    this.renderControls();
    const s = { ...state };
    const blocker = this.blocker(s);
    if (blocker) {
      this.showMessage(blocker, true);
      setDebug("inference", { x: [], series: {} });
      setViewReady("inference");
      return;
    }
    let loaded;
    try {
      loaded = await this.load(s);
    } catch (error) {
      if (gen !== this.gen) return;
      this.showMessage(errorPanel(error.what ?? "the Inference data", error), true);
      setViewReady("inference");
      return;
    }
    if (gen !== this.gen) return;
    this.showMessage(this.uncleanedNote(s, loaded));
    this.draw(s, loaded);
    this.loadSpans();
    setViewReady("inference");
  }

  async load(s) {
    const lines = linePlan(s);
    const normLayers = [...new Set(s.mode === "cosine" ? lines.map((l) => l.layer)
      : [lines[0].layer])];
    const base = { exp: s.exp, variant: s.variant, set: s.set, id: s.id };
    const [response, b, a] = await Promise.all([
      labelled(getJSON("response", base), `prompt ${s.id} (${s.variant})`),
      loadVariant(s, s.variant, lines, normLayers),
      s.diff ? loadVariant(s, s.diff, lines, normLayers) : null,
    ]);
    return { response, lines, normLayer: lines[0].layer, b, a };
  }

  draw(s, { response, lines, normLayer, b, a }) {
    this.response = response;
    const series = computeSeries(s, lines, b, a);
    const n = Math.min(...series.map((one) => one.values.length));
    for (const one of series) one.values.length = n;
    const x = Array.from({ length: n }, (_, i) => i);
    const norms = [normSeries(b, normLayer, n, COLOURS[0])];
    if (a) norms.push(normSeries(a, normLayer, n, COLOURS[1]));
    const velocity = series.map((one) => ({ ...one, values: firstDifference(one.values) }));
    const common = { x, divider: response.prompt_end ?? null, marker: this.marker(),
      band: this.band() };
    const unit = Y_LABEL[s.mode] + (s.centre ? " (centred)" : "");
    this.chart.draw({ ...common, series, yLabel: a ? `Δ ${unit} (B − A)` : unit });
    this.normChart.draw({ ...common, series: norms });
    this.velocityChart.draw({ ...common, series: velocity, yLabel: `Δ/token ${Y_LABEL[s.mode]}` });
    this.drawHeatmap(series, n);
    this.drawn = { series, x };
    const uncleaned = [...b.uncleaned, ...(a?.uncleaned ?? [])].map((u) => u.what);
    this.publish(s, { x, series, norms, velocity, response, uncleaned });
  }

  drawHeatmap(series, n) {
    const values = new Float32Array(series.length * n);
    series.forEach((one, r) => {
      for (let i = 0; i < n; i++) values[r * n + i] = one.values[i] ?? NaN;
    });
    this.heatmap.draw({ values, rows: series.length, cols: n, rowLabels: series.map((o) => o.label),
      scale: "diverging", marker: this.marker() });
  }

  publish(s, { x, series, norms, velocity, response, uncleaned }) {
    const named = (list) => Object.fromEntries(list.map((one) => [one.label, one.values.slice()]));
    setDebug("inference", {
      kind: projectedTraits(s.meta, s.variant, s.set)[s.layers]?.layers?.length > 1
        ? "layers" : "traits",
      diff: s.diff || null, mode: s.mode, smooth: s.smooth, centre: s.centre, clean: s.clean,
      promptEnd: response.prompt_end ?? null, token: this.marker(), x: x.slice(),
      series: named(series), norms: named(norms), velocity: named(velocity), uncleaned,
    });
  }

  marker() {
    return state.token >= 0 ? state.token : null;
  }

  band() {
    return state.span && state.span.id === state.id ? [state.span.start, state.span.end] : null;
  }

  moveMarker() {
    const marker = this.marker();
    for (const chart of [this.chart, this.normChart, this.velocityChart]) chart.setMarker(marker);
    this.heatmap.setMarker(marker);
    if (window.__residlab_debug?.inference) window.__residlab_debug.inference.token = marker;
  }

  showBand() {
    for (const chart of [this.chart, this.normChart, this.velocityChart]) chart.setBand(this.band());
  }

  // ------------------------------------------------------------ Top Spans (diff mode)

  spanControls(traits) {
    if (!traits.includes(this.spanTrait)) this.spanTrait = traits[0] ?? "";
    const windowSelect = selectBox("spans-window", "window", SPAN_WINDOWS.map((w) => [String(w),
      `${w} tokens`]), String(state.window), (value) => update({ window: Number(value) }));
    windowSelect.querySelector("select").disabled = state.spans !== "window";
    return h("div", { class: "view-controls" },
      selectBox("spans-trait", "trait", traits.map((t) => [t, t]), this.spanTrait, (value) => {
        this.spanTrait = value;
        this.loadSpans();
      }),
      selectBox("spans-mode", "spans", [["window", "sliding window"], ["clause", "clauses"]],
        state.spans, (value) => update({ spans: value })),
      windowSelect,
      selectBox("spans-scope", "in", [["prompt", "this prompt"], ["set", "the whole set"]],
        state.scope, (value) => update({ scope: value })));
  }

  async loadSpans() {
    const gen = ++this.spanGen;
    const s = { ...state };
    const traits = [...new Set(linePlan(s).map((line) => line.trait))];
    this.spansBox.hidden = !s.diff || !traits.length;
    if (this.spansBox.hidden) return;
    const list = h("ol", { id: "inf-spans", class: "spans" }, h("li", { class: "note", text: "loading…" }));
    this.spansBox.replaceChildren(h("h2", { text: `Top Spans: ${s.variant} (B) − ${s.diff} (A)` }),
      this.spanControls(traits), list);
    const params = { exp: s.exp, set: s.set, a: s.diff, b: s.variant, trait: this.spanTrait,
      mode: s.spans, window: s.spans === "window" ? s.window : CLAUSE_WINDOW, scope: s.scope,
      top: TOP_SPANS };
    if (s.scope === "prompt") params.id = s.id;
    try {
      const answer = await getJSON("spans", params);
      if (gen !== this.spanGen) return;
      const rows = (answer.spans ?? []).map((span) => this.spanRow(span));
      list.replaceChildren(...(rows.length ? rows : [h("li", { class: "note", text: "No spans." })]));
      list.dataset.count = String(rows.length);
    } catch (error) {
      if (gen === this.spanGen) list.replaceChildren(h("li", {}, errorPanel("the Top Spans", error)));
    }
  }

  spanRow(span) {
    const go = () => update({ id: String(span.prompt_id), token: span.start,
      span: { id: String(span.prompt_id), start: span.start, end: span.end } });
    const fixed = (v) => (Number.isFinite(v) ? v.toFixed(3) : "--");
    return h("li", {}, h("button", { type: "button", class: "span-row", onclick: go,
      data: { id: String(span.prompt_id), start: String(span.start), end: String(span.end) } },
    h("span", { class: "span-id", text: String(span.prompt_id) }),
    h("span", { class: "span-text", text: String(span.text ?? "") }),
    h("span", { class: "span-num", text: `mean Δ ${fixed(span.mean_delta)} · max Δ ` +
      `${fixed(span.max_delta)} · z ${fixed(span.z)} · ${span.n_tokens} tok` })));
  }

  resize() {
    for (const chart of [this.chart, this.normChart, this.velocityChart]) chart.resize();
    this.heatmap.resize();
  }

  destroy() {
    this.gen += 1;
    this.spanGen += 1;
    this.unsubscribe();
    window.removeEventListener("resize", this.onResize);
    for (const chart of [this.chart, this.normChart, this.velocityChart]) chart.destroy();
  }
}

export function createInferenceView(root) {
  return new InferenceView(root);
}
