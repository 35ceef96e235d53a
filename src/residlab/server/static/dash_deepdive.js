// The Layer Deep Dive for the current token: head-averaged attention of that token over its
// context at every stored layer (a layer x position heatmap; the attention sink at position 0
// can be hidden), attention by head at one chosen layer, and the logit lens (the top 5 next
// tokens read at each layer, with the actual next token's rank and probability). Hovering a
// layer row of the attention heatmap switches the lens to that layer. Data comes from the
// lens/attention files, or is computed by the server; a missing one shows the server's message
// (the command that makes it) in that panel only.

import { floats, getJSON } from "./dash_api.js";
import { Heatmap } from "./dash_heatmap.js";
import { errorPanel, h, note, setDebug, setViewReady, state, subscribe, update } from "./dash_state.js";

const REDRAW = ["exp", "variant", "set", "id", "head", "sink", "meta", "theme"];
const TOKEN_DELAY_MS = 60; // slider drags: fetch once the token settles

function quoted(text) {
  return JSON.stringify(String(text ?? ""));
}

function percent(p) {
  if (!Number.isFinite(p)) return "--";
  return p >= 1e-3 || p === 0 ? `${(100 * p).toFixed(1)}%` : p.toExponential(1);
}

/** Rows ``from..cols-1`` of a row-major (rows x cols) matrix, as a new Float32Array. */
function dropColumns(matrix, rows, cols, from) {
  const kept = cols - from;
  const out = new Float32Array(rows * kept);
  for (let r = 0; r < rows; r++) out.set(matrix.subarray(r * cols + from, (r + 1) * cols), r * kept);
  return out;
}

function toRows(matrix, rows, cols) {
  return Array.from({ length: rows }, (_, r) => Array.from(matrix.subarray(r * cols, (r + 1) * cols)));
}

class DeepDiveView {
  constructor(root) {
    this.root = root;
    this.gen = 0;
    this.timer = 0;
    this.lens = null;
    this.lensLayer = null;
    this.tokens = [];
    this.build();
    this.unsubscribe = subscribe((changed) => this.changed(changed));
    this.onResize = () => { this.attnMap.resize(); this.headMap.resize(); };
    window.addEventListener("resize", this.onResize);
    this.render();
  }

  build() {
    const section = (id, title) => h("section", { class: "panel", id: `${id}-panel` },
      h("h2", { id: `${id}-title`, text: title }), h("div", { id: `${id}-error` }),
      h("div", { id, class: "chart" }));
    this.controls = h("div", { class: "view-controls" });
    this.message = h("div", { class: "view-message" });
    this.panels = h("div", { class: "panels deepdive" },
      section("dd-attn", "Attention by layer"), section("dd-heads", "Attention by head"),
      section("dd-lens", "Logit lens"));
    this.root.replaceChildren(this.controls, this.message, this.panels);
    const $ = (id) => this.panels.querySelector(`#${id}`);
    this.attnBox = $("dd-attn");
    this.headBox = $("dd-heads");
    this.lensBox = $("dd-lens");
    const describe = (labels) => (row, col, value) => `${labels()[row] ?? ""} · query ` +
      `${state.token} → position ${col} ${quoted(this.tokens[col])} · weight ` +
      `${Number.isFinite(value) ? value.toFixed(4) : "--"}`;
    this.attnMap = new Heatmap(this.attnBox, { describe: describe(() => this.attnLabels ?? []),
      onHoverRow: (row) => this.setLensLayer(this.attention?.layers?.[row]) });
    this.headMap = new Heatmap(this.headBox, { describe: describe(() => this.headLabels ?? []) });
  }

  renderControls(attention) {
    const sink = h("input", { id: "dd-sink", type: "checkbox", checked: state.sink,
      onchange: (e) => update({ sink: e.target.checked }) });
    const layers = attention?.layers ?? [];
    const select = h("select", { id: "dd-head-layer", disabled: !layers.length,
      onchange: (e) => update({ head: e.target.value }) },
    layers.map((layer) => h("option", { value: String(layer), text: `layer ${layer}` })));
    if (attention) select.value = String(attention.layer);
    this.controls.replaceChildren(h("label", {}, sink, " hide attention sink (position 0)"),
      h("label", {}, "heads at ", select),
      h("span", { id: "dd-lens-layer", class: "note",
        text: this.lensLayer === null ? "" : `lens at layer ${this.lensLayer} (hover a layer row)` }));
  }

  changed(changed) {
    if (REDRAW.some((key) => changed.has(key))) {
      clearTimeout(this.timer);
      this.render();
    } else if (changed.has("token")) {
      setViewReady(null);
      clearTimeout(this.timer);
      this.timer = setTimeout(() => this.render(), TOKEN_DELAY_MS);
    }
  }

  showMessage(node) {
    this.message.replaceChildren(...(node ? [node] : []));
    this.panels.hidden = !!node;
  }

  async render() {
    const gen = ++this.gen;
    setViewReady(null);
    const s = { ...state };
    if (!s.meta || !s.set || !s.id || s.token < 0) {
      this.renderControls(null);
      this.showMessage(note("Choose a prompt and a token below."));
      setDebug("deepdive", { token: null });
      setViewReady("deepdive");
      return;
    }
    const base = { exp: s.exp, variant: s.variant, set: s.set, id: s.id };
    let response;
    try {
      response = await getJSON("response", base);
    } catch (error) {
      if (gen !== this.gen) return;
      this.showMessage(errorPanel(`prompt ${s.id} (${s.variant})`, error));
      setViewReady("deepdive");
      return;
    }
    const attentionParams = { ...base, token: s.token };
    if (s.head !== "") attentionParams.layer = s.head;
    const lastToken = (response.tokens?.length ?? 0) - 1;
    const [attention, lens] = await Promise.allSettled([getJSON("attention", attentionParams),
      s.token < lastToken ? getJSON("lens", { ...base, token: s.token }) : null]);
    if (gen !== this.gen) return;
    this.tokens = response.tokens ?? [];
    this.showMessage(null);
    this.draw(s, attention, lens, lastToken);
    setViewReady("deepdive");
  }

  draw(s, attention, lens, lastToken) {
    const title = `token ${s.token} ${quoted(this.tokens[s.token])}`;
    this.attention = attention.status === "fulfilled" ? attention.value : null;
    this.lens = lens.status === "fulfilled" ? lens.value : null;
    const debug = { token: s.token, sink: s.sink };
    if (this.attention) Object.assign(debug, this.drawAttention(s, this.attention, title));
    else this.attentionMessage(errorPanel("the attention of this token", attention.reason));
    this.renderControls(this.attention);
    if (lens.status === "rejected") {
      this.lensBox.replaceChildren(errorPanel(`the logit lens of ${title}`, lens.reason));
    } else if (!this.lens) {
      this.lensBox.replaceChildren(note(`${title} is the last token: there is no next token ` +
        `to read (the lens covers tokens 0 … ${lastToken - 1}).`));
    } else {
      this.drawLens(title);
    }
    debug.lens = this.lensDebug();
    setDebug("deepdive", debug);
  }

  /** Show ``node`` (an error) instead of the heatmaps, or the heatmaps (``node`` null). */
  attentionMessage(node) {
    this.panels.querySelector("#dd-attn-error").replaceChildren(...(node ? [node] : []));
    this.panels.querySelector("#dd-heads-error").replaceChildren(
      ...(node ? [note("No attention to show.")] : []));
    this.attnBox.hidden = !!node;
    this.headBox.hidden = !!node;
  }

  /** Both heatmaps; returns what they show, for the debug hook. */
  drawAttention(s, attention, title) {
    this.attentionMessage(null);
    const from = s.sink && attention.context > 1 ? 1 : 0;
    const cols = attention.context - from;
    const nLayers = attention.layers.length;
    const mean = dropColumns(floats(attention.mean_b64), nLayers, attention.context, from);
    const heads = dropColumns(floats(attention.heads_b64), attention.n_heads, attention.context, from);
    this.attnLabels = attention.layers.map((layer) => `L${layer}`);
    this.headLabels = Array.from({ length: attention.n_heads }, (_, i) => `head ${i}`);
    this.attnMap.draw({ values: mean, rows: nLayers, cols, rowLabels: this.attnLabels,
      colOffset: from, scale: "sequential" });
    this.headMap.draw({ values: heads, rows: attention.n_heads, cols, rowLabels: this.headLabels,
      colOffset: from, scale: "sequential" });
    this.panels.querySelector("#dd-attn-title").textContent =
      `Attention by layer (head average) of ${title} · ${attention.source ?? ""}`;
    this.panels.querySelector("#dd-heads-title").textContent =
      `Attention by head at layer ${attention.layer} of ${title}`;
    return { layers: attention.layers.slice(), context: attention.context, colOffset: from,
      mean: toRows(mean, nLayers, cols), headLayer: attention.layer,
      heads: toRows(heads, attention.n_heads, cols) };
  }

  drawLens(title) {
    const lens = this.lens;
    const layers = lens.by_layer.map((entry) => String(entry.layer));
    if (!layers.includes(String(this.lensLayer))) this.lensLayer = lens.by_layer.at(-1)?.layer ?? null;
    const table = h("table", { class: "lens-table" },
      h("thead", {}, h("tr", {}, ["layer", "top 1", "p", "actual rank", "actual p"].map(
        (text) => h("th", { text })))),
      h("tbody", {}, lens.by_layer.map((entry) => this.lensRow(entry))));
    this.lensBox.replaceChildren(
      h("p", { class: "lens-head", text: `${title} → actual next token ` +
        `${quoted(lens.actual_next_token)} · ${lens.source ?? ""}` }),
      h("div", { class: "lens-bars", id: "dd-lens-bars" }), table);
    this.showLensLayer();
  }

  lensRow(entry) {
    const top = entry.top_k?.[0];
    return h("tr", { class: "lens-row", data: { layer: String(entry.layer) },
      onmouseenter: () => this.setLensLayer(entry.layer), onclick: () => this.setLensLayer(entry.layer) },
    h("td", { text: String(entry.layer) }), h("td", { text: top ? quoted(top.token) : "--" }),
    h("td", { text: percent(top?.prob) }), h("td", { text: String(entry.actual_rank ?? "--") }),
    h("td", { text: percent(entry.actual_prob) }));
  }

  setLensLayer(layer) {
    if (layer === undefined || layer === null || !this.lens) return;
    if (!this.lens.by_layer.some((entry) => String(entry.layer) === String(layer))) return;
    this.lensLayer = this.lens.by_layer.find((e) => String(e.layer) === String(layer)).layer;
    this.showLensLayer();
  }

  /** The bars of the current lens layer and its row marked in the table. */
  showLensLayer() {
    const entry = this.lens.by_layer.find((e) => String(e.layer) === String(this.lensLayer));
    const bars = this.lensBox.querySelector("#dd-lens-bars");
    if (!entry || !bars) return;
    bars.replaceChildren(h("div", { class: "lens-title", text: `layer ${entry.layer}: actual ` +
      `token rank ${entry.actual_rank ?? "--"}, p ${percent(entry.actual_prob)}` }),
    ...(entry.top_k ?? []).map((item) => {
      const fill = h("span", { class: "bar-fill" });
      fill.style.width = `${Math.max(0, Math.min(100, 100 * (item.prob ?? 0)))}%`;
      const actual = item.token === this.lens.actual_next_token;
      return h("div", { class: actual ? "bar actual" : "bar" },
        h("span", { class: "bar-label", text: quoted(item.token) }),
        h("span", { class: "bar-track" }, fill), h("span", { class: "bar-value", text: percent(item.prob) }));
    }));
    for (const row of this.lensBox.querySelectorAll(".lens-row")) {
      row.classList.toggle("active", row.dataset.layer === String(entry.layer));
    }
    const label = this.controls.querySelector("#dd-lens-layer");
    if (label) label.textContent = `lens at layer ${entry.layer} (hover a layer row)`;
    const debug = window.__residlab_debug?.deepdive;
    if (debug?.lens) debug.lens.layer = entry.layer;
  }

  lensDebug() {
    if (!this.lens) return null;
    return { token: this.lens.token, actual_next_token: this.lens.actual_next_token,
      layer: this.lensLayer, source: this.lens.source,
      by_layer: this.lens.by_layer.map((entry) => ({ layer: entry.layer,
        top: (entry.top_k ?? []).map((item) => [item.token, item.prob]),
        actual_rank: entry.actual_rank, actual_prob: entry.actual_prob })) };
  }

  destroy() {
    this.gen += 1;
    clearTimeout(this.timer);
    this.unsubscribe();
    window.removeEventListener("resize", this.onResize);
  }
}

export function createDeepDiveView(root) {
  return new DeepDiveView(root);
}
