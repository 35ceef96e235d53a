// The dashboard page's entry: the shell (experiment and variant pickers, nav, trait
// checkboxes grouped by category, light/dark theme), the URL as the source of truth for what
// is shown (history push on navigation, replace on token moves, back/forward through
// popstate), and the table of views: adding a view is one module and one entry in VIEWS.
// Every string from the data is set as text.

import { createAnalysisView } from "./dash_analysis.js";
import { getJSON, isStatic } from "./dash_api.js";
import { createDeepDiveView } from "./dash_deepdive.js";
import { createDiffSpansView } from "./dash_diffspans.js";
import { createExtractionView } from "./dash_extraction.js";
import { createInferenceView, projectedTraits } from "./dash_inference.js";
import { COLOURS } from "./dash_lines.js";
import { createNoisingView } from "./dash_noising.js";
import { Picker } from "./dash_picker.js";
import { createSteeringView } from "./dash_steering.js";
import { URL_DEFAULTS, errorPanel, fromQuery, h, hintsPanel, navigate, note, setResolver, state, subscribe, toQuery, update } from "./dash_state.js";

/** The views, in nav order: ``create(main)`` returns ``{destroy()}``; the view subscribes to
 * the state itself and sets ``data-view-ready`` on ``main#view`` when drawn. */
const VIEWS = [
  { tab: "inference", label: "Inference", create: createInferenceView },
  { tab: "deepdive", label: "Layer Deep Dive", create: createDeepDiveView },
  { tab: "extraction", label: "Extraction", create: createExtractionView },
  { tab: "steering", label: "Steering", create: createSteeringView },
  { tab: "analysis", label: "Model Analysis", create: createAnalysisView },
  { tab: "diffspans", label: "Model Diff", create: createDiffSpansView },
  { tab: "noising", label: "Noising", create: createNoisingView },
];
const THEME_KEY = "residlab.dashboard.theme";
const DEFAULT_TRAITS = 5;
const URL_KEYS = new Set(Object.keys(URL_DEFAULTS));
const $ = (id) => document.getElementById(id);

let current = null; // {tab, view}
let experiments = [];

// ---------------------------------------------------------------- resolving a navigation

function defaultSet(meta, variant) {
  const sets = (meta.prompt_sets?.[variant] ?? []).map((s) => s.name);
  return sets.find((set) => Object.keys(projectedTraits(meta, variant, set)).length)
    ?? sets[0] ?? "";
}

/** The application variant, unless another one has projections (or prompt sets) and it not. */
function defaultVariant(meta) {
  const preferred = meta.defaults?.application;
  const order = meta.variants.includes(preferred)
    ? [preferred, ...meta.variants.filter((v) => v !== preferred)] : meta.variants;
  const projected = (v) => Object.keys(meta.projections?.[v] ?? {}).length > 0;
  const hasSets = (v) => (meta.prompt_sets?.[v] ?? []).length > 0;
  return order.find(projected) ?? order.find(hasSets) ?? order[0] ?? "";
}

/** Reset what depends on a key the patch changes without giving the dependents. */
function resetDependents(next, patch) {
  const reset = (keys) => {
    for (const key of keys) if (!(key in patch)) next[key] = URL_DEFAULTS[key];
  };
  if ("exp" in patch && patch.exp !== state.exp) {
    reset(["variant", "set", "id", "token", "traits", "layers", "diff", "head"]);
  }
  if ("set" in patch && patch.set !== state.set) reset(["id", "token"]);
  if ("id" in patch && patch.id !== state.id) reset(["token", "head"]);
}

/** The traits asked for (those the experiment has); the first projected ones when none were
 * asked, or when a new variant or set projects none of the chosen ones. */
function resolveTraits(next, meta, patch) {
  const names = new Set((meta.traits ?? []).map((t) => t.trait));
  const known = projectedTraits(meta, next.variant, next.set);
  const defaults = [...names].filter((t) => known[t]).slice(0, DEFAULT_TRAITS);
  if (next.traits === null) return defaults;
  const chosen = next.traits.filter((t) => names.has(t));
  const moved = !("traits" in patch) && ["exp", "variant", "set"].some(
    (key) => key in patch && patch[key] !== state[key]);
  return moved && !chosen.some((t) => known[t]) ? defaults : chosen;
}

async function firstPrompt(next) {
  const page = await getJSON("prompts", { exp: next.exp, variant: next.variant, set: next.set,
    offset: 0, limit: 50 });
  const item = page.items?.[0];
  return item ? { id: String(item.id), token: item.prompt_end ?? -1 } : { id: "", token: -1 };
}

/** Fill what ``next`` leaves open: experiment, variant, set, traits, the first prompt. */
async function resolve(next, patch) {
  resetDependents(next, patch);
  if (!VIEWS.some((view) => view.tab === next.tab)) next.tab = VIEWS[0].tab;
  if (!experiments.some((e) => e.name === next.exp)) next.exp = experiments[0]?.name ?? "";
  if (!next.exp) return { ...next, meta: null, variant: "", set: "", id: "", span: null };
  const meta = await getJSON("experiment", { exp: next.exp });
  next.meta = meta;
  if (!meta.variants.includes(next.variant)) next.variant = defaultVariant(meta);
  const sets = (meta.prompt_sets?.[next.variant] ?? []).map((s) => s.name);
  if (!sets.includes(next.set)) {
    next.set = defaultSet(meta, next.variant);
    next.id = "";
  }
  next.traits = resolveTraits(next, meta, patch);
  if (next.diff === next.variant) next.diff = "";
  if (next.set && !next.id) Object.assign(next, await firstPrompt(next));
  if (!("span" in patch)) next.span = state.span?.id === next.id ? state.span : null;
  return next;
}

// ---------------------------------------------------------------- the shell

function showAppError(node) {
  const box = $("app-error");
  box.replaceChildren(...(node ? [node] : []));
  box.hidden = !node;
}

/** How a navigation ended: clears the app's error panel, or names what failed. */
function navigated(error, patch) {
  if (!error) {
    if (experiments.length) showAppError(null);
    return;
  }
  const what = {
    experiments: "the list of experiments",
    experiment: `experiment ${patch.exp || state.exp}`,
    prompts: `the prompts of set ${patch.set || state.set}`,
  }[error.endpoint] ?? "the experiment's data";
  showAppError(errorPanel(what, error));
}

function followUrl(changed, options) {
  if (options.history === "none" || ![...changed].some((key) => URL_KEYS.has(key))) return;
  const search = `?${toQuery(state)}`;
  if (search === location.search) return;
  const onlyToken = [...changed].every((key) => key === "token" || !URL_KEYS.has(key));
  const mode = options.history ?? (onlyToken ? "replace" : "push");
  if (mode === "replace") history.replaceState(null, "", search);
  else history.pushState(null, "", search);
}

function mountView() {
  const entry = VIEWS.find((view) => view.tab === state.tab) ?? VIEWS[0];
  if (current?.tab === entry.tab) return;
  current?.view.destroy();
  const main = $("view");
  delete main.dataset.viewReady;
  main.dataset.tab = entry.tab;
  main.replaceChildren();
  current = { tab: entry.tab, view: entry.create(main) };
}

function renderNav() {
  const links = VIEWS.map((view) => {
    const link = h("a", { href: `?${toQuery({ ...state, tab: view.tab })}`, text: view.label,
      class: view.tab === state.tab ? "nav-link active" : "nav-link", data: { tab: view.tab } });
    if (view.tab === state.tab) link.setAttribute("aria-current", "page");
    return link;
  });
  const chat = h("a", { id: "nav-chat", class: "nav-link", href: "/chat", text: "Live Chat" });
  chat.hidden = isStatic();
  $("nav").replaceChildren(...links, chat);
}

function renderPickers() {
  const expSelect = $("exp-select");
  expSelect.replaceChildren(...experiments.map((e) => h("option", { value: e.name, text: e.name })));
  expSelect.value = state.exp;
  expSelect.disabled = experiments.length < 2;
  const variants = state.meta?.variants ?? [];
  const variantSelect = $("variant-select");
  variantSelect.replaceChildren(...variants.map((v) => h("option", { value: v, text: v })));
  variantSelect.value = state.variant;
  variantSelect.disabled = !variants.length;
}

function traitBox(trait, known) {
  const index = state.traits?.indexOf(trait.trait) ?? -1;
  const info = known[trait.trait];
  const input = h("input", { type: "checkbox", checked: index >= 0, disabled: !info && index < 0,
    data: { trait: trait.trait } });
  input.addEventListener("change", () => {
    const traits = (state.traits ?? []).filter((t) => t !== trait.trait);
    if (input.checked) traits.push(trait.trait);
    update({ traits });
  });
  const swatch = h("span", { class: "swatch" });
  if (index >= 0) swatch.style.background = COLOURS[index % COLOURS.length];
  return h("label", { class: info ? "trait" : "trait missing",
    title: info ? `${trait.trait} · layers ${info.layers.join(", ")} (best ${info.default_layer})`
      : `${trait.trait}: no projections for ${state.variant} / ${state.set}` },
  input, swatch, h("span", { class: "trait-name", text: trait.name }));
}

function renderTraits() {
  const box = $("trait-list");
  const meta = state.meta;
  if (!meta) {
    box.replaceChildren(note("No experiment."));
    return;
  }
  const known = projectedTraits(meta, state.variant, state.set);
  const groups = new Map();
  for (const trait of meta.traits ?? []) {
    if (!groups.has(trait.category)) groups.set(trait.category, []);
    groups.get(trait.category).push(trait);
  }
  box.replaceChildren(...[...groups].map(([category, traits]) => h("fieldset",
    { class: "trait-group" }, h("legend", { text: category }),
    traits.map((trait) => traitBox(trait, known)))));
  if (!groups.size) {
    const extract = Object.fromEntries(Object.entries(meta.hints ?? {}).filter(
      ([, command]) => String(command).startsWith("residlab extract ")));
    box.replaceChildren(hintsPanel("No traits yet; extract one with:", extract));
  }
}

function onChange(changed, options) {
  followUrl(changed, options);
  if (changed.has("tab")) mountView();
  if (["meta", "exp", "variant"].some((key) => changed.has(key))) renderPickers();
  if (["meta", "variant", "set", "traits"].some((key) => changed.has(key))) renderTraits();
  if ([...changed].some((key) => URL_KEYS.has(key))) renderNav();
}

// ---------------------------------------------------------------- theme and controls

function applyTheme(theme) {
  document.documentElement.dataset.theme = theme;
  $("theme-toggle").textContent = theme === "dark" ? "Light theme" : "Dark theme";
  update({ theme });
}

function initialTheme() {
  let saved = null;
  try {
    saved = localStorage.getItem(THEME_KEY);
  } catch { /* storage off: follow the system */ }
  if (saved === "light" || saved === "dark") return saved;
  return window.matchMedia?.("(prefers-color-scheme: dark)").matches ? "dark" : "light";
}

function toggleTheme() {
  const theme = state.theme === "dark" ? "light" : "dark";
  try {
    localStorage.setItem(THEME_KEY, theme);
  } catch { /* not saved; still applied */ }
  applyTheme(theme);
}

function bindControls() {
  $("theme-toggle").addEventListener("click", toggleTheme);
  $("exp-select").addEventListener("change", (e) => navigate({ exp: e.target.value }));
  $("variant-select").addEventListener("change", (e) => navigate({ variant: e.target.value }));
  $("nav").addEventListener("click", (e) => {
    const link = e.target.closest?.("a[data-tab]");
    if (!link || e.ctrlKey || e.metaKey || e.shiftKey || e.button !== 0) return;
    e.preventDefault();
    update({ tab: link.dataset.tab });
  });
  window.addEventListener("popstate", () => navigate(fromQuery(location.search),
    { history: "replace" }));
}

async function start() {
  applyTheme(initialTheme());
  bindControls();
  setResolver(resolve, navigated);
  subscribe(onChange);
  new Picker($("picker"));
  renderNav();
  const asked = fromQuery(location.search);
  if (asked.exp) getJSON("experiment", { exp: asked.exp }).catch(() => {}); // in parallel
  try {
    experiments = (await getJSON("experiments")).experiments ?? [];
  } catch (error) {
    navigated(error, {});
  }
  if (!experiments.length && $("app-error").hidden) {
    showAppError(note("No experiments found in the experiments folder " +
      "(RESIDLAB_EXPERIMENTS_DIR, default ./experiments)."));
  }
  await navigate(asked, { history: "replace" });
  mountView();
  renderPickers();
  renderTraits();
  renderNav();
  document.body.dataset.ready = "1";
}

// A module runs after the document is parsed; the static export's classic bundle may not.
if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
else start();
