// The Model Diff spans view: the clauses of a prompt set ranked by how much a variant pair
// differs on them, either in a trait's per-token projection (diff per-token, one trait and
// layer) or in the log-probability of the response tokens (diff logprobs). Each span links
// into the Inference view's diff mode at its first token (its prompt opened, the span
// highlighted). Every number is the API's.

import { getJSON } from "./dash_api.js";
import { DataView, experimentOverview, fmt, missingOrError, panel, selectBox } from "./dash_charts.js";
import { h, hintsPanel, navigate, note, setDebug, state, toQuery } from "./dash_state.js";

const REDRAW = ["exp", "meta", "theme"];
const TOP = 20;
const SORTS = [["abs", "largest |Δ|"], ["pos", "most positive"], ["neg", "most negative"]];

const pairKey = (d) => JSON.stringify([d.variant_a, d.variant_b]);
const sourceKey = (s) => JSON.stringify(s.source === "logprobs" ? ["logprobs"]
  : ["per_token", s.trait, s.layer]);

/** The hints for per-token or log-prob diffs (any diff command when none names them). */
function diffHints(hints) {
  const all = Object.entries(hints ?? {}).filter(([, c]) => String(c).includes(" diff "));
  const some = all.filter(([, c]) => /diff (per-token|logprobs)/.test(String(c)));
  return Object.fromEntries(some.length ? some : all);
}

/** Where a span opens: the Inference view's diff mode (``variant`` vs the other of the pair),
 * its prompt, its first token; the trait of a per-token span selected. */
export function spanTarget(span, pair, set, source) {
  const other = span.variant === pair.variant_a ? pair.variant_b : pair.variant_a;
  const target = { tab: "inference", exp: state.exp, variant: span.variant, set,
    id: String(span.prompt_id), token: span.start, diff: other };
  if (source.source === "per_token") target.traits = [source.trait];
  return target;
}

class DiffSpansView extends DataView {
  constructor(root) {
    super(root, "diffspans", REDRAW);
    this.pair = "";
    this.set = "";
    this.source = "";
    this.sort = "abs";
    this.render();
  }

  async render() {
    const gen = ++this.gen;
    await this.ready.run(async () => {
      const overview = await experimentOverview(this, gen, () => setDebug("diffspans", { spans: [] }));
      if (!overview) return;
      this.overview = overview;
      this.diffs = (overview.diffs ?? []).filter((d) => (d.per_token ?? []).length
        || (d.logprobs ?? []).length);
      if (!this.diffs.length) {
        this.root.replaceChildren(hintsPanel("No per-token or log-prob diff yet; make one with:",
          diffHints(overview.hints)));
        setDebug("diffspans", { spans: [] });
        return;
      }
      this.listBox = h("div", { id: "ds-list" });
      this.controls = h("div", { class: "view-controls" });
      this.root.replaceChildren(this.controls, panel("ds-panel", "Top spans", this.listBox));
      await this.load(gen);
    });
  }

  /** The choices for the current pair and set, each choice kept when still offered. */
  choices() {
    if (!this.diffs.some((d) => pairKey(d) === this.pair)) this.pair = pairKey(this.diffs[0]);
    const diff = this.diffs.find((d) => pairKey(d) === this.pair);
    const sets = [...new Set([...(diff.per_token ?? []).map((p) => p.set), ...(diff.logprobs ?? [])])]
      .sort();
    if (!sets.includes(this.set)) this.set = sets.includes(state.set) ? state.set : sets[0];
    const sources = [...(diff.per_token ?? []).filter((p) => p.set === this.set).map((p) => ({
      source: "per_token", trait: p.trait, layer: p.layer })),
    ...((diff.logprobs ?? []).includes(this.set) ? [{ source: "logprobs" }] : [])];
    if (!sources.some((s) => sourceKey(s) === this.source)) this.source = sourceKey(sources[0]);
    return { diff, sets, sources };
  }

  drawControls({ sets, sources }) {
    const reload = (key) => (value) => {
      this[key] = value;
      this.ready.run(() => this.load(this.gen));
    };
    this.controls.replaceChildren(
      selectBox("ds-pair", "pair", this.diffs.map((d) => [pairKey(d),
        `${d.variant_b} (B) − ${d.variant_a} (A)`]), this.pair, reload("pair")),
      selectBox("ds-set", "prompt set", sets.map((s) => [s, s]), this.set, reload("set")),
      selectBox("ds-source", "difference in", sources.map((s) => [sourceKey(s), s.source === "logprobs"
        ? "log-prob of the response" : `${s.trait} at layer ${s.layer}`]), this.source,
      reload("source")),
      selectBox("ds-sort", "rank by", SORTS, this.sort, reload("sort")));
  }

  async load(gen) {
    const { diff, sets, sources } = this.choices();
    this.drawControls({ sets, sources });
    const source = sources.find((s) => sourceKey(s) === this.source);
    const params = { exp: state.exp, a: diff.variant_a, b: diff.variant_b, set: this.set,
      source: source.source, sort: this.sort, top: TOP };
    if (source.source === "per_token") Object.assign(params, { trait: source.trait, layer: source.layer });
    let answer;
    try {
      answer = await getJSON("diff_spans", params);
    } catch (error) {
      if (gen === this.gen) this.listBox.replaceChildren(missingOrError("diff spans", error));
      return;
    }
    if (gen !== this.gen) return;
    this.draw(answer, diff, source);
  }

  draw(answer, diff, source) {
    const set = this.set;
    const rows = (answer.spans ?? []).map((span) => this.row(span, diff, set, source));
    const what = source.source === "logprobs" ? "Δ log p" : `Δ ${source.trait} L${source.layer}`;
    this.listBox.replaceChildren(
      h("p", { class: "note", id: "ds-summary", text: `${answer.n_spans ?? 0} clauses in ${set}; ` +
        `the top ${rows.length} by ${SORTS.find(([k]) => k === this.sort)?.[1]} of ${what} ` +
        `(${diff.variant_b} − ${diff.variant_a}). Click one to open it in the Inference view.` }),
      rows.length ? h("ol", { id: "ds-spans", class: "spans" }, rows) : note("No spans."));
    setDebug("diffspans", { a: diff.variant_a, b: diff.variant_b, set, source: source.source,
      trait: source.trait ?? null, layer: source.layer ?? null, sort: this.sort,
      n_spans: answer.n_spans, spans: (answer.spans ?? []).map((s) => ({ rank: s.rank,
        prompt_id: s.prompt_id, text: s.text, start: s.start, end: s.end,
        mean_delta: s.mean_delta, max_delta: s.max_delta, z: s.z, variant: s.variant })),
      links: rows.map((row) => row.querySelector("a")?.getAttribute("href") ?? null) });
  }

  row(span, diff, set, source) {
    const numbers = h("span", { class: "span-num", text: `mean Δ ${fmt(span.mean_delta)} · max Δ ` +
      `${fmt(span.max_delta)} · z ${fmt(span.z, 2)} · ${span.n_tokens} tok` });
    const body = [h("span", { class: "span-id", text: `#${span.rank} ${span.prompt_id}` }),
      h("span", { class: "span-text", text: String(span.text ?? "") }), numbers];
    if (span.start === null || span.start === undefined || !span.variant) {
      return h("li", {}, h("div", { class: "span-row no-link", title: "no response record of " +
        "either variant matches this prompt: it cannot be opened" }, ...body));
    }
    const target = spanTarget(span, diff, set, source);
    const link = h("a", { class: "span-row", href: `?${toQuery({ ...state, ...target })}`,
      data: { id: String(span.prompt_id), start: String(span.start), end: String(span.end) } },
    ...body);
    link.addEventListener("click", (e) => {
      if (e.ctrlKey || e.metaKey || e.shiftKey || e.button !== 0) return;
      e.preventDefault();
      navigate({ ...target, span: { id: target.id, start: span.start, end: span.end } });
    });
    return h("li", {}, link);
  }

  destroy() {
    super.destroy();
  }
}

export function createDiffSpansView(root) {
  return new DiffSpansView(root);
}
