// The atlake web console. No dependencies and no inline code (the page's Content-Security-Policy
// allows only this server's files); every value from the server reaches the page as text
// (textContent, text nodes), never as markup.
"use strict";

const TOKEN_KEY = "atlake.token"; // in sessionStorage: this tab only, gone when it closes
const SCHEMA_HEADER = "X-Atlake-Schema";
const PAGE_SIZE = 100;
const POLL_MS = 1000;
const HISTORY = 120; // points kept per series: two minutes at one poll a second
const COLORS = ["#1d5fbf", "#d9480f", "#2b8a3e", "#ae3ec9", "#e8a200", "#0c8599", "#c2255c", "#868e96"];
const NUMERIC = /^(U?Int\d+|Float\d+|Decimal\d*)\b/;

const $ = (id) => document.getElementById(id);

/** An element with attributes (skipped when null or false) and children (strings become text). */
function h(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") e.className = v;
    else e.setAttribute(k, v === true ? "" : String(v));
  }
  e.append(...children);
  return e;
}

const fmtInt = (n) => Math.round(n).toLocaleString("en-US");
const fmtNum = (n) => n.toLocaleString("en-US", { maximumFractionDigits: Math.abs(n) < 10 ? 2 : 1 });

/** A short axis label: 950, 1.2k, 3.4M… */
function fmtShort(n) {
  const a = Math.abs(n);
  for (const [d, s] of [[1e15, "P"], [1e12, "T"], [1e9, "G"], [1e6, "M"], [1e3, "k"]]) {
    if (a >= d) return (n / d).toLocaleString("en-US", { maximumFractionDigits: a / d < 10 ? 2 : 0 }) + s;
  }
  return fmtNum(n);
}

// ---- requests and the token -------------------------------------------------------------

/** An error answer of the server (`{error, message}`), or another failed request. */
class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

async function errorOf(r) {
  const text = await r.text().catch(() => "");
  try {
    const j = JSON.parse(text);
    if (j && typeof j.message === "string") return new ApiError(r.status, String(j.error || r.status), j.message);
  } catch {
    // not JSON: the text itself
  }
  return new ApiError(r.status, "http_" + r.status, text.trim() || r.statusText || "request failed");
}

const token = {
  get: () => sessionStorage.getItem(TOKEN_KEY),
  set(t) {
    sessionStorage.setItem(TOKEN_KEY, t);
    $("forget-token").hidden = false;
  },
  clear() {
    sessionStorage.removeItem(TOKEN_KEY);
    $("forget-token").hidden = true;
  },
};

let prompt = null; // the open token prompt, shared by every request refused meanwhile

/** Asks for the token; resolves to whether one was given. */
function askToken(why) {
  if (prompt) return prompt;
  prompt = new Promise((resolve) => {
    const dialog = $("token-dialog");
    $("token-error").textContent = why || "";
    $("token-error").hidden = !why;
    $("token-input").value = "";
    dialog.returnValue = "";
    dialog.addEventListener("close", () => {
      prompt = null;
      const t = $("token-input").value.trim();
      $("token-input").value = "";
      if (dialog.returnValue === "ok" && t) {
        token.set(t);
        resolve(true);
      } else {
        resolve(false);
      }
    }, { once: true });
    dialog.showModal();
    $("token-input").focus();
  });
  return prompt;
}

/** `fetch` with the token (a header, never the URL); a 401 asks for the token and tries again. */
async function api(path, init = {}) {
  for (;;) {
    const used = token.get();
    const headers = new Headers(init.headers);
    if (used) headers.set("Authorization", "Bearer " + used);
    const r = await fetch(path, { ...init, headers, cache: "no-store" });
    if (r.status !== 401) return r;
    const err = await errorOf(r);
    if (token.get() !== used) continue; // another request got a new token meanwhile
    if (used) token.clear();
    const why = used ? `The server refused that token: ${err.message}.` : "";
    if (!(await askToken(why))) throw err;
  }
}

// ---- the editor, examples and tables ------------------------------------------------------

function setSql(sql) {
  const ta = $("sql");
  ta.value = sql;
  ta.focus();
}

function insertAtCursor(text) {
  const ta = $("sql");
  ta.setRangeText(text, ta.selectionStart, ta.selectionEnd, "end");
  ta.focus();
}

const quoteIdent = (n) => (/^[a-z_][a-z0-9_]*$/.test(n) ? n : `"${n.replaceAll('"', '""')}"`);

async function loadExamples() {
  const list = $("examples");
  try {
    const r = await fetch("/console/examples", { cache: "no-store" });
    if (!r.ok) throw await errorOf(r);
    const examples = await r.json();
    list.replaceChildren(...examples.map((ex) => {
      const b = h("button", { type: "button", class: "example", title: ex.title, "data-name": ex.name },
        ex.name.replaceAll("_", " "));
      b.addEventListener("click", () => {
        setSql(ex.sql);
        runQuery();
      });
      return h("li", {}, b);
    }));
  } catch (e) {
    list.replaceChildren(h("li", { class: "muted" }, `examples unavailable: ${e.message}`));
  }
}

function tableItem(t) {
  const columns = h("ul", { class: "columns", hidden: true }, ...t.columns.map((c) => {
    const b = h("button", { type: "button", class: "column", title: `insert ${c.name}`, "data-name": c.name },
      c.name, h("span", { class: "type" }, c.nullable ? c.type : `${c.type} not null`));
    b.addEventListener("click", () => insertAtCursor(quoteIdent(c.name)));
    return h("li", {}, b);
  }));
  const toggle = h("button", { type: "button", class: "toggle", title: "columns", "aria-expanded": "false" }, "▸");
  toggle.addEventListener("click", () => {
    const open = columns.hidden;
    columns.hidden = !open;
    toggle.textContent = open ? "▾" : "▸";
    toggle.setAttribute("aria-expanded", String(open));
  });
  const name = h("button", { type: "button", class: "table-name", title: `query ${t.name}` }, t.name);
  name.addEventListener("click", () => setSql(`SELECT *\nFROM ${t.name}\nLIMIT 100;`));
  return h("li", { "data-table": t.name }, h("div", { class: "table-row" }, toggle, name), columns);
}

async function loadTables() {
  const status = $("tables-status");
  status.textContent = "loading…";
  try {
    const r = await api("/tables");
    if (!r.ok) throw await errorOf(r);
    const tables = await r.json();
    $("tables").replaceChildren(...tables.map(tableItem));
    status.textContent = `${tables.length} tables; a name writes a query, ▸ shows the columns`;
  } catch (e) {
    status.textContent = `tables unavailable: ${e.message}`;
  }
}

// ---- queries and results ------------------------------------------------------------------

let result = { sql: null, columns: [], rows: [], page: 0 };
let running = null; // the running query's AbortController

function setStatus(text) {
  $("status").textContent = text;
}

function showError(e) {
  const box = $("error");
  if (!e) {
    box.hidden = true;
    box.replaceChildren();
    return;
  }
  const code = e instanceof ApiError ? `${e.code} (${e.status})` : "error";
  box.replaceChildren(h("span", { class: "code" }, code), String(e.message || e));
  box.hidden = false;
}

function setRunning(on) {
  $("run").disabled = on;
  $("cancel").disabled = !on;
}

const RAW = typeof JSON.rawJSON === "function";

/** JSON with numbers kept as the server wrote them (integers beyond 2^53, a decimal's scale)
 * where the browser can. */
function parseJson(text) {
  return JSON.parse(text, (key, value, context) =>
    RAW && typeof value === "number" && context && context.source !== String(value) ? JSON.rawJSON(context.source) : value);
}

async function runQuery() {
  const sql = $("sql").value;
  if (!sql.trim()) return;
  running?.abort();
  const controller = new AbortController();
  running = controller;
  setRunning(true);
  showError(null);
  setStatus("Running…");
  const started = performance.now();
  try {
    const r = await api("/sql?format=json&schema=1", { method: "POST", body: sql, signal: controller.signal });
    if (!r.ok) throw await errorOf(r);
    let text;
    try {
      text = await r.text();
    } catch (e) {
      if (controller.signal.aborted) throw e;
      throw new Error(`the result stopped part way (a limit was reached or the server went away): ${e.message}`);
    }
    const rows = parseJson(text);
    const schema = r.headers.get(SCHEMA_HEADER);
    // the JSON leaves SQL NULLs out of each object: the schema says which columns there are
    const columns = schema ? JSON.parse(schema) : Object.keys(rows[0] || {}).map((name) => ({ name, type: "?" }));
    result = { sql, columns, rows, page: 0 };
    render();
    const ms = performance.now() - started;
    const names = columns.map((c) => c.name);
    const twice = [...new Set(names.filter((n, i) => names.indexOf(n) !== i))];
    setStatus(`${fmtInt(rows.length)} row${rows.length === 1 ? "" : "s"} in ${fmtInt(ms)} ms` +
      (twice.length ? ` · columns named twice (${twice.join(", ")}): give them aliases (AS) to see each` : ""));
  } catch (e) {
    if (running !== controller) return; // replaced by a newer query
    if (controller.signal.aborted) {
      setStatus("Cancelled.");
    } else {
      result = { sql: null, columns: [], rows: [], page: 0 };
      render();
      showError(e);
      setStatus("");
    }
  } finally {
    if (running === controller) {
      running = null;
      setRunning(false);
    }
  }
}

function cell(row, column, numeric, shadowed) {
  if (shadowed) {
    return h("td", { class: "shadowed", title: "another column has this name: the JSON result holds only its value" }, "?");
  }
  const v = Object.hasOwn(row, column.name) ? row[column.name] : null;
  if (v === null) return h("td", { class: "null", title: "SQL NULL" }, h("span", {}, "NULL"));
  const text = typeof v === "string" ? v : typeof v === "object" ? JSON.stringify(v) : String(v);
  return h("td", { class: numeric ? "num" : null, title: text.length > 60 ? text.slice(0, 4000) : null }, text);
}

function render() {
  const { columns, rows } = result;
  const table = $("result");
  const pages = Math.max(1, Math.ceil(rows.length / PAGE_SIZE));
  result.page = Math.min(Math.max(result.page, 0), pages - 1);
  const from = result.page * PAGE_SIZE;
  const slice = rows.slice(from, from + PAGE_SIZE);
  const numeric = columns.map((c) => NUMERIC.test(c.type));
  // two columns of one name (`a.n, b.n`) are one key in a JSON object: only the last has a value
  const shadowed = columns.map((c, i) => columns.findLastIndex((d) => d.name === c.name) !== i);
  table.tHead.replaceChildren(...(columns.length ? [h("tr", {}, ...columns.map((c, i) =>
    h("th", { class: numeric[i] ? "num" : null, title: `${c.name}: ${c.type}${c.nullable === false ? " not null" : ""}`,
      "data-type": c.type }, h("span", { class: "name" }, c.name), h("span", { class: "type" }, c.type))))] : []));
  table.tBodies[0].replaceChildren(...slice.map((row) =>
    h("tr", {}, ...columns.map((c, i) => cell(row, c, numeric[i], shadowed[i])))));
  table.dataset.rows = String(rows.length);
  table.dataset.page = String(result.page + 1);
  $("pager").hidden = !result.sql;
  $("page-info").textContent = rows.length
    ? `Rows ${fmtInt(from + 1)}–${fmtInt(from + slice.length)} of ${fmtInt(rows.length)} · page ${result.page + 1} of ${pages}`
    : "No rows";
  $("prev").disabled = result.page === 0;
  $("next").disabled = result.page >= pages - 1;
  $("dl-csv").disabled = $("dl-parquet").disabled = !result.sql;
}

function turnPage(by) {
  result.page += by;
  render();
  $("result").closest(".table-wrap").scrollTop = 0;
}

/** The last run query again in `format`, saved as a file. */
async function download(format, button) {
  if (!result.sql) return;
  button.disabled = true;
  setStatus(`Preparing the ${format.toUpperCase()} file…`);
  try {
    const r = await api(`/sql?format=${format}`, { method: "POST", body: result.sql });
    if (!r.ok) throw await errorOf(r);
    const blob = await r.blob();
    const stamp = new Date().toISOString().slice(0, 19).replace(/[-:]/g, "").replace("T", "-");
    const a = h("a", { href: URL.createObjectURL(blob), download: `atlake-${stamp}.${format}` });
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(a.href), 60_000);
    setStatus(`Saved ${a.download} (${fmtInt(blob.size)} bytes)`);
  } catch (e) {
    showError(e);
    setStatus("");
  } finally {
    button.disabled = false;
  }
}

// ---- the live page ------------------------------------------------------------------------

const CHARTS = [
  { id: "events", title: "Events/s by collection" },
  { id: "lag", title: "Lag: seconds behind the stream" },
  { id: "buffered", title: "Buffered rows (in memory, not yet in files)" },
  { id: "files", title: "Files written" },
  { id: "quarantine", title: "Quarantined inputs by reason", empty: "nothing quarantined so far" },
  { id: "checkpoint", title: "Checkpoint cursor", zero: false },
];
const TILES = [
  ["rate", "Events/s"], ["lag", "Lag (s)"], ["buffered", "Buffered rows"], ["files", "Files written"],
  ["quarantined", "Quarantined"], ["checkpoint", "Checkpoint cursor", "wide"], ["checkpoint-at", "Checkpoint written", "wide"],
];

const live = { gen: 0, timer: null, daemon: null, prev: null, polls: 0, series: new Map() };

/** Prometheus text as samples `{name, labels, value}`. */
function parseMetrics(text) {
  const out = [];
  for (const line of text.split("\n")) {
    const m = /^([A-Za-z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)/.exec(line);
    if (!m) continue;
    const labels = {};
    for (const l of (m[2] || "").matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) {
      labels[l[1]] = l[2].replace(/\\(.)/g, (_, c) => (c === "n" ? "\n" : c));
    }
    out.push({ name: m[1], labels, value: Number(m[3]) });
  }
  return out;
}

/** Sums of metric `name` per value of label `key`. */
function byLabel(samples, name, key) {
  const out = new Map();
  for (const s of samples) {
    if (s.name !== name) continue;
    const k = key ? s.labels[key] || "" : name;
    out.set(k, (out.get(k) || 0) + s.value);
  }
  return out;
}

const total = (map) => [...map.values()].reduce((a, b) => a + b, 0);

function push(chart, name, t, v) {
  if (!live.series.has(chart)) live.series.set(chart, new Map());
  const lines = live.series.get(chart);
  if (!lines.has(name)) lines.set(name, []);
  const points = lines.get(name);
  points.push([t, v]);
  while (points.length > HISTORY + 1) points.shift();
}

/** The series of a chart: the busiest few, the rest summed ("+N more"; atlake's own metrics
 * already name a collection "other"). */
function seriesOf(chart, keep = COLORS.length - 1) {
  const lines = [...(live.series.get(chart) || new Map())].map(([name, points]) => ({ name, points }));
  const weight = (s) => s.points.reduce((a, p) => a + p[1], 0);
  lines.sort((a, b) => weight(b) - weight(a) || a.name.localeCompare(b.name));
  if (lines.length <= keep + 1) return lines;
  const other = new Map();
  for (const s of lines.slice(keep)) for (const [t, v] of s.points) other.set(t, (other.get(t) || 0) + v);
  const rest = { name: `+${lines.length - keep} more`, points: [...other].sort((a, b) => a[0] - b[0]) };
  return [...lines.slice(0, keep), rest];
}

function buildLive() {
  $("tiles").replaceChildren(...TILES.map(([id, label, wide]) =>
    h("div", { class: wide ? "tile wide" : "tile" }, h("span", { class: "label" }, label), h("output", { id: `tile-${id}` }, "–"))));
  $("charts").replaceChildren(...CHARTS.map((c) =>
    h("figure", { class: "chart", id: `chart-${c.id}`, "data-points": "0" },
      h("figcaption", {}, c.title), h("canvas", { role: "img", "aria-label": c.title }), h("ul", { class: "legend" }))));
}

function tile(id, text) {
  $(`tile-${id}`).textContent = text;
}

function draw(spec) {
  const fig = $(`chart-${spec.id}`);
  const series = seriesOf(spec.id);
  const canvas = fig.querySelector("canvas");
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth || 380;
  const ht = canvas.clientHeight || 170;
  if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(ht * dpr)) {
    canvas.width = Math.round(w * dpr);
    canvas.height = Math.round(ht * dpr);
  }
  const g = canvas.getContext("2d");
  g.setTransform(dpr, 0, 0, dpr, 0, 0);
  g.clearRect(0, 0, w, ht);
  const css = getComputedStyle(document.documentElement);
  const muted = css.getPropertyValue("--muted").trim() || "#777";
  const grid = css.getPropertyValue("--line").trim() || "#ccc";
  const values = series.flatMap((s) => s.points.map((p) => p[1]));
  const now = Date.now();
  const t0 = now - HISTORY * POLL_MS;
  let lo = spec.zero === false && values.length ? Math.min(...values) : Math.min(0, ...values);
  let hi = Math.max(lo, ...values);
  if (hi - lo < 1e-9) {
    hi = lo + Math.max(1, Math.abs(lo) * 1e-6);
    lo -= spec.zero === false ? hi - lo : 0;
  }
  const [left, right, top, bottom] = [58, 8, 8, 18];
  const pw = w - left - right;
  const ph = ht - top - bottom;
  const x = (t) => left + ((t - t0) / (now - t0)) * pw;
  const y = (v) => top + ph - ((v - lo) / (hi - lo)) * ph;
  g.font = "11px system-ui, sans-serif";
  g.lineWidth = 1;
  g.strokeStyle = grid;
  g.fillStyle = muted;
  g.textAlign = "right";
  g.textBaseline = "middle";
  for (const f of [0, 0.5, 1]) {
    const v = lo + (hi - lo) * f;
    const yy = Math.round(y(v)) + 0.5;
    g.beginPath();
    g.moveTo(left, yy);
    g.lineTo(w - right, yy);
    g.stroke();
    // a chart off zero (a cursor) labels its advance: its values differ in the last digits
    g.fillText(spec.zero === false && f > 0 ? `+${fmtShort(v - lo)}` : fmtShort(v), left - 6, yy);
  }
  g.textBaseline = "alphabetic";
  g.fillText("now", w - right, ht - 3);
  g.textAlign = "left";
  g.fillText(`−${(HISTORY * POLL_MS) / 60000} min`, left, ht - 3);
  if (!values.length) {
    g.textAlign = "center";
    g.fillText(live.polls > 1 && spec.empty ? spec.empty : "waiting for data…", left + pw / 2, top + ph / 2);
  }
  g.save();
  g.beginPath();
  g.rect(left, top - 2, pw, ph + 4);
  g.clip();
  series.forEach((s, i) => {
    g.strokeStyle = g.fillStyle = COLORS[i % COLORS.length];
    g.lineWidth = 1.75;
    g.beginPath();
    s.points.forEach(([t, v], j) => (j ? g.lineTo(x(t), y(v)) : g.moveTo(x(t), y(v))));
    g.stroke();
    const last = s.points.at(-1);
    if (last) g.fillRect(x(last[0]) - 2, y(last[1]) - 2, 4, 4);
  });
  g.restore();
  fig.querySelector(".legend").replaceChildren(...series.map((s, i) => {
    const swatch = h("span", { class: "swatch" });
    swatch.style.backgroundColor = COLORS[i % COLORS.length]; // CSSOM, which the CSP allows
    const last = s.points.at(-1);
    return h("li", {}, swatch, `${s.name || "(none)"} `, h("b", {}, last ? fmtNum(last[1]) : "–"));
  }));
  fig.dataset.points = String(values.length);
}

/** One poll; false when there is no daemon to watch. */
async function poll() {
  if (live.daemon === null) {
    // `/filters` exists only where a daemon ingests
    const r = await api("/filters");
    if (r.status === 404) {
      const e = await errorOf(r);
      if (e.code !== "not_ingesting") throw e;
      live.daemon = false;
    } else if (!r.ok) {
      throw await errorOf(r);
    } else {
      live.daemon = true;
      buildLive();
    }
    $("no-daemon").hidden = live.daemon;
    $("live").hidden = !live.daemon;
    if (!live.daemon) return false;
  }
  const r = await api("/metrics");
  if (!r.ok) throw await errorOf(r);
  const samples = parseMetrics(await r.text());
  const now = Date.now();
  // events per collection (identity and account events have none: named by their kind)
  const events = new Map();
  for (const s of samples) {
    if (s.name !== "atlake_events_total") continue;
    const k = s.labels.collection || `#${s.labels.kind || "other"}`;
    events.set(k, (events.get(k) || 0) + s.value);
  }
  if (live.prev) {
    const dt = Math.max(0.001, (now - live.prev.t) / 1000);
    let rate = 0;
    for (const [k, v] of events) {
      const per = Math.max(0, (v - (live.prev.events.get(k) || 0)) / dt);
      rate += per;
      push("events", k, now, per);
    }
    tile("rate", fmtNum(rate));
  }
  live.prev = { t: now, events };
  const gauge = (name) => samples.find((s) => s.name === name)?.value;
  const lag = gauge("atlake_lag_seconds");
  if (lag !== undefined) {
    push("lag", "lag", now, lag);
    tile("lag", fmtNum(lag));
  }
  const buffered = gauge("atlake_buffered_rows");
  if (buffered !== undefined) {
    push("buffered", "rows", now, buffered);
    tile("buffered", fmtInt(buffered));
  }
  const files = byLabel(samples, "atlake_files_written_total", "table");
  push("files", "files", now, total(files));
  tile("files", fmtInt(total(files)));
  const quarantined = byLabel(samples, "atlake_quarantined_total", "reason");
  for (const [reason, n] of quarantined) push("quarantine", reason, now, n);
  tile("quarantined", fmtInt(total(quarantined)));
  const cursor = gauge("atlake_checkpoint_cursor");
  if (cursor !== undefined) {
    push("checkpoint", "checkpoint", now, cursor);
    tile("checkpoint", fmtInt(cursor));
  }
  if (live.polls % 2 === 0) await pollCheckpoint();
  live.polls += 1;
  CHARTS.forEach(draw);
  return true;
}

/** When the checkpoint was last written, from `system.checkpoint`. */
async function pollCheckpoint() {
  const r = await api("/sql?format=json", { method: "POST", body: "SELECT source, updated_at FROM system.checkpoint" });
  if (!r.ok) return;
  const rows = await r.json();
  tile("checkpoint-at", rows.length ? rows.map((x) => `${x.source} ${x.updated_at}`).join(", ") : "not yet");
}

function startLive() {
  const gen = ++live.gen;
  clearTimeout(live.timer);
  const tick = async () => {
    if (gen !== live.gen) return;
    let again = true;
    try {
      again = await poll();
      $("live-status").textContent = again
        ? `Updated ${new Date().toLocaleTimeString()} · every ${POLL_MS / 1000} s · ${live.polls} polls`
        : "";
    } catch (e) {
      $("live-status").textContent = `Cannot read the daemon's metrics: ${e.message}`;
      again = !(e instanceof ApiError && e.status === 401); // the prompt was cancelled
    }
    if (again && gen === live.gen) live.timer = setTimeout(tick, POLL_MS);
  };
  tick();
}

function stopLive() {
  live.gen += 1;
  clearTimeout(live.timer);
}

// ---- the page -----------------------------------------------------------------------------

function showTab(name) {
  for (const t of ["query", "live"]) {
    $(`tab-${t}`).setAttribute("aria-selected", String(t === name));
    $(`page-${t}`).hidden = t !== name;
  }
  if (location.hash !== `#${name}`) history.replaceState(null, "", `#${name}`);
  if (name === "live" && !document.hidden) startLive();
  else stopLive();
}

function init() {
  $("forget-token").hidden = !token.get();
  $("forget-token").addEventListener("click", () => token.clear());
  $("token-form").addEventListener("submit", (e) => {
    e.preventDefault();
    $("token-dialog").close("ok");
  });
  $("token-cancel").addEventListener("click", () => $("token-dialog").close("cancel"));
  $("editor-form").addEventListener("submit", (e) => {
    e.preventDefault();
    runQuery();
  });
  $("sql").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
      e.preventDefault();
      runQuery();
    }
  });
  $("cancel").addEventListener("click", () => running?.abort());
  $("prev").addEventListener("click", () => turnPage(-1));
  $("next").addEventListener("click", () => turnPage(1));
  $("dl-csv").addEventListener("click", (e) => download("csv", e.currentTarget));
  $("dl-parquet").addEventListener("click", (e) => download("parquet", e.currentTarget));
  $("tab-query").addEventListener("click", () => showTab("query"));
  $("tab-live").addEventListener("click", () => showTab("live"));
  window.addEventListener("hashchange", () => showTab(location.hash === "#live" ? "live" : "query"));
  document.addEventListener("visibilitychange", () => {
    if ($("page-live").hidden) return;
    if (document.hidden) stopLive();
    else startLive();
  });
  render();
  loadExamples();
  loadTables();
  showTab(location.hash === "#live" ? "live" : "query");
}

init();
