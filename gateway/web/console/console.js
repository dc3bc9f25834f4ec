// The pgqg query console. It uses only the gateway's public HTTP API, with
// relative URLs, so it works wherever the gateway is mounted. Nothing here ever
// parses a value as HTML: every text goes into the page through textContent
// (and the page's Content-Security-Policy enforces it with Trusted Types).

"use strict";

/** Rows put into the table; a larger result is counted, and downloadable as CSV. */
const SHOWN_ROWS = 1000;
/** Query-string keys of GET /v1/queries/{name} that are options, not parameters. */
const RESERVED_KEYS = new Set(["format", "shape", "timeout_ms", "max_rows"]);
/** Events kept in the Listen panel's list; older ones leave it (the counter counts all). */
const SHOWN_EVENTS = 500;

const $ = (id) => document.getElementById(id);
const ui = {
  sql: $("sql"),
  backdrop: $("backdrop"),
  params: $("params"),
  form: $("sql-form"),
  stream: $("stream"),
  stop: $("stop"),
  csv: $("csv"),
  status: $("status"),
  error: $("error"),
  result: $("result"),
  tokenBox: $("token-box"),
  token: $("token"),
  catalogStatus: $("catalog-status"),
  catalogList: $("catalog-list"),
  listenForm: $("listen-form"),
  listenChannels: $("listen-channels"),
  unsubscribe: $("unsubscribe"),
  listenClear: $("listen-clear"),
  listenStatus: $("listen-status"),
  listenError: $("listen-error"),
  listenEvents: $("listen-events"),
};

/** An element with attributes and children (strings become text nodes, never HTML). */
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === false || value === null || value === undefined) continue;
    if (name === "class") node.className = value;
    else if (name === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  node.append(...children.filter((child) => child !== null && child !== undefined));
  return node;
}

// --- JSON as the API wrote it ------------------------------------------------------
// A value is shown exactly as the API sent it: numbers keep their digits and
// form (1.5e-07, 1.10 inside json), json values their spelling. JSON.parse would
// reformat them, so rows are scanned for where each value starts and ends, and
// only strings are decoded.

function skipSpace(text, i) {
  while (i < text.length) {
    const c = text.charCodeAt(i);
    if (c !== 32 && c !== 9 && c !== 10 && c !== 13) break;
    i++;
  }
  return i;
}

function stringEnd(text, i) {
  for (i++; i < text.length; i++) {
    const c = text.charCodeAt(i);
    if (c === 92) i++; // a backslash escapes the next character
    else if (c === 34) return i + 1;
  }
  throw new SyntaxError("unterminated string in the answer");
}

const SCALAR_END = /[^,\]}\s]*/y;

/** Where the JSON value starting at `i` ends. */
function valueEnd(text, i) {
  const c = text[i];
  if (c === '"') return stringEnd(text, i);
  if (c === "{" || c === "[") {
    let depth = 0;
    for (; i < text.length; i++) {
      const ch = text[i];
      if (ch === '"') i = stringEnd(text, i) - 1;
      else if (ch === "{" || ch === "[") depth++;
      else if (ch === "}" || ch === "]") {
        depth--;
        if (depth === 0) return i + 1;
      }
    }
    throw new SyntaxError("unterminated value in the answer");
  }
  SCALAR_END.lastIndex = i;
  SCALAR_END.exec(text);
  return SCALAR_END.lastIndex;
}

/**
 * Walks the array or object at `i` (closed by `close`): `item` reads each
 * element (a value, or a key, colon and value) from where it starts and
 * returns where it ends. Returns where the container ends.
 */
function walk(text, i, close, item) {
  i = skipSpace(text, i + 1);
  if (text[i] === close) return i + 1;
  for (;;) {
    i = skipSpace(text, item(i));
    if (text[i] === close) return i + 1;
    i = skipSpace(text, i + 1); // the comma
  }
}

/** The items of the array at `i`: [[start, end], ...], and where it ends. */
function arrayItems(text, i) {
  const items = [];
  const end = walk(text, i, "]", (start) => {
    const stop = valueEnd(text, start);
    items.push([start, stop]);
    return stop;
  });
  return { items, end };
}

/** The members of the object at `i`, in order: [[key, start, end], ...]. */
function objectMembers(text, i) {
  const members = [];
  const end = walk(text, i, "}", (at) => {
    const keyEnd = stringEnd(text, at);
    const start = skipSpace(text, skipSpace(text, keyEnd) + 1); // past the colon
    const stop = valueEnd(text, start);
    members.push([JSON.parse(text.slice(at, keyEnd)), start, stop]);
    return stop;
  });
  return { members, end };
}

/** Where the value at `path` (keys and indexes) of the JSON `text` starts. */
function locate(text, path) {
  let i = skipSpace(text, 0);
  for (const step of path) {
    if (typeof step === "number") i = arrayItems(text, i).items[step][0];
    else i = objectMembers(text, i).members.find(([key]) => key === step)[1];
  }
  return i;
}

/** A cell as shown: its text and its kind (string, number, bool, null, json). */
function cell(raw) {
  const c = raw[0];
  if (c === '"') return { text: JSON.parse(raw), kind: "string" };
  if (c === "n") return { text: "NULL", kind: "null" };
  if (c === "t" || c === "f") return { text: raw, kind: "bool" };
  if (c === "[" || c === "{") return { text: raw, kind: "json" };
  return { text: raw, kind: "number" };
}

// --- the result table ----------------------------------------------------------

/** A table being filled: a header of columns, then rows of cells (raw JSON texts). */
class ResultTable {
  constructor(columns) {
    this.tbody = el("tbody");
    this.shown = 0;
    this.head = el("tr");
    this.table = el("table", { class: "rows" }, el("thead", {}, this.head), this.tbody);
    this.columns = [];
    if (columns) this.setColumns(columns);
    ui.result.replaceChildren(this.table);
  }

  /** Columns as [{name, type}]; type may be null (a stream does not say). */
  setColumns(columns) {
    this.columns = columns;
    this.head.replaceChildren(
      ...columns.map(({ name, type }) =>
        el("th", { scope: "col" }, el("span", { class: "name" }, name),
          type ? el("span", { class: "type" }, type) : null),
      ),
    );
  }

  /** Adds a row of raw JSON values; false once `SHOWN_ROWS` are shown. */
  add(raws) {
    if (this.shown >= SHOWN_ROWS) return false;
    const tr = el("tr");
    for (const raw of raws) {
      const { text, kind } = cell(raw);
      tr.append(el("td", { class: kind, title: text.length > 40 ? text : null }, text));
    }
    this.tbody.append(tr);
    this.shown++;
    return true;
  }

  /** Says below the table how many rows it leaves out. */
  note(total) {
    if (total > this.shown) {
      const more = `Showing the first ${this.shown.toLocaleString()} of ` +
        `${total.toLocaleString()} rows; Download CSV has them all.`;
      ui.result.append(el("p", { class: "muted note" }, more));
    }
  }
}

// --- status, errors and the editor's error mark --------------------------------

/** What a status line starts with: the named query's name, or nothing for the editor's SQL. */
function prefix(label) {
  return label ? `${label}: ` : "";
}

function setStatus(...parts) {
  ui.status.replaceChildren(...parts);
}

/** The row counter of a run: the exact count in data-rows, shown with separators. */
function counter(rows) {
  return el("output", { id: "row-count", dataset: { rows: String(rows) } }, rows.toLocaleString());
}

function clearError() {
  ui.error.hidden = true;
  ui.error.replaceChildren();
  markError(null);
}

/**
 * Shows an API error ({code, message, sqlstate, position, …}) in `box` (the
 * SQL's error box unless told); `inEditor` marks the position in the editor.
 */
function showError(error, { inEditor = false, box = ui.error } = {}) {
  const facts = [
    ["SQLSTATE", error.sqlstate],
    ["detail", error.detail],
    ["hint", error.hint],
  ];
  let where = null;
  if (inEditor && error.position) where = markError(error.position);
  box.replaceChildren(
    el("p", { class: "message" },
      el("span", { class: "code" }, error.code || "error"), " ", error.message || ""),
    el("dl", {}, ...facts.filter(([, value]) => value).flatMap(([name, value]) => [
      el("dt", {}, name), el("dd", { class: name === "SQLSTATE" ? "sqlstate" : null }, value),
    ]),
    ...(where ? [el("dt", {}, "position"), el("dd", {}, where)] : [])),
  );
  box.hidden = false;
}

const WORD = /[\p{L}\p{N}_$]/u;

/**
 * Marks the word PostgreSQL's 1-based `position` points at (it counts
 * characters, where JavaScript counts UTF-16 units) and puts the caret there,
 * or clears the mark. Returns where it is, as "line L, column C".
 */
function markError(position) {
  const text = ui.sql.value;
  if (!position) {
    ui.backdrop.replaceChildren(text + "\n");
    return null;
  }
  const chars = Array.from(text);
  const at = Math.min(position - 1, chars.length);
  let stop = at;
  if (WORD.test(chars[at] ?? "")) while (WORD.test(chars[stop] ?? "")) stop++;
  else if (chars[at] !== undefined && chars[at] !== "\n") stop++;
  const before = chars.slice(0, at).join("");
  // the end of a line or of the text is marked with a space put in its place
  const marked = stop > at ? chars.slice(at, stop).join("") : " ";
  ui.backdrop.replaceChildren(before, el("mark", { id: "error-mark" }, marked),
    chars.slice(stop).join("") + "\n");
  ui.sql.focus();
  ui.sql.setSelectionRange(before.length, before.length);
  const lines = before.split("\n");
  return `line ${lines.length}, column ${Array.from(lines.at(-1)).length + 1}`;
}

function syncBackdrop() {
  ui.backdrop.scrollTop = ui.sql.scrollTop;
  ui.backdrop.scrollLeft = ui.sql.scrollLeft;
}

// --- the API ------------------------------------------------------------------

/** Headers of every call: the token, when one was entered. */
function authHeaders(headers = {}) {
  const token = ui.token.value.trim();
  return token ? { ...headers, Authorization: `Bearer ${token}` } : headers;
}

/** A request: {method, url, body?}; `signal` aborts it (and its query). */
async function call(request, { signal, format } = {}) {
  const url = format ? withFormat(request.url, format) : request.url;
  const init = { method: request.method, signal, headers: authHeaders() };
  if (request.body !== undefined) {
    init.body = JSON.stringify(request.body);
    init.headers["Content-Type"] = "application/json";
  }
  const response = await fetch(url, init);
  if (response.status === 401 && response.headers.has("WWW-Authenticate")) showTokenField();
  return response;
}

function withFormat(url, format) {
  return url + (url.includes("?") ? "&" : "?") + "format=" + format;
}

/** The error of a failed answer, in the API's shape even when the body is not. */
async function errorOf(response) {
  const text = await response.text();
  try {
    const body = JSON.parse(text);
    if (body && body.error) return body.error;
  } catch {
    // not the API's JSON: a proxy's page, say
  }
  return { code: `HTTP ${response.status}`, message: response.statusText || text.slice(0, 200) };
}

function showTokenField() {
  if (ui.tokenBox.hidden) {
    ui.tokenBox.hidden = false;
    ui.token.focus();
  }
}

/** Identity is configured when the API description declares a security scheme. */
async function detectIdentity() {
  try {
    const response = await fetch("openapi.json");
    if (!response.ok) return;
    const schemes = (await response.json()).components?.securitySchemes;
    if (schemes && Object.keys(schemes).length) showTokenField();
  } catch {
    // no description, no token field: a 401 still shows it
  }
}

// --- runs -----------------------------------------------------------------------

let running = null; // the AbortController of the run under way

function begin() {
  if (running) running.abort();
  const controller = new AbortController();
  running = controller;
  ui.stop.disabled = false;
  clearError();
  return controller;
}

function end(controller) {
  if (running === controller) {
    running = null;
    ui.stop.disabled = true;
  }
}

/**
 * Runs `request` and shows its answer. `stream` asks for NDJSON; `rowsAt` is
 * where the result sits in a JSON answer; `inEditor` marks errors in the editor.
 */
async function run(request, { stream = false, rowsAt = [], inEditor = false, label = "" } = {}) {
  const controller = begin();
  const started = performance.now();
  setStatus(el("span", { class: "busy" }, `${prefix(label)}Running`));
  try {
    const response = await call(request, {
      signal: controller.signal,
      format: stream ? "ndjson" : null,
    });
    if (!response.ok) {
      showError(await errorOf(response), { inEditor });
      setStatus(`${prefix(label)}Failed (HTTP ${response.status}).`);
      ui.result.replaceChildren();
      return;
    }
    if (stream) await showStream(response, controller, started, { inEditor, label });
    else showResult(await response.text(), rowsAt, started, label);
  } catch (error) {
    if (error.name === "AbortError") {
      // Stop (not a newer run): the gateway cancels the query of a request that went away
      if (running === controller) setStatus(`${prefix(label)}Stopped; the query was cancelled.`);
      return;
    }
    showError({ code: "network", message: String(error.message || error) });
    setStatus(`${prefix(label)}Failed.`);
  } finally {
    end(controller);
  }
}

/** A buffered JSON answer: columns with types, rows shown as sent. */
function showResult(text, rowsAt, started, label) {
  const body = rowsAt.reduce((value, step) => value[step], JSON.parse(text));
  const table = new ResultTable(body.columns);
  const rowsStart = locate(text, [...rowsAt, "rows"]);
  for (const [start, end] of arrayItems(text, rowsStart).items) {
    if (!table.add(arrayItems(text, start).items.map(([a, b]) => text.slice(a, b)))) break;
  }
  const rows = body.row_count;
  table.note(body.rows.length);
  const ms = (performance.now() - started).toFixed(0);
  setStatus(
    `${prefix(label)}${body.command || "OK"} · `, counter(rows), rows === 1 ? " row" : " rows",
    body.truncated ? " (cut at the gateway's max_rows: stream or download CSV for all)" : "",
    ` · ${ms} ms`,
  );
}

/**
 * An NDJSON stream: rows counted as they arrive, the first `SHOWN_ROWS` shown.
 * A stream that fails midway ends with an {"error": …} line and is cut short;
 * each line is held back until the next one shows it was a row.
 *
 * The body is read directly, with a read always waiting: when the cut errors
 * the body stream, chunks it still holds unread are dropped (the Streams
 * standard), and with them the error line. A TextDecoderStream in between
 * would hold chunks of its own.
 */
async function showStream(response, controller, started, { inEditor, label }) {
  const table = new ResultTable(null);
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let rows = 0;
  let pending = null; // the last complete line, not yet known to be a row
  let partial = "";
  // the counter is redrawn at most every 50 ms, and always after the last rows
  // that came (the next ones may take a while)
  let painted = 0;
  let repaint = null;
  const paint = () => {
    clearTimeout(repaint);
    repaint = null;
    setStatus(el("span", { class: "busy" }, `${prefix(label)}Streaming`), " · ", counter(rows), " rows");
    painted = performance.now();
  };
  const addRow = (line) => {
    const { members } = objectMembers(line, skipSpace(line, 0));
    if (rows === 0) table.setColumns(members.map(([name]) => ({ name, type: null })));
    table.add(members.map(([, a, b]) => line.slice(a, b)));
    rows++;
  };
  paint();
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      const lines = (partial + decoder.decode(value, { stream: true })).split("\n");
      partial = lines.pop();
      for (const line of lines) {
        if (pending !== null) addRow(pending);
        pending = line;
      }
      if (performance.now() - painted > 50) paint();
      else repaint ??= setTimeout(paint, 50);
    }
  } catch (error) {
    clearTimeout(repaint);
    if (running !== controller) return; // a newer run took over the page
    const failed = pending !== null ? streamError(pending) : null;
    if (failed) {
      showError(failed, { inEditor });
    } else if (controller.signal.aborted) {
      if (pending !== null) addRow(pending);
      setStatus(`${prefix(label)}Stopped after `, counter(rows), " rows; the query was cancelled.");
      table.note(rows);
      return;
    } else {
      if (pending !== null) addRow(pending);
      showError({ code: "network", message: `the stream was cut: ${error.message}` });
    }
    setStatus(`${prefix(label)}Failed after `, counter(rows), " rows.");
    table.note(rows);
    return;
  }
  clearTimeout(repaint);
  if (pending !== null) addRow(pending);
  const ms = (performance.now() - started).toFixed(0);
  setStatus(`${prefix(label)}Streamed `, counter(rows), rows === 1 ? " row" : " rows", ` · ${ms} ms`);
  table.note(rows);
}

/** The error of a stream's last line, if it is one. */
function streamError(line) {
  try {
    const value = JSON.parse(line);
    const error = value?.error;
    if (error && typeof error === "object" && "code" in error) return error;
  } catch {
    // a row cut in the middle
  }
  return null;
}

/** Runs `request` as CSV and saves the answer as `filename`. */
async function download(request, filename, { inEditor = false } = {}) {
  const controller = begin();
  setStatus(el("span", { class: "busy" }, "Downloading"), ` ${filename}`);
  try {
    const response = await call(request, { signal: controller.signal, format: "csv" });
    if (!response.ok) {
      showError(await errorOf(response), { inEditor });
      setStatus(`${filename} failed (HTTP ${response.status}).`);
      return;
    }
    const blob = await response.blob();
    const url = URL.createObjectURL(blob);
    const link = el("a", { href: url, download: filename, hidden: true });
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60_000);
    setStatus(`${filename} saved (${blob.size.toLocaleString()} bytes).`);
  } catch (error) {
    if (error.name === "AbortError") {
      setStatus(`${filename} stopped.`);
    } else {
      showError({ code: "network", message: `the download was cut: ${error.message}` });
      setStatus(`${filename} failed.`);
    }
  } finally {
    end(controller);
  }
}

// --- the SQL editor and its parameters -----------------------------------------

/** Parameter inputs for $1 … $n of the statement, keeping what was typed. */
function renderParams(values = null) {
  const highest = Math.max(0, ...Array.from(ui.sql.value.matchAll(/\$(\d+)/g), (m) => +m[1]));
  const count = Math.min(highest, 100);
  if (values === null && count === ui.params.children.length) return; // typing, same $n
  const old = values ?? paramValues();
  const rows = [];
  for (let n = 1; n <= count; n++) {
    const value = old[n - 1];
    rows.push(el("label", { class: "param" },
      el("span", { class: "pname" }, `$${n}`),
      el("input", { type: "text", "data-param": n, value: value ?? "", disabled: value === null }),
      el("label", { class: "check" },
        el("input", { type: "checkbox", "data-null": n, checked: value === null }), " NULL")));
  }
  ui.params.replaceChildren(...rows);
}

/** The parameters as the API takes them: strings (PostgreSQL parses them), or null. */
function paramValues() {
  return Array.from(ui.params.querySelectorAll("input[data-param]"), (input) =>
    input.disabled ? null : input.value);
}

function editorRequest(shape) {
  return { method: "POST", url: "v1/query", body: { sql: ui.sql.value, params: paramValues(), shape } };
}

function runEditor() {
  if (!ui.sql.value.trim()) return;
  setFragment([["sql", ui.sql.value], ...paramValues().map((v) => ["p", v ?? ""])]);
  const stream = ui.stream.checked;
  run(editorRequest(stream ? "objects" : "arrays"), { stream, inEditor: true });
}

/** A link's statement runs read-only, whatever the gateway's raw SQL mode. */
function runLinkedSql() {
  const statement = { sql: ui.sql.value, params: paramValues() };
  const request = {
    method: "POST",
    url: "v1/transaction",
    body: { statements: [statement], read_only: true, shape: "arrays" },
  };
  run(request, { rowsAt: ["results", 0], inEditor: true, label: "Link, read-only" });
}

// --- the named-query catalogue ---------------------------------------------------

const namedForms = new Map(); // name -> {query, form}

async function loadCatalog() {
  ui.catalogStatus.textContent = "Loading…";
  try {
    const response = await call({ method: "GET", url: "v1/queries" });
    if (!response.ok) {
      const error = await errorOf(response);
      ui.catalogStatus.textContent = `${error.code}: ${error.message}`;
      return;
    }
    const { queries } = await response.json();
    namedForms.clear();
    ui.catalogList.replaceChildren(...queries.map(queryForm));
    ui.catalogStatus.textContent = queries.length
      ? `${queries.length} queries; each runs with the values you give.`
      : "This gateway has no named queries.";
  } catch (error) {
    ui.catalogStatus.textContent = `Could not load the catalogue: ${error.message}`;
  }
}

/** A form for one named query: one input per parameter. */
function queryForm(query) {
  const inputs = query.params.map(({ name, type }) => {
    const input = isBool(type)
      ? el("select", { name }, el("option", { value: "true" }, "true"),
        el("option", { value: "false" }, "false"))
      : el("input", { type: "text", name, placeholder: isJson(type) ? "JSON" : type });
    return el("label", { class: "param" },
      el("span", { class: "pname" }, name), el("span", { class: "type" }, type), input,
      el("label", { class: "check" }, el("input", { type: "checkbox", "data-null": name }), " NULL"));
  });
  const csv = el("button", { type: "button" }, "CSV");
  const edit = el("button", { type: "button", title: "Copy its SQL into the editor" }, "SQL");
  const form = el("form", { class: "named", "data-query": query.name },
    ...inputs,
    el("div", { class: "actions" }, el("button", { type: "submit", class: "primary" }, "Run"), csv, edit));
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    runNamed(query.name);
  });
  form.addEventListener("change", (event) => {
    const name = event.target.dataset.null;
    if (name) field(form, name).disabled = event.target.checked;
  });
  csv.addEventListener("click", () => {
    const request = namedRequest(query, form, "arrays");
    if (request) download(request, `${query.name}.csv`);
  });
  edit.addEventListener("click", () => {
    ui.sql.value = query.sql;
    renderParams(query.params.map(({ name }) => {
      const input = field(form, name);
      return input.disabled ? null : input.value;
    }));
    markError(null);
    ui.sql.focus();
  });
  namedForms.set(query.name, { query, form });
  return el("details", { class: "query" },
    el("summary", {}, el("code", {}, query.name),
      query.read_only ? null : el("span", { class: "badge" }, "writes")),
    query.doc ? el("p", { class: "doc" }, query.doc) : null,
    form);
}

const isBool = (type) => /^bool(ean)?$/i.test(type);
const isJson = (type) => /^jsonb?$/i.test(type) || type.endsWith("[]");

/** The form's input of parameter `name` (form.elements would also find its properties). */
function field(form, name) {
  return form.querySelector(`[name="${CSS.escape(name)}"]`);
}

/**
 * The request of a named query with the form's values, rows in `shape`. A
 * read-only query is a GET: its values are text, which the gateway converts
 * by the parameters' types. Others are a POST, whose json, array and bool
 * values are JSON; null when one is not (the error is shown).
 */
function namedRequest(query, form, shape) {
  const url = `v1/queries/${encodeURIComponent(query.name)}`;
  const text = Object.fromEntries(query.params.map(({ name }) => {
    const input = field(form, name);
    return [name, input.disabled ? null : input.value];
  }));
  const get = query.read_only &&
    Object.entries(text).every(([name, value]) => value !== null && !RESERVED_KEYS.has(name));
  if (get) {
    const search = new URLSearchParams({ ...text, shape });
    return { method: "GET", url: `${url}?${search}`, values: text };
  }
  const values = {};
  for (const { name, type } of query.params) {
    values[name] = text[name];
    if (text[name] === null || !(isJson(type) || isBool(type))) continue;
    try {
      values[name] = JSON.parse(text[name]);
    } catch {
      showError({ code: "bad_request", message: `${name} (${type}) must be JSON: ${text[name]}` });
      return null;
    }
  }
  return { method: "POST", url, body: { params: values, shape }, values: text };
}

function runNamed(name) {
  const { query, form } = namedForms.get(name);
  const stream = ui.stream.checked;
  const request = namedRequest(query, form, stream ? "objects" : "arrays");
  if (!request) return;
  setFragment([["query", name], ...Object.entries(request.values).map(([k, v]) => [k, v ?? ""])]);
  run(request, { stream, label: name });
}

// --- live events: the Listen panel --------------------------------------------------
// GET v1/listen?channel=… is read with fetch() and a streaming reader, not
// EventSource: so the token (if one is entered) is sent like on every other
// call, a refused subscription shows the API's JSON error (EventSource only
// says "error"), and Unsubscribe aborts the request, which frees the
// subscriber on the gateway. The server-sent events are parsed here. A stream
// that ends is not reopened by itself: the panel says why it ended.

let listening = null; // {controller, channels, count} of the subscription open now

/**
 * A server-sent event stream's parser (the HTML standard's rules): feed it
 * decoded text as it comes; it calls `dispatch({event, id, data})` for each
 * event. Comments (": keep-alive") are skipped.
 */
class EventStreamParser {
  constructor(dispatch) {
    this.dispatch = dispatch;
    this.buffer = "";
    this.event = "";
    this.data = [];
    this.id = "";
  }

  push(text) {
    this.buffer += text;
    let start = 0;
    for (;;) {
      const lf = this.buffer.indexOf("\n", start);
      const cr = this.buffer.indexOf("\r", start);
      const end = cr === -1 ? lf : lf === -1 ? cr : Math.min(cr, lf);
      if (end === -1) break;
      // a CR at the end of what came so far may be the first half of CR LF: wait for more
      if (end === cr && cr === this.buffer.length - 1) break;
      this.line(this.buffer.slice(start, end));
      start = end + (end === cr && this.buffer[cr + 1] === "\n" ? 2 : 1);
    }
    this.buffer = this.buffer.slice(start);
  }

  line(line) {
    if (line === "") {
      if (this.data.length) {
        this.dispatch({ event: this.event || "message", id: this.id, data: this.data.join("\n") });
      }
      this.event = "";
      this.data = [];
      return;
    }
    if (line.startsWith(":")) return; // a comment
    const colon = line.indexOf(":");
    const name = colon === -1 ? line : line.slice(0, colon);
    let value = colon === -1 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (name === "event") this.event = value;
    else if (name === "data") this.data.push(value);
    else if (name === "id" && !value.includes("\0")) this.id = value;
  }
}

/** The channels typed in the field: names separated by spaces or commas. */
function listenChannels() {
  return ui.listenChannels.value.split(/[\s,]+/).filter(Boolean);
}

function setListenStatus(...parts) {
  ui.listenStatus.replaceChildren(...parts);
}

function eventCounter(count) {
  return el("output", { id: "event-count", dataset: { events: String(count) } },
    count.toLocaleString());
}

/** The time of day an event came, to the millisecond. */
function clock() {
  const now = new Date();
  const ms = String(now.getMilliseconds()).padStart(3, "0");
  return `${now.toLocaleTimeString([], { hour12: false })}.${ms}`;
}

/** One entry of the list: a notification, or the gateway's `missed` or `dropped`. */
function eventItem({ event, id, data }) {
  const time = el("span", { class: "time" }, clock());
  if (event === "notify") {
    const colon = id.lastIndexOf(":");
    const channel = colon === -1 ? id : id.slice(0, colon);
    const seq = colon === -1 ? "" : id.slice(colon + 1);
    return el("li", { class: "notify", dataset: { kind: event, channel, seq } },
      time, el("span", { class: "channel" }, channel), el("span", { class: "seq" }, `#${seq}`),
      el("span", { class: "payload" }, data));
  }
  let reason = "";
  let message = data;
  try {
    ({ reason = "", message = data } = JSON.parse(data));
  } catch {
    // not the gateway's JSON: shown as it came
  }
  return el("li", { class: `notice ${event}`, dataset: { kind: event, reason } },
    time, el("span", { class: "kind" }, event), el("span", { class: "reason" }, reason),
    el("span", { class: "payload" }, message));
}

function showEvent(sse, state) {
  const list = ui.listenEvents;
  const item = eventItem(sse);
  list.prepend(item);
  while (list.childElementCount > SHOWN_EVENTS) list.lastElementChild.remove();
  if (sse.event === "notify") state.count++;
  if (sse.event === "dropped") state.dropped = item.dataset.reason || "dropped";
}

/** Subscribes to the field's channels, instead of the ones followed so far. */
async function subscribe() {
  unsubscribe({ quiet: true });
  const channels = listenChannels();
  const controller = new AbortController();
  const state = { controller, channels, count: 0, dropped: null };
  listening = state;
  ui.unsubscribe.disabled = false;
  ui.listenError.hidden = true;
  const names = channels.join(", ");
  setListenStatus(el("span", { class: "busy" }, `Subscribing to ${names}`));
  const search = new URLSearchParams(channels.map((name) => ["channel", name]));
  try {
    const response = await call({ method: "GET", url: `v1/listen?${search}` },
      { signal: controller.signal });
    if (!response.ok) {
      showError(await errorOf(response), { box: ui.listenError });
      setListenStatus(`Not subscribed (HTTP ${response.status}).`);
      return;
    }
    const paint = () => {
      if (listening === state) setListenStatus(`Listening to ${names}: `, eventCounter(state.count), " events");
    };
    paint();
    const parser = new EventStreamParser((sse) => showEvent(sse, state));
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      parser.push(decoder.decode(value, { stream: true }));
      paint();
    }
    if (listening !== state) return;
    const why = state.dropped ? ` (${state.dropped})` : "";
    setListenStatus(`The gateway ended the stream${why} after `, eventCounter(state.count),
      " events; Subscribe again to go on.");
  } catch (error) {
    if (error.name === "AbortError") return; // Unsubscribe, or a newer subscription
    if (listening !== state) return;
    showError({ code: "network", message: `the stream was cut: ${error.message}` },
      { box: ui.listenError });
    setListenStatus("Cut after ", eventCounter(state.count), " events.");
  } finally {
    if (listening === state) {
      listening = null;
      ui.unsubscribe.disabled = true;
    }
  }
}

/** Ends the subscription open now, if any: the gateway frees its subscriber. */
function unsubscribe({ quiet = false } = {}) {
  const state = listening;
  if (!state) return;
  listening = null;
  ui.unsubscribe.disabled = true;
  state.controller.abort();
  if (!quiet) {
    setListenStatus(`Unsubscribed from ${state.channels.join(", ")} after `,
      eventCounter(state.count), " events.");
  }
}

// --- links: #sql=… and #query=name&param=value ------------------------------------

/** Puts the run in the address bar, so that the page's URL is a link to it. */
function setFragment(pairs) {
  history.replaceState(null, "", "#" + new URLSearchParams(pairs));
}

/**
 * Fills the editor or a query's form from the URL's fragment, and runs it:
 * SQL read-only, a named query only if it does not write. With a token
 * entered, a link only fills: a page that changes this tab's address must not
 * run queries with the user's token.
 */
async function applyFragment(catalogLoaded) {
  const pairs = new URLSearchParams(location.hash.slice(1));
  const autorun = !ui.token.value.trim();
  if (pairs.has("sql")) {
    ui.sql.value = pairs.get("sql");
    renderParams(pairs.getAll("p"));
    markError(null);
    if (autorun) runLinkedSql();
    else setStatus("Filled from the link: press Run.");
  } else if (pairs.has("query")) {
    await catalogLoaded;
    const name = pairs.get("query");
    const entry = namedForms.get(name);
    if (!entry) {
      showError({ code: "unknown_query", message: `the link names no query of this gateway: ${name}` });
      return;
    }
    const details = entry.form.closest("details");
    details.open = true;
    details.scrollIntoView({ block: "nearest" });
    for (const [key, value] of pairs) {
      const input = key === "query" ? null : field(entry.form, key);
      if (input) input.value = value;
    }
    if (autorun && entry.query.read_only) runNamed(name);
    else setStatus(`${name}: filled from the link; press its Run.`);
  }
}

// --- start ------------------------------------------------------------------------

ui.form.addEventListener("submit", (event) => {
  event.preventDefault();
  runEditor();
});
ui.sql.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
    event.preventDefault();
    runEditor();
  }
});
ui.sql.addEventListener("input", () => {
  markError(null);
  renderParams();
});
ui.sql.addEventListener("scroll", syncBackdrop);
ui.params.addEventListener("change", (event) => {
  const n = event.target.dataset.null;
  if (n) ui.params.querySelector(`input[data-param="${n}"]`).disabled = event.target.checked;
});
ui.stop.addEventListener("click", () => running?.abort());
ui.result.addEventListener("click", (event) => {
  if (event.target.tagName === "TD") event.target.classList.toggle("open");
});
ui.csv.addEventListener("click", () => {
  if (ui.sql.value.trim()) download(editorRequest("arrays"), "result.csv", { inEditor: true });
});
ui.token.addEventListener("change", loadCatalog);
ui.listenForm.addEventListener("submit", (event) => {
  event.preventDefault();
  subscribe();
});
ui.unsubscribe.addEventListener("click", () => unsubscribe());
ui.listenClear.addEventListener("click", () => ui.listenEvents.replaceChildren());
window.addEventListener("hashchange", () => applyFragment(Promise.resolve()));

markError(null);
detectIdentity();
applyFragment(loadCatalog());
