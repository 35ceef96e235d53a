// The Noising view: the runs under the server's noising folder (`serve --noising-dir`), each
// with its config summary; for one run the per-scale log-prob box plot (5th, 25th, 50th, 75th
// and 95th percentiles, the mean as a dot) and the vector drop table, the same numbers as
// `residlab noise eval` prints, and a link that opens the run's viz.html. Not tied to the
// experiment chosen above. Every number is the API's.

import { getJSON, isStatic } from "./dash_api.js";
import { boxPlot, dataTable, DataView, fmt, missingOrError, panel, selectBox } from "./dash_charts.js";
import { h, note } from "./dash_state.js";

const REDRAW = ["theme"];
const METRICS = [["mean_logprob", "mean log-prob per token"], ["total_logprob", "total log-prob"]];

const RUN_COLUMNS = [
  { key: "run", label: "run" }, { key: "model", label: "model" },
  { key: "site", label: "site", format: (v, r) => `${v ?? "?"} @ layer ${r.layer_index ?? "?"}` },
  { key: "positions", label: "positions" },
  { key: "noise_norms", label: "noise norms", format: (v) => (v ?? []).map((n) => fmt(n, 2)).join(", ") },
  { key: "num_noise_vectors", label: "vectors" }, { key: "num_prompts", label: "prompts" },
  { key: "max_new_tokens", label: "new tokens" },
  { key: "shaped", label: "shaped", format: (v) => (v === null || v === undefined ? "--" : v ? "yes" : "no"),
    title: (r) => r.shaping_reason ?? "" },
  { key: "scored", label: "scored", format: (v, r) => (r.error ? `error: ${r.error}` : v ? "yes" : "no") },
];

/** The viz link's address: the API's ``viz_url``; in a static export relative to the export
 * folder (the page is opened from a file there). */
function vizHref(url) {
  return isStatic() ? String(url).replace(/^\/+/, "") : String(url);
}

class NoisingView extends DataView {
  constructor(root) {
    super(root, "noising", REDRAW);
    this.run = "";
    this.metric = "mean_logprob";
    this.render();
  }

  async render() {
    const gen = ++this.gen;
    await this.ready.run(async () => {
      this.debug = { runs: [], run: null };
      let listing;
      try {
        listing = await getJSON("noising_runs");
      } catch (error) {
        if (gen === this.gen) this.root.replaceChildren(missingOrError("noising runs", error));
        this.publish({ error: error.message });
        return;
      }
      if (gen !== this.gen) return;
      const runs = listing.runs ?? [];
      this.publish({ available: listing.available, runs: runs.map((r) => r.run) });
      if (!listing.available || !runs.length) {
        this.root.replaceChildren(h("div", { class: "hint-panel", id: "nz-hint" },
          h("strong", { text: "No noising runs to show." }),
          h("p", { text: listing.hint ?? "The server gave no command for this." })));
        return;
      }
      if (!runs.some((r) => r.run === this.run)) this.run = runs[0].run;
      this.runBox = h("div", { id: "nz-run" });
      this.root.replaceChildren(
        panel("nz-runs-panel", "Noising runs", dataTable({ id: "nz-runs", columns: RUN_COLUMNS,
          rows: runs, rowClass: (r) => (r.run === this.run ? "current" : null) })),
        h("div", { class: "view-controls" },
          selectBox("nz-run-select", "run", runs.map((r) => [r.run, r.run]), this.run, (v) => {
            this.run = v;
            this.render();
          }),
          selectBox("nz-metric", "metric", METRICS, this.metric, (v) => {
            this.metric = v;
            this.ready.run(() => this.loadRun(this.gen));
          })),
        this.runBox);
      await this.loadRun(gen);
    });
  }

  async loadRun(gen) {
    let data;
    try {
      data = await getJSON("noising_run", { run: this.run, metric: this.metric });
    } catch (error) {
      if (gen !== this.gen) return;
      this.runBox.replaceChildren(missingOrError(`scores of run ${this.run}`, error));
      this.publish({ run: this.run, scored: false, error: error.message });
      return;
    }
    if (gen !== this.gen) return;
    this.draw(data);
  }

  draw(data) {
    const boxes = (data.quantiles ?? []).map((q) => ({ label: `scale ${fmt(q.scale, 2)}`,
      min: q.q?.[0], q1: q.q?.[1], median: q.q?.[2], q3: q.q?.[3], max: q.q?.[4], mean: q.mean, n: q.n }));
    const scales = [...new Set((data.drops ?? []).flatMap((d) => (d.per_scale ?? []).map(([s]) => s)))];
    const drops = (data.drops ?? []).map((d) => ({ ...d, ...Object.fromEntries((d.per_scale ?? [])
      .map(([scale, mean]) => [`at ${scale}`, mean])) }));
    const viz = data.viz && data.viz_url
      ? h("a", { id: "nz-viz", class: "button-link", href: vizHref(data.viz_url), target: "_blank",
        rel: "noopener noreferrer", text: "Open the run's viz.html" })
      : note("No viz.html for this run (make it with residlab noise viz).");
    this.runBox.replaceChildren(
      h("p", { class: "note", id: "nz-counts", text: `${data.n_records ?? 0} records` +
        ` · ${data.n_unscored ?? 0} unscored · ${data.n_empty ?? 0} empty · metric ${data.metric}` }),
      viz,
      panel("nz-box-panel", `${data.metric} per noise scale (box: 25–75th percentile, whiskers ` +
        "5th–95th, dot: mean)", boxPlot({ id: "nz-box", boxes, yLabel: data.metric })),
      panel("nz-drops-panel", "Vector drop (worst first)", dataTable({ id: "nz-drops", rows: drops,
        columns: [{ key: "noise_id", label: "noise vector" },
          { key: "drop", label: "drop", format: (v) => fmt(v, 4),
            help: "mean at the baseline scale − mean at the largest scale" },
          { key: "baseline", label: "from scale", format: (v) => fmt(v, 2) },
          { key: "scale", label: "to scale", format: (v) => fmt(v, 2) },
          ...scales.map((s) => ({ key: `at ${s}`, label: `mean at ${fmt(s, 2)}`,
            format: (v) => fmt(v, 4) }))] })));
    this.publish({ run: data.run, metric: data.metric, scored: true,
      quantiles: (data.quantiles ?? []).map((q) => ({ scale: q.scale, n: q.n, mean: q.mean, q: q.q })),
      drops: (data.drops ?? []).map((d) => ({ noise_id: d.noise_id, drop: d.drop,
        baseline: d.baseline, scale: d.scale })),
      viz: data.viz ? vizHref(data.viz_url) : null });
  }

  destroy() {
    super.destroy();
  }
}

export function createNoisingView(root) {
  return new NoisingView(root);
}
