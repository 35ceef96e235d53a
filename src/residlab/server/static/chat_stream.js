// Reading the Live Chat stream: server-sent events from a fetch body, and failed answers as
// one line of text. Events may be cut anywhere by the network (inside a UTF-8 character,
// between CR and LF); the parser only acts on whole lines and whole events.

/** A server-sent-events parser: feed decoded text in any pieces; onData gets each event's data. */
export function sseParser(onData) {
  let buffer = "";
  let data = [];
  const line = (text) => {
    if (text === "") {
      if (data.length) onData(data.join("\n"));
      data = [];
    } else if (!text.startsWith(":")) {
      const colon = text.indexOf(":");
      const field = colon < 0 ? text : text.slice(0, colon);
      let value = colon < 0 ? "" : text.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (field === "data") data.push(value);
    }
  };
  return (chunk) => {
    buffer += chunk;
    // A "\r" at the end may be the first half of "\r\n": keep it until the next piece.
    const cut = buffer.endsWith("\r") ? buffer.length - 1 : buffer.length;
    const lines = buffer.slice(0, cut).split(/\r\n|\r|\n/);
    buffer = lines.pop() + buffer.slice(cut);
    lines.forEach(line);
  };
}

/** Read a fetch body to its end, handing each event's parsed JSON to onEvent. */
export async function readEvents(body, onEvent) {
  const reader = body.getReader();
  const decoder = new TextDecoder(); // stream mode keeps a character split across chunks whole
  const feed = sseParser((data) => onEvent(JSON.parse(data)));
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      feed(decoder.decode(value, { stream: true }));
    }
    feed(decoder.decode());
  } catch (error) {
    reader.cancel().catch(() => {}); // an error event or a bad line: stop reading the stream
    throw error;
  }
}

/** A one-line message from a failed response: its JSON error/detail, else its status. */
export async function responseError(response) {
  let detail = "";
  try {
    const body = await response.json();
    detail = body.error ?? body.detail ?? "";
    if (typeof detail !== "string") detail = JSON.stringify(detail);
  } catch { /* not JSON */ }
  const hint = response.status === 401 ? " (open this page as /chat?token=YOUR_TOKEN)" : "";
  return `HTTP ${response.status}${detail ? ": " + detail : ""}${hint}`;
}

