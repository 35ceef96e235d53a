// The Extraction view: the best vector of every trait (method, layer, held-out accuracy,
// Cohen's d, baseline and how it was chosen), then for one trait the method x layer grids of
// held-out accuracy and effect size with the best cell outlined, the vector logit lens (the
// tokens each vector pushes toward and away from) and the contrastive pairs with their
// generated continuations side by side. Every number is the API's; strings are set as text.

import { getJSON, isStatic } from "./dash_api.js";
import { dataTable, DataView, fmt, gridTable, missingOrError, pager, panel, selectBox } from "./dash_charts.js";
import { h, hintsPanel, note, state } from "./dash_state.js";

const REDRAW = ["exp", "meta", "theme"];
const PAGE = 50;

const quoted = (text) => JSON.stringify(String(text ?? ""));
const entryKey = (entry) => JSON.stringify([entry.trait, entry.variant]);

const BEST_COLUMNS = [
  { key: "trait", label: "trait" }, { key: "variant", label: "variant" },
  { key: "component", label: "component" }, { key: "method", label: "method" },
  { key: "position", label: "position" }, { key: "layer", label: "layer" },
  { key: "accuracy", label: "held-out acc", help: "held-out pair accuracy" },
  { key: "effect_size", label: "Cohen's d", help: "held-out effect size" },
  { key: "baseline", label: "baseline" }, { key: "norm", label: "‖v‖" },
  { key: "n_train", label: "train / test", format: (v, row) => `${v ?? "--"} / ${row.n_test ?? "--"}` },
  { key: "chosen_by", label: "chosen by", title: (row) => row.reason ?? "" },
  { key: "reason", label: "how chosen" },
];

class ExtractionView extends DataView {
  constructor(root) {
    super(root, "extraction", REDRAW);
    this.pick = "";     // entryKey of the trait shown below the table
    this.lensIndex = 0; // which vector of the logit lens
    this.offset = 0;    // contrastive page
    this.render();
  }

  async render() {
    const gen = ++this.gen;
    await this.ready.run(async () => {
      this.debug = { traits: [], best: [], trait: null, variant: null, grids: [], lens: null,
        contrastive: null };
      if (!state.exp) {
        this.root.replaceChildren(note("No experiment selected."));
        this.publish({});
        return;
      }
      let data;
      try {
        data = await getJSON("extraction", { exp: state.exp });
      } catch (error) {
        if (gen !== this.gen) return;
        this.root.replaceChildren(missingOrError("extracted vectors", error));
        this.publish({ error: error.message });
        return;
      }
      if (gen !== this.gen) return;
      this.data = data;
      await this.draw(gen);
    });
  }

  async draw(gen) {
    const traits = this.data.traits ?? [];
    if (!traits.some((entry) => entryKey(entry) === this.pick)) {
      this.pick = traits.length ? entryKey(traits[0]) : "";
    }
    const rows = traits.flatMap((entry) => (entry.best ?? []).map((best) => ({ ...best,
      trait: entry.trait, variant: entry.variant })));
    this.publish({ traits: traits.map((e) => ({ trait: e.trait, variant: e.variant })),
      best: rows.map((r) => ({ trait: r.trait, variant: r.variant, component: r.component,
        method: r.method, position: r.position, layer: r.layer, accuracy: r.accuracy,
        effect_size: r.effect_size, baseline: r.baseline, chosen_by: r.chosen_by })) });
    this.detail = h("div", { id: "ext-detail" });
    this.root.replaceChildren(
      panel("ext-best-panel", "Best vector per trait",
        dataTable({ id: "ext-best", columns: BEST_COLUMNS, rows, empty: "No vectors." })),
      h("div", { class: "view-controls" }, selectBox("ext-trait", "trait",
        traits.map((e) => [entryKey(e), `${e.trait} (${e.variant})`]), this.pick, (value) => {
          this.pick = value;
          this.lensIndex = 0;
          this.offset = 0;
          this.ready.run(() => this.drawTrait(this.gen));
        })),
      this.detail);
    await this.drawTrait(gen);
  }

  entry() {
    return (this.data?.traits ?? []).find((e) => entryKey(e) === this.pick) ?? null;
  }

  async drawTrait(gen) {
    const entry = this.entry();
    if (!entry) {
      this.detail.replaceChildren(hintsPanel("No traits extracted yet; make them with:",
        this.data?.hints));
      return;
    }
    this.lensBox = h("div", { id: "ext-lens" }, note("loading…"));
    this.pairsBox = h("div", { id: "ext-pairs" }, note("loading…"));
    this.detail.replaceChildren(
      panel("ext-grids-panel", `Held-out accuracy and effect size: ${entry.trait} (${entry.variant})`,
        ...(entry.grids ?? []).map((grid, i) => this.gridPair(grid, i))),
      panel("ext-lens-panel", "Vector logit lens", this.lensBox),
      panel("ext-pairs-panel", "Contrastive data", this.pairsBox));
    this.publish({ trait: entry.trait, variant: entry.variant,
      grids: (entry.grids ?? []).map((g) => ({ position: g.position, component: g.component,
        methods: g.methods, layers: g.layers, accuracy: g.accuracy, effect_size: g.effect_size,
        best: g.best ? { method: g.best.method, layer: g.best.layer } : null,
        bestCell: this.bestCell(g) })) });
    await Promise.all([this.loadLens(gen, entry), this.loadPairs(gen, entry)]);
  }

  bestCell(grid) {
    const r = grid.methods.indexOf(grid.best?.method);
    const c = grid.layers.indexOf(grid.best?.layer);
    return r >= 0 && c >= 0 ? [r, c] : null;
  }

  gridPair(grid, i) {
    const best = this.bestCell(grid);
    const common = { rowLabels: grid.methods, colLabels: grid.layers, best, corner: "method \\ layer" };
    const title = (what) => (r, c, v) => `${grid.methods[r]} · layer ${grid.layers[c]} · ${what} ` +
      `${fmt(v)}`;
    return h("div", { class: "grid-pair" },
      h("h3", { text: `${grid.position} · ${grid.component}` + (grid.best ? ` · best: ` +
        `${grid.best.method} at layer ${grid.best.layer} (acc ${fmt(grid.best.accuracy)}, ` +
        `d ${fmt(grid.best.effect_size)})` : "") }),
      h("div", { class: "grid-row" },
        h("figure", {}, h("figcaption", { text: "held-out accuracy" }), gridTable({ ...common,
          id: `ext-acc-${i}`, values: grid.accuracy, cellTitle: title("accuracy") })),
        h("figure", {}, h("figcaption", { text: "effect size (Cohen's d)" }), gridTable({ ...common,
          id: `ext-d-${i}`, values: grid.effect_size, scale: "diverging",
          cellTitle: title("d") }))));
  }

  async loadLens(gen, entry) {
    if (!entry.vector_lens && isStatic()) {
      this.lensBox.replaceChildren(note("This export has no vector logit lens for this trait."));
      return;
    } // on a server, the request's 404 names the command that makes it
    try {
      this.lens = await getJSON("vector_lens", { exp: state.exp, trait: entry.trait,
        variant: entry.variant });
    } catch (error) {
      if (gen === this.gen) this.lensBox.replaceChildren(missingOrError("vector logit lens", error));
      return;
    }
    if (gen === this.gen) this.drawLens();
  }

  drawLens() {
    const vectors = this.lens.vectors ?? [];
    const vector = vectors[this.lensIndex] ?? vectors[0];
    const tokenTable = (id, items) => dataTable({ id, rows: items ?? [], empty: "none",
      columns: [{ key: "token", label: "token", format: quoted }, { key: "logit", label: "logit" }] });
    const common = this.lens.common ?? {};
    const commonNote = (common.toward?.length || common.away?.length)
      ? h("p", { class: "note", id: "ext-lens-common", text: `common to every vector (filtered: ` +
        `${this.lens.filter_common ? "yes" : "no"}): toward ${(common.toward ?? []).map(quoted)
          .join(" ")} · away ${(common.away ?? []).map(quoted).join(" ")}` }) : null;
    this.lensBox.replaceChildren(...[
      h("div", { class: "view-controls" }, selectBox("ext-lens-vector", "vector",
        vectors.map((v, i) => [String(i), `${v.method} · layer ${v.layer} · ${v.position} · ` +
          `${v.component} (‖v‖ ${fmt(v.norm)})`]), String(this.lensIndex), (value) => {
          this.lensIndex = Number(value);
          this.drawLens();
        })),
      commonNote,
      vector ? h("div", { class: "grid-row" },
        h("figure", {}, h("figcaption", { text: "pushes toward" }), tokenTable("ext-lens-toward",
          vector.toward)),
        h("figure", {}, h("figcaption", { text: "pushes away from" }), tokenTable("ext-lens-away",
          vector.away))) : note("The file lists no vectors.")].filter(Boolean));
    this.publish({ lens: vector ? { index: this.lensIndex, method: vector.method,
      layer: vector.layer, toward: (vector.toward ?? []).map((t) => [t.token, t.logit]),
      away: (vector.away ?? []).map((t) => [t.token, t.logit]) } : null });
  }

  async loadPairs(gen, entry) {
    if (!entry.completions && isStatic()) {
      this.pairsBox.replaceChildren(note("This export has no contrastive data for this trait."));
      return;
    } // on a server, the request's 404 names the command that makes it
    let page;
    try {
      page = await getJSON("contrastive", { exp: state.exp, trait: entry.trait,
        variant: entry.variant, offset: this.offset, limit: PAGE });
    } catch (error) {
      if (gen === this.gen) this.pairsBox.replaceChildren(missingOrError("contrastive data", error));
      return;
    }
    if (gen !== this.gen) return;
    const side = (line) => (line ? h("div", { class: "pair-side" },
      h("span", { class: "pair-text", text: line.text }),
      h("span", { class: "pair-completion", text: line.completion })) : h("span",
      { class: "note", text: "(none)" }));
    const rows = (page.items ?? []).map((item) => h("tr", { class: item.held_out ? "held-out" : "" },
      h("td", { text: String(item.index) }),
      h("td", { text: item.held_out === null || item.held_out === undefined ? "--"
        : item.held_out ? "test" : "train" }),
      h("td", {}, side(item.positive)), h("td", {}, side(item.negative))));
    this.pairsBox.replaceChildren(
      h("div", { class: "view-controls" }, pager("ext-pairs-pager", page, (offset) => {
        this.offset = offset;
        this.ready.run(() => this.loadPairs(this.gen, entry));
      }), h("span", { class: "note", text: `continuations of ${page.max_new_tokens ?? "?"} ` +
        "tokens in the completion colour" })),
      h("table", { class: "data-table pairs", id: "ext-pairs-table" },
        h("thead", {}, h("tr", {}, ["#", "split", "positive", "negative"].map((text) =>
          h("th", { text })))), h("tbody", {}, rows)));
    this.publish({ contrastive: { total: page.total, offset: page.offset,
      items: (page.items ?? []).map((item) => ({ index: item.index, held_out: item.held_out,
        positive: item.positive, negative: item.negative })) } });
  }

  destroy() {
    super.destroy();
  }
}

export function createExtractionView(root) {
  return new ExtractionView(root);
}
