// The dashboard's one shared state: what is shown (experiment, variant, prompt set, prompt,
// token, traits, view options), the URL codec that makes the URL the source of truth for it,
// subscribe/notify, and the small helpers every view shares (DOM building with text only,
// error and hint panels, the "view ready" and debug hooks that tests wait for).

/** Everything the URL holds, with its default. Keys not here (meta, span, theme) are not in
 * the URL. ``token`` -1 means "not chosen yet" (the first response token once known). */
export const URL_DEFAULTS = Object.freeze({
  tab: "inference", exp: "", variant: "", set: "", id: "", token: -1, traits: null,
  mode: "cosine", smooth: 1, centre: false, clean: "none", layers: "", diff: "",
  spans: "window", window: 8, scope: "prompt", head: "", sink: false,
});
const CHOICES = {
  mode: ["cosine", "normalised", "raw"], clean: ["none", "top5", "all"],
  spans: ["window", "clause"], scope: ["prompt", "set"],
};
const INTEGERS = { token: [-1, 1e9], smooth: [1, 200] };
/** Top Spans window sizes (what the API's static export holds). */
export const SPAN_WINDOWS = [4, 8, 16];
const FLAGS = new Set(["centre", "sink"]);

export const state = {
  ...URL_DEFAULTS,
  meta: null,     // the `experiment` API answer for state.exp
  span: null,     // {id, start, end}: a Top Span to highlight (its prompt only)
  theme: "light",
};

const listeners = new Set();
let resolver = async (next) => next;
let report = () => {};
let navigation = 0;

function same(a, b) {
  if (a === b) return true;
  if (Array.isArray(a) && Array.isArray(b)) {
    return a.length === b.length && a.every((value, i) => value === b[i]);
  }
  return false;
}

/** Call ``fn(changedKeys: Set, options)`` after every change; returns the unsubscribe. */
export function subscribe(fn) {
  listeners.add(fn);
  return () => listeners.delete(fn);
}

/** Apply ``patch`` and tell every listener which keys changed. ``options.history``:
 * "push" | "replace" | "none" (how the URL follows; default: push, replace for a token move). */
export function update(patch, options = {}) {
  const changed = new Set();
  for (const [key, value] of Object.entries(patch)) {
    if (!same(state[key], value)) {
      state[key] = value;
      changed.add(key);
    }
  }
  if (changed.size) {
    for (const fn of [...listeners]) fn(changed, options);
  }
  return changed;
}

/** The app's ``fn(next, patch)`` that fills what a navigation leaves open (defaults, the
 * first prompt), and ``onResult(error | null, patch)`` told how each navigation ended. */
export function setResolver(fn, onResult) {
  resolver = fn;
  report = onResult;
}

/** Move to ``patch`` once the resolver completed it (a later navigation overrides this one);
 * true when it was applied. Failures go to the resolver's ``onResult``, never rejected. */
export async function navigate(patch, options = {}) {
  const ticket = ++navigation;
  let next;
  try {
    next = await resolver({ ...urlState(state), meta: state.meta, ...patch }, patch);
  } catch (error) {
    if (ticket === navigation) report(error, patch);
    return false;
  }
  if (ticket !== navigation) return false;
  update(next, options);
  report(null, patch);
  return true;
}

/** The URL keys of ``source`` (a copy). */
export function urlState(source) {
  const out = {};
  for (const key of Object.keys(URL_DEFAULTS)) out[key] = source[key];
  return out;
}

function parseValue(key, text) {
  if (key in CHOICES) return CHOICES[key].includes(text) ? text : URL_DEFAULTS[key];
  if (key in INTEGERS) {
    const [low, high] = INTEGERS[key];
    const value = Number(text);
    return Number.isInteger(value) && value >= low && value <= high ? value : URL_DEFAULTS[key];
  }
  if (key === "window") return SPAN_WINDOWS.includes(Number(text)) ? Number(text) : 8;
  if (FLAGS.has(key)) return text === "1" || text === "true";
  return text;
}

/** Every URL key from a query string (defaults for what is absent or invalid). ``traits`` is
 * repeated (``traits=a&traits=b``); one empty ``traits=`` means "none selected". */
export function fromQuery(search) {
  const query = new URLSearchParams(search);
  const out = { ...URL_DEFAULTS };
  for (const key of Object.keys(URL_DEFAULTS)) {
    if (key === "traits") {
      const all = query.getAll("traits");
      if (all.length) out.traits = all.filter((t) => t !== "");
    } else if (query.has(key)) {
      out[key] = parseValue(key, query.get(key));
    }
  }
  return out;
}

/** The query string of ``source``: where it is, always; options only when not the default. */
export function toQuery(source) {
  const query = new URLSearchParams();
  for (const key of ["tab", "exp", "variant", "set", "id"]) {
    if (source[key]) query.set(key, source[key]);
  }
  if (source.token >= 0) query.set("token", String(source.token));
  if (Array.isArray(source.traits)) {
    if (!source.traits.length) query.append("traits", "");
    for (const trait of source.traits) query.append("traits", trait);
  }
  for (const key of Object.keys(URL_DEFAULTS)) {
    if (query.has(key) || key === "traits" || key === "token") continue;
    if (same(source[key], URL_DEFAULTS[key])) continue;
    query.set(key, FLAGS.has(key) ? "1" : String(source[key]));
  }
  return query.toString();
}

// ---------------------------------------------------------------- shared DOM helpers

/** ``h("div", {class: "x", text: data, title: data}, ...children)``: every string as text. */
export function h(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = String(value);
    else if (key === "title") node.title = String(value);
    else if (key === "data") Object.assign(node.dataset, value);
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key in node) node[key] = value;
    else node.setAttribute(key, String(value));
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined && child !== false) {
      node.append(child instanceof Node ? child : String(child));
    }
  }
  return node;
}

/** An error panel naming what failed, with the server's one line (often the command to run). */
export function errorPanel(what, error) {
  const message = error?.message ?? String(error);
  return h("div", { class: "error-panel", role: "alert" },
    h("strong", { text: `Could not load ${what}` }), h("p", { class: "error-text", text: message }));
}

/** What to run to make missing data, from the API's ``hints`` ({what: command}). */
export function hintsPanel(title, hints) {
  const entries = Object.entries(hints ?? {});
  return h("div", { class: "hint-panel" }, h("strong", { text: title }),
    entries.length
      ? h("ul", {}, entries.map(([what, command]) => h("li", {},
        h("span", { class: "hint-what", text: what }), h("code", { text: command }))))
      : h("p", { text: "The server gave no command for this." }));
}

/** A muted one-line message in a view. */
export function note(text) {
  return h("p", { class: "note", text });
}

/** Mark the view drawn (``data-view-ready`` on ``main#view``) or drawing (``name`` null). */
export function setViewReady(name) {
  const main = document.getElementById("view");
  if (!main) return;
  if (name) main.dataset.viewReady = name;
  else delete main.dataset.viewReady;
}

/** The drawn data for tests: ``window.__residlab_debug[view] = data`` (plain arrays). */
export function setDebug(view, data) {
  const debug = window.__residlab_debug ?? (window.__residlab_debug = {});
  debug[view] = data;
}
