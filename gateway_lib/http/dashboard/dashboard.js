// The spend dashboard: reads the report routes with a bearer token and draws what they say.
// Numbers are shown as the API returns them; sums across pages are exact (USD added as scaled BigInt).
"use strict";

const config = JSON.parse(document.getElementById("sign-in").textContent);
const $ = (id) => document.getElementById(id);
const COLOURS = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7"];
let tokenSource = null;

// --- sign-in ------------------------------------------------------------------------------------

async function msalToken() {
  const app = new msal.PublicClientApplication({
    auth: { clientId: config.client_id, authority: config.authority, redirectUri: location.origin + location.pathname },
    cache: { cacheLocation: "sessionStorage" },
  });
  await app.initialize();
  const result = await app.handleRedirectPromise();
  const account = (result && result.account) || app.getAllAccounts()[0];
  if (!account) {
    await app.loginRedirect({ scopes: config.scopes });
    return new Promise(() => {});  // the page navigates away
  }
  try {
    return (await app.acquireTokenSilent({ scopes: config.scopes, account })).accessToken;
  } catch (e) {
    await app.acquireTokenRedirect({ scopes: config.scopes, account });
    return new Promise(() => {});
  }
}

function devToken() {
  const saved = sessionStorage.getItem("gateway.devToken");
  if (saved) return Promise.resolve(saved);
  $("dev-sign-in").hidden = false;
  return new Promise((resolve) => {
    $("use-token").addEventListener("click", () => {
      const token = $("dev-token").value.trim();
      sessionStorage.setItem("gateway.devToken", token);
      $("dev-sign-in").hidden = true;
      resolve(token);
    }, { once: true });
  });
}

async function api(path) {
  const token = await tokenSource();
  const response = await fetch(path, { headers: { Authorization: "Bearer " + token } });
  const body = await response.json();
  if (!response.ok) throw new Error((body.error && body.error.message) || response.statusText);
  return body;
}

// --- exact sums ---------------------------------------------------------------------------------

function addUsd(a, b) {
  const [ai, af = ""] = a.split("."), [bi, bf = ""] = b.split(".");
  const scale = Math.max(af.length, bf.length);
  const sum = BigInt(ai + af.padEnd(scale, "0")) + BigInt(bi + bf.padEnd(scale, "0"));
  const digits = (sum < 0n ? -sum : sum).toString().padStart(scale + 1, "0");
  const whole = scale ? digits.slice(0, -scale) + "." + digits.slice(-scale) : digits;
  return (sum < 0n ? "-" : "") + whole;
}

function merge(rows, more, dims) {
  const byKey = new Map(rows.map((r) => [JSON.stringify(dims.map((d) => r[d])), r]));
  for (const r of more) {
    const key = JSON.stringify(dims.map((d) => r[d]));
    const had = byKey.get(key);
    if (!had) { byKey.set(key, { ...r }); continue; }
    had.requests += r.requests; had.input_tokens += r.input_tokens; had.output_tokens += r.output_tokens;
    had.usd = addUsd(had.usd, r.usd);
  }
  return [...byKey.values()];
}

async function spend(from, to, groupBy) {
  let rows = [], totals = { requests: 0, input_tokens: 0, output_tokens: 0, usd: "0" }, token = null;
  const dims = groupBy.split(",");
  do {
    const page = await api(`spend?from=${from}&to=${to}&group_by=${groupBy}` +
                           (token ? `&continuation=${encodeURIComponent(token)}` : ""));
    rows = merge(rows, page.rows, dims);
    totals = merge([totals], [page.totals], [])[0];
    token = page.continuation;
  } while (token);
  return { rows, totals };
}

async function listAll(path) {
  let data = [], token = null, viewer = null;
  do {
    const page = await api(path + (token ? `&continuation=${encodeURIComponent(token)}` : ""));
    data = data.concat(page.data); viewer = page.viewer; token = page.continuation;
  } while (token);
  return { data, viewer };
}

// --- drawing ------------------------------------------------------------------------------------

function cell(tr, text, numeric, key) {
  const td = tr.insertCell();
  td.textContent = text === null || text === undefined ? "" : String(text);
  if (numeric) td.className = "num";
  if (key) td.dataset.key = key;
  return td;
}

function fill(tableId, rows, columns) {
  const body = $(tableId).tBodies[0];
  body.replaceChildren();
  for (const row of rows) {
    const tr = body.insertRow();
    for (const [name, numeric] of columns) cell(tr, row[name], numeric, name);
    if (row.status) tr.className = row.status;
  }
}

const SVG = "http://www.w3.org/2000/svg";
function svg(tag, attrs, parent) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (parent) parent.appendChild(node);
  return node;
}

// Stacked bars of USD per day, one colour per series (team or model).
function chart(targetId, rows, dim, from, to) {
  const days = [];
  for (let d = new Date(from + "T00:00:00Z"); d <= new Date(to + "T00:00:00Z"); d.setUTCDate(d.getUTCDate() + 1)) {
    days.push(d.toISOString().slice(0, 10));
  }
  const series = [...new Set(rows.map((r) => r[dim] || "(none)"))].sort();
  const usd = (r) => Number(r.usd);  // drawing only: bar heights need no exactness
  const perDay = new Map(days.map((d) => [d, "0"]));  // exact, for the scale's label
  for (const r of rows) perDay.set(r.day, addUsd(perDay.get(r.day) || "0", r.usd));
  const peak = [...perDay.values()].reduce((a, b) => (Number(b) > Number(a) ? b : a), "0");
  const top = Math.max(Number(peak), 1e-9);
  const width = 720, height = 200, pad = 30, barW = (width - pad) / Math.max(days.length, 1);
  const root = svg("svg", { width, height: height + 20, viewBox: `0 0 ${width} ${height + 20}`, role: "img" });
  const label = svg("text", { x: 0, y: 12, "font-size": 10, class: "peak" }, root);
  label.textContent = "$" + peak;  // the busiest day's total, as the API adds it
  const stack = new Map(days.map((d) => [d, 0]));
  for (const r of rows.slice().sort((a, b) => series.indexOf(a[dim] || "(none)") - series.indexOf(b[dim] || "(none)"))) {
    const i = days.indexOf(r.day);
    if (i < 0) continue;
    const h = (usd(r) / top) * (height - 20), y = height - stack.get(r.day) - h;
    stack.set(r.day, stack.get(r.day) + h);
    const bar = svg("rect", { x: pad + i * barW + 1, y, width: Math.max(barW - 2, 1), height: h,
                              fill: COLOURS[series.indexOf(r[dim] || "(none)") % COLOURS.length] }, root);
    svg("title", {}, bar).textContent = `${r.day} ${r[dim] || "(none)"}: $${r.usd}`;
  }
  svg("text", { x: pad, y: height + 15, "font-size": 10 }, root).textContent = days[0] || "";
  svg("text", { x: width - 70, y: height + 15, "font-size": 10 }, root).textContent = days[days.length - 1] || "";
  const legend = document.createElement("div");
  legend.className = "legend";
  series.forEach((name, i) => {
    const item = document.createElement("span");
    const swatch = document.createElement("i");
    swatch.style.background = COLOURS[i % COLOURS.length];
    item.append(swatch, name);
    legend.append(item);
  });
  $(targetId).replaceChildren(root, legend);
}

// --- the report ---------------------------------------------------------------------------------

async function show(from, to) {
  $("status").textContent = "Loading…";
  const [byDayTeam, byDayModel, byTeam, byModel, byCaller, callers] = await Promise.all([
    spend(from, to, "day,team"), spend(from, to, "day,model"), spend(from, to, "team"), spend(from, to, "model"),
    spend(from, to, "caller"), listAll("callers?page_size=1000"),
  ]);
  const t = byTeam.totals;
  $("total-requests").textContent = t.requests;
  $("total-input").textContent = t.input_tokens;
  $("total-output").textContent = t.output_tokens;
  $("total-usd").textContent = t.usd;
  chart("chart-team", byDayTeam.rows, "team", from, to);
  chart("chart-model", byDayModel.rows, "model", from, to);
  fill("by-team", byTeam.rows, [["team", false], ["requests", true], ["usd", true]]);
  fill("by-model", byModel.rows, [["model", false], ["requests", true], ["usd", true]]);
  const names = new Map(callers.data.map((c) => [c.caller, [c.app_name, c.user_name].filter(Boolean).join(" for ")]));
  const top = byCaller.rows.slice().sort((a, b) => Number(b.usd) - Number(a.usd) || a.caller.localeCompare(b.caller));
  fill("top-callers", top.slice(0, 10).map((r) => ({ ...r, name: names.get(r.caller) || "" })),
       [["caller", false], ["name", false], ["requests", true], ["input_tokens", true], ["output_tokens", true], ["usd", true]]);
  fill("budgets", callers.data.map((c) => ({ ...c, thresholds: c.thresholds_crossed.map((x) => x + "%").join(" ") })),
       [["caller", false], ["team", false], ["status", false], ["month_usd", true], ["budget_usd_per_month", true],
        ["budget_used_percent", true], ["thresholds", false]]);
  if (callers.viewer.scope === "all") {  // alerts are the admins' (a team lead's request would be refused)
    const alerts = await api("alerts?limit=20");
    // A token alert carries tokens/budget_tokens instead of spend_usd/budget_usd; its unit says which.
    const amounts = (a) => (a.unit === "tokens" ? { spent: a.tokens, budget: a.budget_tokens }
                                                : { spent: a.spend_usd, budget: a.budget_usd });
    fill("alerts", alerts.data.map((a) => ({ ...a, ...amounts(a) })),
         [["created", false], ["kind", false], ["subject", false], ["period", false], ["threshold", true],
          ["spent", true], ["budget", true], ["unit", false]]);
  }
  $("report").hidden = false;
  $("download").disabled = false;
  $("status").textContent = `Spend from ${from} to ${to} (UTC days, both included).`;
  document.body.dataset.loaded = "true";
}

// Every page of the CSV: each page covers its own callers, so with the caller a column no line repeats.
async function spendCsv(from, to) {
  let text = "", token = null, first = true;
  do {
    const response = await fetch(`spend?from=${from}&to=${to}&group_by=day,caller&format=csv` +
                                 (token ? `&continuation=${encodeURIComponent(token)}` : ""),
                                 { headers: { Authorization: "Bearer " + await tokenSource() } });
    if (!response.ok) throw new Error(((await response.json()).error || {}).message || response.statusText);
    const body = await response.text();
    text += first ? body : body.slice(body.indexOf("\n") + 1);  // the header once
    first = false;
    token = response.headers.get("x-continuation");
  } while (token);
  return text;
}

async function download() {
  const from = $("from").value, to = $("to").value;
  const link = document.createElement("a");
  link.href = URL.createObjectURL(new Blob([await spendCsv(from, to)], { type: "text/csv" }));
  link.download = `spend-${from}-${to}.csv`;
  link.click();
  URL.revokeObjectURL(link.href);
}

function start() {
  tokenSource = config.mode === "msal" ? (() => { const p = msalToken(); return () => p; })() : devToken;
  const today = new Date().toISOString().slice(0, 10);
  $("from").value = today.slice(0, 8) + "01";
  $("to").value = today;
  $("range").addEventListener("submit", (e) => { e.preventDefault(); run(); });
  $("download").addEventListener("click", () => download().catch(fail));
  run();
}

function fail(error) { $("status").textContent = "Could not load the report: " + error.message; }
function run() { show($("from").value, $("to").value).catch(fail); }

start();
