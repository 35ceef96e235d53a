// Reading the dashboard's JSON API (GET /api/data/{endpoint}?params), or, in a static export
// (window.RESIDLAB_STATIC present), the same answers from data files loaded as classic
// scripts. One canonical key per request names it in both modes and in the in-memory cache:
// JSON.stringify([endpoint, [[key, value], ...]]) with the params sorted by key, all strings
// (Python: json.dumps([endpoint, sorted(params.items())], separators=(",", ":"),
// ensure_ascii=False)). Failures carry the server's one-line message.

const cache = new Map(); // canonical key -> Promise of the answer
const delivered = new Map(); // static mode: key -> payload put by a data file
const waiting = new Map(); // static mode: key -> [{resolve}]

/** A failed request: ``message`` is the server's one line, ``endpoint`` and ``status`` say
 * which request failed and how. */
export class ApiError extends Error {
  constructor(endpoint, message, status) {
    super(message);
    this.name = "ApiError";
    this.endpoint = endpoint;
    this.status = status;
  }
}

/** The request's canonical key (see the top of this file). */
export function canonicalKey(endpoint, params) {
  const pairs = Object.keys(params).sort().map((key) => [key, String(params[key])]);
  return JSON.stringify([endpoint, pairs]);
}

/** True in a static export: data comes from files, there is no server. */
export function isStatic() {
  return typeof window.RESIDLAB_STATIC === "object" && window.RESIDLAB_STATIC !== null;
}

function stringParams(params) {
  const out = {};
  for (const [key, value] of Object.entries(params)) {
    if (value !== undefined && value !== null) out[key] = String(value);
  }
  return out;
}

/** The answer to ``endpoint?params`` (cached: the same request is made once; a failure is
 * forgotten so that a later call tries again). */
export function getJSON(endpoint, params = {}) {
  const strings = stringParams(params);
  const key = canonicalKey(endpoint, strings);
  let pending = cache.get(key);
  if (!pending) {
    pending = isStatic() ? fromExport(key, endpoint, strings) : fromServer(endpoint, strings);
    cache.set(key, pending);
    pending.catch(() => cache.delete(key));
  }
  return pending;
}

async function errorLine(response) {
  try {
    const body = await response.json();
    if (typeof body?.error === "string") return body.error;
  } catch { /* not JSON */ }
  return `HTTP ${response.status} ${response.statusText}`.trim();
}

async function fromServer(endpoint, params) {
  const url = `/api/data/${encodeURIComponent(endpoint)}?${new URLSearchParams(params)}`;
  let response;
  try {
    response = await fetch(url, { headers: { Accept: "application/json" } });
  } catch (error) {
    throw new ApiError(endpoint, `the server did not answer (${error.message})`, 0);
  }
  if (!response.ok) {
    const hint = response.status === 401 ? " (open the page once as /?token=YOUR_TOKEN)" : "";
    throw new ApiError(endpoint, (await errorLine(response)) + hint, response.status);
  }
  return response.json();
}

function put(key, payload) {
  delivered.set(key, payload);
  for (const entry of waiting.get(key) ?? []) entry.resolve(payload);
  waiting.delete(key);
}

function describe(endpoint, params) {
  const shown = Object.entries(params).map(([k, v]) => `${k}=${v}`).join(" ");
  return shown ? `${endpoint} (${shown})` : endpoint;
}

function fromExport(key, endpoint, params) {
  window.RESIDLAB_STATIC_PUT = put;
  if (delivered.has(key)) return Promise.resolve(delivered.get(key));
  const file = window.RESIDLAB_STATIC.index?.[key];
  if (typeof file !== "string") {
    return Promise.reject(new ApiError(endpoint,
      `${describe(endpoint, params)} is not in this export`, 404));
  }
  return new Promise((resolve, reject) => {
    const entries = waiting.get(key) ?? [];
    entries.push({ resolve });
    waiting.set(key, entries);
    const script = document.createElement("script");
    script.src = file;
    script.addEventListener("error", () => reject(new ApiError(endpoint,
      `could not load ${file} of this export`, 0)));
    script.addEventListener("load", () => {
      if (!delivered.has(key)) {
        reject(new ApiError(endpoint, `${file} does not hold ${describe(endpoint, params)}`, 0));
      }
      script.remove();
    });
    document.head.append(script);
  });
}

const LITTLE_ENDIAN = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;

/** A little-endian float32 base64 string (the API's ``*_b64`` fields) as a Float32Array. */
export function floats(b64) {
  if (!b64) return new Float32Array(0);
  const text = atob(b64);
  const bytes = new Uint8Array(text.length);
  for (let i = 0; i < text.length; i++) bytes[i] = text.charCodeAt(i);
  const n = bytes.length >> 2;
  if (LITTLE_ENDIAN) return new Float32Array(bytes.buffer, 0, n);
  const view = new DataView(bytes.buffer);
  return Float32Array.from({ length: n }, (_, i) => view.getFloat32(4 * i, true));
}
