// Live Chat: streams a conversation from POST /api/chat and shows every token with its trait
// readouts, a chart of those readouts over the whole conversation, and steering sliders.
// Every string that comes from the server or the user is set with textContent, never as HTML.
// A server started with a token is opened once as /chat?token=T: the server answers with a
// same-site cookie that authenticates this page's own requests (no token is kept in scripts).

import { COLOURS, TraitChart } from "./chat_chart.js";
import { readEvents, responseError } from "./chat_stream.js";
import { button, messageBlock, note, signed, tokenSpan, tokenTitle } from "./chat_transcript.js";

const CONVERSATION_KEY = "residlab.chat.conversation.v1";
const PREFS_KEY = "residlab.chat.prefs.v1";

const $ = (id) => document.getElementById(id);

const state = {
  traits: [],       // [{trait, layer, method, position, norm_scale}] from GET /api/traits
  messages: [],     // [{role, content, start, end, steering?, stopped?}]; start/end: token range
  tokens: [],       // [{text, id, prompt, special, scores, projections}], index = token_index
  prefs: { smooth: false, metric: "scores", steering: {}, maxTokens: 128, temperature: 0 },
  controller: null, // AbortController of the stream in flight
  chart: null,      // TraitChart
};

// ---------------------------------------------------------------- persistence

function load(key, fallback) {
  try {
    const text = localStorage.getItem(key);
    return text ? JSON.parse(text) : fallback;
  } catch {
    return fallback;
  }
}

function save(key, value) {
  try {
    localStorage.setItem(key, JSON.stringify(value));
  } catch (error) {
    showError(`could not save to localStorage (${error.name}); Clear frees space`);
  }
}

const saveConversation = () => save(CONVERSATION_KEY,
  { messages: state.messages, tokens: state.tokens });
const savePrefs = () => save(PREFS_KEY, state.prefs);

function showError(text) {
  const box = $("error");
  box.textContent = text;
  box.hidden = !text;
}

// ---------------------------------------------------------------- transcript

function renderTranscript() {
  $("conversation").replaceChildren(...state.messages.map(
    (message, i) => messageBlock(message, i, state.tokens, startEdit)));
  updateButtons();
}

function bodyOf(index) {
  return $("conversation").querySelector(`.msg[data-index="${index}"] .msg-body`);
}

function startEdit(index) {
  if (state.controller) return;
  const body = bodyOf(index);
  const area = document.createElement("textarea");
  area.className = "edit-box";
  area.value = state.messages[index].content;
  area.rows = 3;
  const row = document.createElement("div");
  row.className = "edit-buttons";
  row.append(button("Send from here", "branch", () => branch(index, area.value)),
    button("Cancel", "cancel", renderTranscript));
  body.replaceChildren(area, row);
  area.focus();
}

/** Edit a user message: drop it and everything after it, then send the new text. */
function branch(index, text) {
  if (!text.trim()) return;
  const start = state.messages[index].start;
  state.messages = state.messages.slice(0, index);
  state.tokens = state.tokens.slice(0, start ?? 0);
  send(text);
}

function showReadout(index) {
  const t = state.tokens[index];
  if (!t) return;
  $("readout").textContent = tokenTitle(t, index).replace(/\n/g, "   ");
  state.chart.pointAt(index);
}

/** Every trait with a vector, then any other trait the stream reported. */
function traitNames() {
  const names = state.traits.map((t) => t.trait);
  for (const t of state.tokens) {
    for (const name of Object.keys(t.scores ?? {})) if (!names.includes(name)) names.push(name);
  }
  return names;
}

function scheduleChart() {
  const { metric, smooth } = state.prefs;
  state.chart.show(state.tokens, traitNames(), { metric, smooth });
}

// ---------------------------------------------------------------- streaming a reply

function requestBody(steering) {
  return {
    messages: state.messages.map(({ role, content }) => ({ role, content })),
    max_tokens: state.prefs.maxTokens,
    temperature: state.prefs.temperature,
    steering,
    previous_context_length: state.tokens.length,
  };
}

function currentSteering() {
  return state.traits.map((t) => ({ trait: t.trait,
    coefficient: Number(state.prefs.steering[t.trait] ?? 0) }))
    .filter((s) => s.coefficient !== 0);
}

/** Put one token event at its own index (dropping anything the server re-streams from). */
function addToken(event, user, reply) {
  const index = event.token_index ?? state.tokens.length;
  if (index < state.tokens.length) {
    state.tokens.length = index;
    for (const m of state.messages) {
      if (m.start != null && m.start >= index) m.start = m.end = null;
      else if (m.end != null && m.end > index) m.end = index;
    }
    renderTranscript();
  }
  const t = { text: String(event.token ?? ""), id: event.token_id, prompt: !!event.is_prompt,
    special: !!event.is_special, scores: event.trait_scores ?? {},
    projections: event.trait_projections ?? {} };
  state.tokens.push(t);
  const owner = t.prompt ? user : reply;
  const message = state.messages[owner];
  if (message.start == null) message.start = index;
  message.end = index + 1;
  if (!t.prompt && !t.special) message.content += t.text;
  const body = bodyOf(owner);
  if (body.dataset.mode !== "tokens") { body.replaceChildren(); body.dataset.mode = "tokens"; }
  const box = $("conversation");
  const following = box.scrollHeight - box.scrollTop - box.clientHeight < 40;
  body.append(tokenSpan(t, index));
  if (following) scrollToEnd();
  scheduleChart();
}

/** Keep the newest text in view (unless the reader scrolled up to read). */
function scrollToEnd() {
  const box = $("conversation");
  box.scrollTop = box.scrollHeight;
}

function onEvent(event, user, reply) {
  if (event.error) throw new Error(String(event.error));
  if (event.vector_metadata) describeVectors(event.vector_metadata);
  if (event.status) setStatus(`${event.status}…`);
  if (event.token !== undefined) addToken(event, user, reply);
  if (event.done) {
    if (typeof event.full_response === "string") state.messages[reply].content = event.full_response;
    const reason = event.finish_reason ? ` (${event.finish_reason})` : "";
    const cached = Number.isInteger(event.cached_tokens) ? ` · ${event.cached_tokens} cached` : "";
    setStatus(`done${reason}${cached}`);
    return true;
  }
  return false;
}

async function stream(body, user, reply, signal) {
  const response = await fetch("/api/chat", {
    method: "POST", signal, body: JSON.stringify(body),
    headers: { "Content-Type": "application/json", Accept: "text/event-stream" },
  });
  if (!response.ok) throw new Error(await responseError(response));
  let finished = false;
  await readEvents(response.body, (event) => { finished = onEvent(event, user, reply) || finished; });
  if (!finished) throw new Error("the stream ended before the reply was finished");
}

async function send(text) {
  if (state.controller || !text.trim()) return;
  showError("");
  const steering = currentSteering();
  state.messages.push({ role: "user", content: text, start: null, end: null });
  const body = requestBody(steering);
  state.messages.push({ role: "assistant", content: "", start: null, end: null, steering });
  const user = state.messages.length - 2;
  const reply = user + 1;
  state.controller = new AbortController();
  renderTranscript();
  scrollToEnd();
  setStatus("sending…");
  try {
    await stream(body, user, reply, state.controller.signal);
  } catch (error) {
    finishFailed(error, reply);
  } finally {
    state.controller = null;
    saveConversation();
    renderTranscript();
    scheduleChart();
  }
}

function finishFailed(error, reply) {
  const message = state.messages[reply];
  if (error.name === "AbortError") {
    message.stopped = true;
    setStatus("stopped");
    return;
  }
  showError(error.message || String(error));
  setStatus("error");
  if (message.start == null && !message.content) unsend(reply - 1);
  else message.stopped = true;
}

/** A request that produced no reply: take its message back into the input box to retry. */
function unsend(user) {
  const { content, start } = state.messages[user];
  state.messages.length = user;
  if (start != null) state.tokens.length = start;
  if (!$("input").value) $("input").value = content;
}

function stop() {
  state.controller?.abort();
}

function clearConversation() {
  stop();
  state.messages = [];
  state.tokens = [];
  showError("");
  saveConversation();
  renderTranscript();
  scheduleChart();
  $("readout").textContent = "Hover a token to see its trait values.";
}

function updateButtons() {
  const busy = state.controller != null;
  $("send").disabled = busy;
  $("stop").disabled = !busy;
  for (const b of document.querySelectorAll(".msg .edit")) b.disabled = busy;
}

function setStatus(text) {
  const traits = state.traits.map((t) => `${t.trait} (L${t.layer} ${t.method})`).join(", ");
  $("status").textContent = `${text}${traits ? " · traits: " + traits : " · no traits"}`;
}

// ---------------------------------------------------------------- controls

function slider(trait, index) {
  const row = document.createElement("div");
  row.className = "slider";
  const name = document.createElement("span");
  name.className = "slider-name";
  name.textContent = trait.trait;
  name.style.color = COLOURS[index % COLOURS.length];
  const input = document.createElement("input");
  Object.assign(input, { type: "range", min: "-3", max: "3", step: "0.05" });
  input.value = String(state.prefs.steering[trait.trait] ?? 0);
  input.setAttribute("aria-label", `steering ${trait.trait}`);
  input.dataset.trait = trait.trait;
  const value = document.createElement("output");
  value.textContent = signed(Number(input.value));
  input.addEventListener("input", () => {
    state.prefs.steering[trait.trait] = Number(input.value);
    value.textContent = signed(Number(input.value));
    savePrefs();
  });
  const reset = button("0", "reset", () => {
    input.value = "0";
    input.dispatchEvent(new Event("input"));
  });
  row.append(name, input, value, reset);
  return row;
}

/** Where each trait's vector comes from, on hover over its slider's name. */
function describeVectors(metadata) {
  for (const name of document.querySelectorAll(".slider-name")) {
    const m = metadata[name.textContent];
    if (m) name.title = `layer ${m.layer} · ${m.method} · ${m.position}\n${m.source ?? ""}`;
  }
}

function renderSliders() {
  const rows = state.traits.map(slider);
  if (!rows.length) rows.push(note("This server has no trait vectors: nothing to steer."));
  $("sliders").replaceChildren(...rows);
}

async function loadTraits() {
  try {
    const response = await fetch("/api/traits");
    if (!response.ok) throw new Error(await responseError(response));
    const body = await response.json();
    const list = Array.isArray(body) ? body : body.traits ?? [];
    state.traits = list.filter((t) => t && typeof t.trait === "string");
    setStatus("ready");
  } catch (error) {
    showError(`could not load traits: ${error.message}`);
    setStatus("traits unavailable");
  }
  renderSliders();
  scheduleChart();
}

function bindSetting(id, key, parse) {
  const input = $(id);
  input.value = String(state.prefs[key]);
  input.addEventListener("change", () => {
    const value = parse(input.value);
    if (Number.isFinite(value)) state.prefs[key] = value;
    input.value = String(state.prefs[key]);
    savePrefs();
  });
}

function bindControls() {
  const input = $("input");
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = input.value;
    if (state.controller || !text.trim()) return;
    input.value = "";
    send(text);
  });
  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("composer").requestSubmit(); }
  });
  $("stop").addEventListener("click", stop);
  $("clear").addEventListener("click", clearConversation);
  $("smooth").checked = !!state.prefs.smooth;
  $("smooth").addEventListener("change", () => {
    state.prefs.smooth = $("smooth").checked; savePrefs(); scheduleChart();
  });
  $("metric").value = state.prefs.metric;
  $("metric").addEventListener("change", () => {
    state.prefs.metric = $("metric").value; savePrefs(); scheduleChart();
  });
  bindSetting("max-tokens", "maxTokens", (v) => Math.max(1, Math.round(Number(v))));
  bindSetting("temperature", "temperature", (v) => Math.max(0, Number(v)));
  $("conversation").addEventListener("mouseover", (e) => {
    const tok = e.target.closest?.(".tok");
    if (tok) showReadout(Number(tok.dataset.index));
  });
  window.addEventListener("resize", () => state.chart.resize());
}

function restore() {
  state.prefs = { ...state.prefs, ...load(PREFS_KEY, {}) };
  if (!["scores", "projections"].includes(state.prefs.metric)) state.prefs.metric = "scores";
  const saved = load(CONVERSATION_KEY, {});
  if (Array.isArray(saved.messages) && Array.isArray(saved.tokens)) {
    state.messages = saved.messages;
    state.tokens = saved.tokens;
  }
}

function init() {
  state.chart = new TraitChart($("chart"));
  restore();
  bindControls();
  renderTranscript();
  scrollToEnd();
  setStatus("loading traits");
  loadTraits();
}

init();
