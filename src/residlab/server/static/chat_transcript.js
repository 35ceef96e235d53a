// The Live Chat transcript: one block per message, one span per token (hover: its readouts).
// Every string here comes from the user or the server, so it is set with textContent only.

const fmt = (v) => (typeof v === "number" ? v.toFixed(4) : "–");
export const signed = (v) => (v > 0 ? "+" : "") + v.toFixed(2);

/** A token's identity and readouts, one line per trait. */
export function tokenTitle(t, index) {
  const lines = [`${JSON.stringify(t.text)}  id ${t.id} · index ${index}` +
    (t.prompt ? " · prompt" : " · generated") + (t.special ? " · special" : "")];
  for (const trait of Object.keys(t.scores ?? {})) {
    lines.push(`${trait}: cos ${fmt(t.scores[trait])} · proj ${fmt(t.projections?.[trait])}`);
  }
  return lines.join("\n");
}

export function tokenSpan(t, index) {
  const span = document.createElement("span");
  span.className = "tok" + (t.prompt ? " prompt" : " gen") + (t.special ? " special" : "");
  span.dataset.index = String(index);
  span.dataset.id = String(t.id);
  span.textContent = t.text;
  span.title = tokenTitle(t, index);
  if (/^\s+$/.test(t.text)) { // whitespace gets a visible sign drawn over it (the text stays)
    span.classList.add("ws", ...(t.text.includes("\n") ? ["nl"] : []));
    span.dataset.sym = t.text.replace(/\n/g, "\u21b5").replace(/\t/g, "\u2192")
      .replace(/ /g, "\u00b7").replace(/\r/g, "");
  }
  return span;
}

export function note(text) {
  const span = document.createElement("span");
  span.className = "note";
  span.textContent = text;
  return span;
}

export function button(text, className, onClick) {
  const b = document.createElement("button");
  b.type = "button";
  b.className = className;
  b.textContent = text;
  b.addEventListener("click", onClick);
  return b;
}

function messageNotes(message) {
  const notes = [];
  const steering = (message.steering ?? []).filter((s) => s.coefficient !== 0);
  if (steering.length) {
    notes.push(note("steering " + steering.map((s) => `${s.trait} ${signed(s.coefficient)}`)
      .join(", ")));
  }
  if (message.stopped) notes.push(note("stopped"));
  return notes;
}

/** Token spans when the message's tokens are known, else its plain text. */
export function fillBody(body, message, tokens) {
  body.replaceChildren();
  const { start, end } = message;
  if (start != null && end > start && end <= tokens.length) {
    body.dataset.mode = "tokens";
    for (let i = start; i < end; i++) body.append(tokenSpan(tokens[i], i));
  } else {
    body.dataset.mode = "text";
    body.textContent = message.content;
  }
}

/** One message: role, notes (steering, stopped), Edit for user messages, then its body. */
export function messageBlock(message, index, tokens, onEdit) {
  const block = document.createElement("div");
  block.className = `msg ${message.role}`;
  block.dataset.index = String(index);
  const head = document.createElement("div");
  head.className = "msg-head";
  const role = document.createElement("span");
  role.className = "role";
  role.textContent = message.role;
  head.append(role, ...messageNotes(message));
  if (message.role === "user") head.append(button("Edit", "edit", () => onEdit(index)));
  const body = document.createElement("div");
  body.className = "msg-body";
  fillBody(body, message, tokens);
  block.append(head, body);
  return block;
}
