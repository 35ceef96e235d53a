// The prompt picker at the bottom of every view: the prompt set, its ids (50 per page, tags
// as classes, the note as a tooltip), the prompt and response as one span per token with the
// current token highlighted, and a token slider. Left/Right move the token (Shift: 10) when
// focus is not in a field. The token spans are built once per prompt (one DocumentFragment);
// a token move toggles a class on two spans only.

import { getJSON } from "./dash_api.js";
import { errorPanel, h, navigate, state, subscribe, update } from "./dash_state.js";

const PAGE = 50;
const SPECIAL = /^<\|.*\|>$|^<\/?s>$|^<(bos|eos|pad|unk)>$/;

/** ``tag-<tag>`` with everything but letters, digits, ``_`` and ``-`` turned into ``-``. */
export function tagClass(tag) {
  return `tag-${String(tag).toLowerCase().replace(/[^a-z0-9_-]+/g, "-")}`;
}

function inField(target) {
  if (!(target instanceof Element)) return false;
  return target.isContentEditable || ["INPUT", "TEXTAREA", "SELECT"].includes(target.tagName);
}

/** The picker in the page's ``#picker`` skeleton (see index.html). */
export class Picker {
  constructor(root) {
    this.root = root;
    this.$ = (id) => root.querySelector(`#${id}`);
    this.offset = 0;
    this.total = 0;
    this.spans = [];        // one span per token of the shown response
    this.response = null;
    this.current = -1;      // index of the span with .current
    this.spanRange = null;  // [start, end) highlighted as a Top Span
    this.listGen = 0;
    this.textGen = 0;
    this.scrollFrame = 0;
    this.bind();
    subscribe((changed) => this.changed(changed));
  }

  bind() {
    this.$("set-select").addEventListener("change", (e) => navigate({ set: e.target.value,
      id: "", token: -1 }));
    this.$("page-prev").addEventListener("click", () => this.page(-1));
    this.$("page-next").addEventListener("click", () => this.page(1));
    this.$("token-slider").addEventListener("input", (e) => this.move(Number(e.target.value)));
    this.$("token-text").addEventListener("click", (e) => {
      const span = e.target.closest?.(".tok");
      if (span) this.move(Number(span.dataset.i));
    });
    this.$("id-list").addEventListener("click", (e) => {
      const item = e.target.closest?.(".pid");
      if (item) update({ id: item.dataset.id, token: Number(item.dataset.promptEnd) });
    });
    document.addEventListener("keydown", (e) => this.key(e));
  }

  key(event) {
    if (!["ArrowLeft", "ArrowRight"].includes(event.key) || inField(event.target)) return;
    if (event.altKey || event.ctrlKey || event.metaKey || !this.response) return;
    event.preventDefault();
    const step = (event.key === "ArrowLeft" ? -1 : 1) * (event.shiftKey ? 10 : 1);
    this.move(state.token + step);
  }

  /** Select token ``index`` (clamped to the shown response). */
  move(index) {
    const n = this.response?.tokens?.length ?? 0;
    if (!n) return;
    update({ token: Math.max(0, Math.min(n - 1, index)) }, { history: "replace" });
  }

  /** Turn the id list to the page holding the prompt at ``index`` of the set (a URL may
   * name any prompt, not only one of the first page). */
  showPageOf(index) {
    if (!Number.isInteger(index) || index < 0) return;
    const offset = Math.floor(index / PAGE) * PAGE;
    if (offset === this.offset) return;
    this.offset = offset;
    this.loadList();
  }

  page(step) {
    const next = this.offset + step * PAGE;
    if (next < 0 || next >= this.total) return;
    this.offset = next;
    this.loadList();
  }

  changed(changed) {
    if (["exp", "variant", "set", "meta"].some((k) => changed.has(k))) {
      this.offset = 0;
      this.renderSets();
      this.loadList();
    } else if (changed.has("id")) {
      this.markActive();
    }
    if (["exp", "variant", "set", "id"].some((k) => changed.has(k))) this.loadText();
    else if (changed.has("token")) this.showToken();
    if (changed.has("span") || changed.has("id")) this.showSpan();
  }

  renderSets() {
    const select = this.$("set-select");
    const sets = state.meta?.prompt_sets?.[state.variant] ?? [];
    select.replaceChildren(...sets.map((s) => h("option", { value: s.name,
      text: `${s.name} (${s.n_prompts})${s.responses_from ? ` · from ${s.responses_from}` : ""}`,
    })));
    select.value = state.set;
    select.disabled = !sets.length;
  }

  async loadList() {
    const gen = ++this.listGen;
    const list = this.$("id-list");
    if (!state.exp || !state.variant || !state.set) {
      list.replaceChildren(h("li", { class: "note", text: "No prompt set." }));
      return;
    }
    const params = { exp: state.exp, variant: state.variant, set: state.set,
      offset: this.offset, limit: PAGE };
    try {
      const page = await getJSON("prompts", params);
      if (gen !== this.listGen) return;
      this.total = page.total ?? 0;
      list.replaceChildren(...(page.items ?? []).map((item) => this.item(item)));
      this.$("page-info").textContent = this.total
        ? `${this.offset + 1}–${Math.min(this.total, this.offset + PAGE)} of ${this.total}` : "0";
      this.$("page-prev").disabled = this.offset === 0;
      this.$("page-next").disabled = this.offset + PAGE >= this.total;
      this.markActive();
    } catch (error) {
      if (gen === this.listGen) list.replaceChildren(h("li", {}, errorPanel("the prompt list", error)));
    }
  }

  item(item) {
    const li = h("li", {}, h("button", {
      type: "button", class: "pid", title: item.note || null,
      data: { id: String(item.id), promptEnd: String(item.prompt_end ?? 0) },
    }, h("span", { class: "pid-id", text: String(item.id) }),
    h("span", { class: "pid-text", text: String(item.prompt ?? "") })));
    const button = li.firstChild;
    for (const tag of item.tags ?? []) button.classList.add(tagClass(tag));
    if (item.note) button.classList.add("has-note");
    return li;
  }

  markActive() {
    for (const button of this.$("id-list").querySelectorAll(".pid")) {
      button.classList.toggle("active", button.dataset.id === state.id);
      if (button.dataset.id === state.id) button.setAttribute("aria-current", "true");
      else button.removeAttribute("aria-current");
    }
  }

  async loadText() {
    const gen = ++this.textGen;
    const box = this.$("token-text");
    this.response = null;
    this.spans = [];
    this.current = -1;
    this.spanRange = null;
    if (!state.id) {
      box.replaceChildren(h("p", { class: "note", text: "No prompt selected." }));
      this.showToken();
      return;
    }
    const params = { exp: state.exp, variant: state.variant, set: state.set, id: state.id };
    try {
      const response = await getJSON("response", params);
      if (gen !== this.textGen) return;
      this.response = response;
      this.buildText(response);
      this.showPageOf(response.index);
    } catch (error) {
      if (gen === this.textGen) box.replaceChildren(errorPanel(`prompt ${state.id}`, error));
    }
    this.showToken();
    this.showSpan();
  }

  buildText(response) {
    const tokens = response.tokens ?? [];
    const promptEnd = response.prompt_end ?? 0;
    const fragment = document.createDocumentFragment();
    fragment.append(h("div", { class: "text-label", text: "prompt" }));
    for (let i = 0; i < tokens.length; i++) {
      if (i === promptEnd) fragment.append(h("div", { class: "text-label", text: "response" }));
      const text = String(tokens[i]);
      const span = document.createElement("span");
      span.className = i < promptEnd ? "tok p" : "tok r";
      if (SPECIAL.test(text)) span.classList.add("special");
      if (text.includes("\n")) {
        span.classList.add("nl"); // a visible sign before the line break (CSS ::before)
        span.dataset.sym = "↵";
      }
      span.textContent = text === "" ? "∅" : text;
      span.dataset.i = String(i);
      this.spans.push(span);
      fragment.append(span);
    }
    this.$("token-text").replaceChildren(fragment);
    const slider = this.$("token-slider");
    slider.max = String(Math.max(0, tokens.length - 1));
    if (tokens.length && (state.token < 0 || state.token >= tokens.length)) {
      const token = state.token < 0 ? Math.min(promptEnd, tokens.length - 1) : tokens.length - 1;
      update({ token }, { history: "replace" });
    }
  }

  showToken() {
    const slider = this.$("token-slider");
    const readout = this.$("token-readout");
    const n = this.spans.length;
    slider.disabled = !n;
    if (!n) {
      readout.textContent = "";
      return;
    }
    const index = Math.max(0, Math.min(n - 1, state.token));
    slider.value = String(index);
    if (this.current >= 0) this.spans[this.current]?.classList.remove("current");
    const span = this.spans[index];
    span.classList.add("current");
    this.current = index;
    const side = index < (this.response.prompt_end ?? 0) ? "prompt" : "response";
    readout.textContent = `token ${index} / ${n - 1} · ${side} · ${JSON.stringify(
      String(this.response.tokens[index]))}`;
    this.scrollTo(span);
  }

  /** Keep the current token visible inside the text box (without scrolling the page); in
   * the next frame, so that reading positions does not force a layout of every token now. */
  scrollTo(span) {
    cancelAnimationFrame(this.scrollFrame);
    this.scrollFrame = requestAnimationFrame(() => {
      const box = this.$("token-text");
      if (!span.isConnected) return;
      const top = span.getBoundingClientRect().top - box.getBoundingClientRect().top
        + box.scrollTop;
      if (top < box.scrollTop || top + span.offsetHeight > box.scrollTop + box.clientHeight) {
        box.scrollTop = Math.max(0, top - box.clientHeight / 3);
      }
    });
  }

  showSpan() {
    const want = state.span && state.span.id === state.id ? [state.span.start, state.span.end]
      : null;
    if (this.spanRange) {
      for (let i = this.spanRange[0]; i < this.spanRange[1]; i++) {
        this.spans[i]?.classList.remove("in-span");
      }
    }
    this.spanRange = this.spans.length ? want : null;
    if (this.spanRange) {
      for (let i = this.spanRange[0]; i < this.spanRange[1]; i++) {
        this.spans[i]?.classList.add("in-span");
      }
    }
  }
}
