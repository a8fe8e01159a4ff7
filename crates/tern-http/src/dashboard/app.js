// Tern's dashboard: plain ES module, no build step. The one third-party
// file is uPlot (vendor/, MIT), loaded as a classic script before this
// module, for the rate and depth charts.
// It talks to the management API with the credentials typed into the login
// form (kept in sessionStorage, so they go when the tab does). Live values
// come from the server's event stream (/api/events, Server-Sent Events,
// read with fetch because EventSource cannot send credentials); it
// reconnects when the stream drops. Every value from the server is set as
// text, never as HTML.

const $ = (id) => document.getElementById(id);
let auth = sessionStorage.getItem("tern-auth");
let sortKey = "name";
let sortDown = false;
let live = null; // the AbortController of the open event stream
let latest = null; // the last snapshot
let dead = null; // the dead-letter queue shown: {vhost, name}
let job = null; // the redrive job followed: its id
const shown = {}; // what each table shows, as JSON, to skip unchanged redraws

async function api(method, path, body) {
  const headers = { Authorization: auth, "X-Requested-With": "XMLHttpRequest" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const res = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (res.status === 401) {
    logout("Your credentials were refused.");
    throw new Error("unauthorized");
  }
  const text = await res.text();
  const data = text ? JSON.parse(text) : null;
  if (!res.ok) throw new Error(data && data.reason ? data.reason : res.statusText);
  return data;
}

const enc = (s) => encodeURIComponent(s);
const showError = (e) => { if (e.message !== "unauthorized") $("error").textContent = e.message; };

function cell(row, text, cls) {
  const td = row.insertCell();
  td.textContent = text;
  if (cls) td.className = cls;
  return td;
}

function button(parent, label, onClick) {
  const b = document.createElement("button");
  b.textContent = label;
  b.addEventListener("click", onClick);
  parent.appendChild(b);
}

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = text;
  if (cls) e.className = cls;
  return e;
}

// Bytes as people read them: 1023 B, 1.5 KiB, 12.0 MiB.
function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return i === 0 ? `${Math.round(n)} B` : `${n.toFixed(1)} ${units[i]}`;
}

function uptime(ms) {
  const s = Math.floor(ms / 1000);
  if (s < 120) return `${s}s`;
  if (s < 7200) return `${Math.floor(s / 60)}m`;
  return `${Math.floor(s / 3600)}h`;
}

// ---- live updates ----

async function stream() {
  const controller = new AbortController();
  live = controller;
  try {
    const res = await fetch("/api/events", {
      headers: { Authorization: auth, "X-Requested-With": "XMLHttpRequest" },
      signal: controller.signal,
    });
    if (res.status === 401) { logout("Your credentials were refused."); return; }
    if (!res.ok || !res.body) throw new Error(res.statusText);
    $("live").textContent = "live";
    $("live").className = "on";
    const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const lines = event.split("\n");
        if (!lines.includes("event: snapshot")) continue;
        const data = lines.filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("");
        render(JSON.parse(data));
      }
    }
  } catch (e) {
    if (controller.signal.aborted) return;
    $("error").textContent = `live updates: ${e.message}`;
  }
  if (live === controller && auth) {
    $("live").textContent = "reconnecting";
    $("live").className = "";
    setTimeout(() => { if (live === controller && auth) stream(); }, 2000);
  }
}

function render(snapshot) {
  latest = snapshot;
  const o = snapshot.overview;
  $("version").textContent = `v${o.tern_version}`;
  $("t-queues").textContent = o.object_totals.queues;
  $("t-exchanges").textContent = o.object_totals.exchanges;
  $("t-consumers").textContent = o.object_totals.consumers;
  $("t-ready").textContent = o.queue_totals.messages_ready;
  $("t-unacked").textContent = o.queue_totals.messages_unacknowledged;
  $("t-uptime").textContent = uptime(o.uptime_ms);
  const stats = o.message_stats;
  const r = (k) => (stats && stats[`${k}_details`] ? String(stats[`${k}_details`].rate) : "-");
  $("r-publish").textContent = r("publish");
  $("r-deliver").textContent = r("deliver_get");
  $("r-ack").textContent = r("ack");
  if (current && !$("queue-page").hidden) renderQueueFacts(snapshot);
  // Tables are rebuilt only when their data changed, so that a row is not
  // replaced under the pointer every second.
  const changed = (key, value) => {
    const text = JSON.stringify(value);
    if (shown[key] === text) return false;
    shown[key] = text;
    return true;
  };
  if (changed("queues", snapshot.queues)) renderQueues(snapshot.queues);
  if (changed("dlqs", snapshot.dlqs)) renderDlqs(snapshot.dlqs);
  renderJob(snapshot.redrives);
  if (changed("connections", [snapshot.connections, snapshot.consumers])) {
    renderConnections(snapshot.connections, snapshot.consumers);
  }
  $("error").textContent = "";
}

// ---- queues ----

function renderQueues(all) {
  const filter = $("filter").value;
  const queues = all.filter((q) => !filter || q.name.includes(filter));
  for (const q of queues) q.publish_rate = q.message_stats ? q.message_stats.publish_details.rate : 0;
  queues.sort((a, b) => {
    const x = a[sortKey], y = b[sortKey];
    const c = typeof x === "number" ? x - y : String(x).localeCompare(String(y));
    return sortDown ? -c : c;
  });
  const body = $("queues").tBodies[0];
  body.replaceChildren();
  for (const q of queues) {
    const row = body.insertRow();
    row.dataset.queue = q.name;
    cell(row, q.vhost);
    const link = el("a", q.name, "queue-link");
    link.href = "#";
    link.addEventListener("click", (ev) => { ev.preventDefault(); openQueue(q.vhost, q.name); });
    row.insertCell().appendChild(link);
    cell(row, q.type);
    cell(row, q.messages_ready, "num");
    cell(row, q.messages_unacknowledged, "num");
    cell(row, q.consumers, "num");
    cell(row, q.message_stats ? q.publish_rate : "-", "num");
    row.insertCell().appendChild(sparkline(depthsOf(q.vhost, q.name)));
    const actions = row.insertCell();
    const path = `/api/queues/${enc(q.vhost)}/${enc(q.name)}`;
    button(actions, "Peek", async () => {
      try {
        const msgs = await api("GET", `${path}/messages?peek=5`);
        const peek = $("peek");
        peek.hidden = false;
        peek.textContent = `${q.name}: ${msgs.length} message(s)\n` +
          msgs.map((m) => `[${m.routing_key}] ${m.payload}`).join("\n");
      } catch (e) { showError(e); }
    });
    button(actions, "Purge", async () => {
      if (!confirm(`Purge every ready message of ${q.name}?`)) return;
      try {
        await api("DELETE", `${path}/contents`);
        q.messages_ready = 0;
        delete shown.queues;
        renderQueues(all);
      } catch (e) { showError(e); }
    });
  }
}

// ---- dead letters ----

function renderDlqs(dlqs) {
  const body = $("dlqs").tBodies[0];
  body.replaceChildren();
  $("no-dlqs").hidden = dlqs.length > 0;
  for (const q of dlqs) {
    const row = body.insertRow();
    row.dataset.dlq = q.name;
    cell(row, q.vhost);
    cell(row, q.name);
    cell(row, q.messages_ready, "num");
    cell(row, q.messages_unacknowledged, "num");
    cell(row, q.sources.join(", "));
    button(row.insertCell(), "Browse", () => browse(q.vhost, q.name));
  }
}

function when(seconds) {
  return seconds ? new Date(seconds * 1000).toISOString().replace("T", " ").slice(0, 19) : "";
}

async function browse(vhost, name) {
  dead = { vhost, name };
  $("dead-detail").hidden = false;
  $("dead-title").textContent = `${name} (${vhost})`;
  try {
    const msgs = await api("GET", `/api/queues/${enc(vhost)}/${enc(name)}/messages?peek=20`);
    const list = $("dead-messages");
    list.replaceChildren();
    if (msgs.length === 0) list.appendChild(el("p", "No messages."));
    for (const m of msgs) {
      const box = el("div", null, "message");
      box.appendChild(el("div", m.payload, "payload"));
      const dl = el("dl");
      const field = (k, v) => {
        if (v === null || v === undefined || v === "") return;
        dl.appendChild(el("dt", k));
        dl.appendChild(el("dd", String(v)));
      };
      field("routing key", m.routing_key);
      field("error", m.error);
      field("failed service", m.failed_service);
      field("redelivered", m.redelivered ? `yes (${m.delivery_count})` : "");
      for (const d of m.deaths) {
        const dd = `${d.reason} in ${d.queue} ×${d.count}, from ${d.exchange || "(default exchange)"}` +
          ` [${d.routing_keys.join(", ")}] at ${when(d.time)}`;
        dl.appendChild(el("dt", "x-death"));
        dl.appendChild(el("dd", dd, "death"));
      }
      const t = m.redrive_target;
      field("redrive to", t ? `${t.exchange || "(default exchange)"} / ${t.routing_key}` : "nowhere known: name an exchange");
      box.appendChild(dl);
      list.appendChild(box);
    }
  } catch (e) { showError(e); }
}

function renderJob(redrives) {
  if (job === null) return;
  const j = redrives.find((r) => r.id === job);
  if (!j) return;
  $("redrive-status").hidden = false;
  const bar = $("redrive-progress");
  bar.max = Math.max(j.total, 1);
  bar.value = j.state === "running" ? j.moved : bar.max;
  let text = `${j.state}: moved ${j.moved} of ${j.total}`;
  if (j.reason) text += ` (${j.reason})`;
  $("redrive-text").textContent = text;
  if (j.state !== "running") {
    // Finished: stop following it, and show what is left.
    job = null;
    if (dead) browse(dead.vhost, dead.name);
  }
}

$("redrive").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  if (!dead) return;
  const f = new FormData(ev.target);
  const body = { rate_per_second: Number(f.get("rate")) };
  if (f.get("limit")) body.limit = Number(f.get("limit"));
  if (f.get("to_exchange")) body.to_exchange = f.get("to_exchange");
  if (f.get("routing_key")) body.routing_key = f.get("routing_key");
  try {
    const j = await api("POST", `/api/queues/${enc(dead.vhost)}/${enc(dead.name)}/redrive`, body);
    job = j.id;
    renderJob([j]);
  } catch (e) { showError(e); }
});

// ---- connections ----

function renderConnections(connections, consumers) {
  const body = $("connections").tBodies[0];
  body.replaceChildren();
  for (const c of connections) {
    const row = body.insertRow();
    row.dataset.connection = c.name;
    cell(row, c.name);
    cell(row, c.user);
    cell(row, c.vhost);
    cell(row, c.protocol);
    cell(row, c.channels, "num");
    cell(row, `${bytes(c.recv_oct)} (${bytes(c.recv_oct_details.rate)}/s)`, "num");
    cell(row, `${bytes(c.send_oct)} (${bytes(c.send_oct_details.rate)}/s)`, "num");
    cell(row, new Date(c.connected_at).toISOString().replace("T", " ").slice(0, 19));
    button(row.insertCell(), "Close", async () => {
      const reason = prompt(`Close ${c.name}? Reason given to the client:`, "closed by an operator");
      if (reason === null) return;
      try {
        const res = await fetch(`/api/connections/${enc(c.name)}`, {
          method: "DELETE",
          headers: { Authorization: auth, "X-Requested-With": "XMLHttpRequest", "X-Reason": reason },
        });
        if (!res.ok) throw new Error((await res.json()).reason);
      } catch (e) { showError(e); }
    });
  }
  const cbody = $("consumers").tBodies[0];
  cbody.replaceChildren();
  for (const c of consumers) {
    const row = cbody.insertRow();
    cell(row, c.consumer_tag);
    cell(row, `${c.queue} (${c.vhost})`);
    cell(row, c.channel);
    cell(row, c.ack_mode);
    cell(row, c.prefetch_count, "num");
  }
}

// ---- pages, login ----

// Shows one page; the queue page has no tab of its own (it opens from the
// queues table), so showing it leaves the Queues tab lit.
function showPage(id) {
  for (const page of document.querySelectorAll(".page")) page.hidden = page.id !== id;
  const lit = id === "queue-page" ? "queues-page" : id;
  for (const t of document.querySelectorAll("#tabs button")) t.classList.toggle("active", t.dataset.page === lit);
  if (id !== "queue-page") current = null;
  if (id === "overview-page") drawCharts();
  if (id === "exchanges-page") loadExchanges();
  if (id === "users-page") loadUsers();
}

for (const tab of document.querySelectorAll("#tabs button")) {
  tab.addEventListener("click", () => showPage(tab.dataset.page));
}

function start() {
  $("login").hidden = true;
  $("app").hidden = false;
  $("logout").hidden = false;
  stream();
  pollRates();
}

function logout(message) {
  auth = null;
  sessionStorage.removeItem("tern-auth");
  if (live) live.abort();
  live = null;
  clearTimeout(ratesTimer);
  $("app").hidden = true;
  $("logout").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message || "";
}

$("login").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const f = new FormData(ev.target);
  // btoa needs Latin-1; encode UTF-8 first.
  const bytes = new TextEncoder().encode(`${f.get("user")}:${f.get("password")}`);
  auth = "Basic " + btoa(String.fromCharCode(...bytes));
  try {
    await api("GET", "/api/overview");
    sessionStorage.setItem("tern-auth", auth);
    $("login-error").textContent = "";
    start();
  } catch (e) {
    if (e.message !== "unauthorized") $("login-error").textContent = e.message;
  }
});

$("logout").addEventListener("click", () => logout());

$("publish").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const f = new FormData(ev.target);
  try {
    const r = await api(
      "POST",
      `/api/exchanges/${enc(f.get("vhost"))}/${enc(f.get("exchange") || "amq.default")}/publish`,
      { routing_key: f.get("routing_key"), payload: f.get("payload"), payload_encoding: "string" },
    );
    $("publish-result").textContent = r.routed ? "routed" : "not routed to any queue";
  } catch (e) { $("publish-result").textContent = e.message; }
});

for (const th of document.querySelectorAll("th[data-key]")) {
  th.addEventListener("click", () => {
    sortDown = sortKey === th.dataset.key ? !sortDown : false;
    sortKey = th.dataset.key;
    if (latest) renderQueues(latest.queues);
  });
}
$("filter").addEventListener("input", () => { if (latest) renderQueues(latest.queues); });


// ---- traces: a sequence diagram of services and queues ----

const SVG = "http://www.w3.org/2000/svg";

function svg(tag, attrs, text) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, String(v));
  if (text !== undefined) e.textContent = text;
  return e;
}

function clock(ms) {
  return new Date(ms).toISOString().slice(11, 23);
}

// Lanes: each sending service (app_id) and each queue, in order of first
// appearance. Rows, in time order: a publish (sender -> queues), and each
// event of it (at its queue, with the consumer). A dashed arrow joins a
// message to the one that caused it (causation id = the cause's message id).
function drawTrace(trace) {
  const rows = [];
  for (const m of trace.messages) {
    rows.push({ at: m.published_at, kind: "publish", m });
    for (const e of m.events) rows.push({ at: e.at, kind: "event", m, e });
  }
  // Stable: within a millisecond, publish order and each message's own
  // event order stand.
  rows.sort((a, b) => a.at - b.at);
  const lanes = [];
  const lane = (name) => { if (!lanes.includes(name)) lanes.push(name); return lanes.indexOf(name); };
  for (const r of rows) {
    if (r.kind === "publish") { lane(r.m.app_id || "(unknown sender)"); r.m.queues.forEach(lane); }
    else lane(r.e.queue);
  }
  const laneW = 190, rowH = 34, top = 40;
  const width = Math.max(lanes.length * laneW, 400);
  const height = top + rows.length * rowH + 20;
  const root = svg("svg", { width, height, viewBox: `0 0 ${width} ${height}`, role: "img",
    "aria-label": `Sequence diagram of ${trace.correlation_id}` });
  const defs = svg("defs", {});
  const marker = svg("marker", { id: "arrow", viewBox: "0 0 10 10", refX: 9, refY: 5,
    markerWidth: 7, markerHeight: 7, orient: "auto-start-reverse" });
  marker.appendChild(svg("path", { d: "M0,0 L10,5 L0,10 z", fill: "#1d2433" }));
  defs.appendChild(marker);
  root.appendChild(defs);
  const x = (i) => i * laneW + laneW / 2;
  lanes.forEach((name, i) => {
    root.appendChild(svg("text", { x: x(i), y: 20, "text-anchor": "middle", "font-weight": "bold" }, name));
    root.appendChild(svg("line", { x1: x(i), y1: 28, x2: x(i), y2: height - 10, class: "lane" }));
  });
  const publishedAt = new Map(); // message id -> y of its publish
  rows.forEach((r, k) => {
    const y = top + k * rowH + rowH / 2;
    if (r.kind === "publish") {
      const from = lanes.indexOf(r.m.app_id || "(unknown sender)");
      for (const q of r.m.queues) {
        const to = lanes.indexOf(q);
        root.appendChild(svg("line", { x1: x(from), y1: y, x2: x(to) + (to > from ? -4 : 4), y2: y,
          class: "publish", "marker-end": "url(#arrow)" }));
      }
      const label = `${r.m.type || r.m.message_id || "message"} ${clock(r.at)}`;
      root.appendChild(svg("text", { x: x(from) + 6, y: y - 6 }, label));
      if (r.m.message_id) publishedAt.set(r.m.message_id, { y, lane: from });
      const cause = r.m.causation_id && publishedAt.get(r.m.causation_id);
      if (cause) {
        root.appendChild(svg("path", { d: `M${x(cause.lane) + 10},${cause.y} C${x(from) - 40},${cause.y} ${x(from) - 40},${y} ${x(from) - 4},${y}`,
          class: "cause", "marker-end": "url(#arrow)" }));
      }
    } else {
      const at = lanes.indexOf(r.e.queue);
      root.appendChild(svg("circle", { cx: x(at), cy: y, r: 4, fill: "#0a7a36" }));
      const who = r.e.consumer_tag ? ` to ${r.e.consumer_tag}` : "";
      root.appendChild(svg("text", { x: x(at) + 8, y: y + 4 }, `${r.e.kind}${who} ${clock(r.at)}`));
    }
  });
  $("trace-diagram").replaceChildren(root);
  const list = $("trace-list");
  list.replaceChildren();
  for (const m of trace.messages) {
    let text = `${m.type || "message"} ${m.message_id || ""} from ${m.app_id || "(unknown sender)"}` +
      ` to ${m.queues.join(", ") || "no queue"}`;
    if (m.causation_id) text += `, caused by ${m.causation_id}`;
    text += `: ${m.events.map((e) => e.kind).join(", ") || "not delivered yet"}`;
    list.appendChild(el("li", text));
  }
}

$("trace").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const id = new FormData(ev.target).get("correlation_id");
  $("trace-status").textContent = "";
  try {
    const trace = await api("GET", `/api/traces/${enc(id)}`);
    $("trace-status").textContent = `${trace.messages.length} message(s)`;
    drawTrace(trace);
  } catch (e) {
    $("trace-status").textContent = e.message;
    $("trace-diagram").replaceChildren();
    $("trace-list").replaceChildren();
  }
});

// ---- rates: history from /api/rates, charts, sparklines ----

let history = null; // the last /api/rates answer
let ratesTimer = null;
let current = null; // the queue shown on the queue page: {vhost, name}
const charts = {}; // uPlot instances by container id

// The server samples every few seconds; asking as often keeps the charts
// current without reloading anything else.
async function pollRates() {
  clearTimeout(ratesTimer);
  if (!auth) return;
  try {
    history = await api("GET", "/api/rates");
    drawCharts();
    delete shown.queues;
    if (latest) renderQueues(latest.queues);
    if (!$("exchanges-page").hidden) loadExchanges();
  } catch (e) { showError(e); }
  const every = history ? Math.min(Math.max(history.interval_ms, 1000), 5000) : 5000;
  ratesTimer = setTimeout(pollRates, every);
}

function depthsOf(vhost, name) {
  if (!history) return [];
  const q = history.queues.find((x) => x.vhost === vhost && x.name === name);
  return q ? q.messages : [];
}

// A small SVG line of a queue's depth over the kept samples.
function sparkline(values) {
  const w = 120, h = 22;
  const root = svg("svg", { width: w, height: h, class: "spark", role: "img",
    "aria-label": `depth ${values.filter((v) => v !== null).slice(-1)[0] ?? "unknown"}` });
  const max = Math.max(1, ...values.filter((v) => v !== null));
  const n = Math.max(values.length - 1, 1);
  let d = "";
  values.forEach((v, i) => {
    if (v === null) return;
    const x = (i / n) * (w - 2) + 1, y = h - 1 - (v / max) * (h - 2);
    d += `${d && values[i - 1] !== null ? "L" : "M"}${x.toFixed(1)},${y.toFixed(1)}`;
  });
  if (d) root.appendChild(svg("path", { d, class: "spark-line" }));
  return root;
}

function chart(id, series, data) {
  const box = $(id);
  const width = box.clientWidth;
  if (!width || typeof uPlot === "undefined") return; // hidden, or uPlot missing
  if (!charts[id] || charts[id].width !== width) {
    if (charts[id]) charts[id].plot.destroy();
    const opts = {
      width, height: 220,
      series: [{}, ...series.map(([label, stroke]) => ({ label, stroke, width: 2, spanGaps: true }))],
      axes: [{}, { size: 60 }],
      scales: { x: { time: true } },
    };
    charts[id] = { width, plot: new uPlot(opts, data, box) };
    box.dataset.points = String(data[0].length);
    return;
  }
  charts[id].plot.setData(data);
  box.dataset.points = String(data[0].length);
}

function drawCharts() {
  if (!history) return;
  const xs = history.samples.map((s) => s.timestamp / 1000);
  const col = (k) => history.samples.map((s) => s[k]);
  const rated = history.samples.some((s) => s.publish !== null);
  $("rates-hint").textContent = rated
    ? `msgs/s, sampled every ${history.interval_ms / 1000} s`
    : "no message counters: the server runs without a metrics recorder";
  if (!$("overview-page").hidden) {
    chart("rate-chart", [["publish", "#1f77b4"], ["deliver/get", "#2ca02c"], ["ack", "#ff7f0e"]],
      [xs, col("publish"), col("deliver_get"), col("ack")]);
    chart("depth-chart", [["messages", "#1d2433"]], [xs, col("messages")]);
  }
  if (current && !$("queue-page").hidden) {
    chart("queue-chart", [["messages", "#1d2433"]], [xs, depthsOf(current.vhost, current.name)]);
  }
}

// ---- the queue page ----

function facts(dl, pairs) {
  dl.replaceChildren();
  for (const [k, v] of pairs) {
    dl.appendChild(el("dt", k));
    dl.appendChild(el("dd", String(v)));
  }
}

function renderQueueFacts(snapshot) {
  const q = snapshot.queues.find((x) => x.vhost === current.vhost && x.name === current.name);
  if (!q) { $("queue-title").textContent = `${current.name} (deleted)`; return; }
  const st = q.message_stats;
  const rate = (k) => (st ? `${st[`${k}_details`].rate}/s (${st[k]} in all)` : "-");
  facts($("queue-facts"), [
    ["vhost", q.vhost], ["type", q.type], ["ready", q.messages_ready],
    ["unacked", q.messages_unacknowledged], ["consumers", q.consumers],
    ["publish", rate("publish")], ["deliver/get", rate("deliver_get")], ["ack", rate("ack")],
  ]);
  const body = $("queue-consumers").tBodies[0];
  const mine = snapshot.consumers.filter((c) => c.vhost === q.vhost && c.queue === q.name);
  if (shown.queueConsumers === JSON.stringify(mine)) return;
  shown.queueConsumers = JSON.stringify(mine);
  body.replaceChildren();
  for (const c of mine) {
    const row = body.insertRow();
    cell(row, c.consumer_tag);
    cell(row, c.channel);
    cell(row, c.ack_mode);
    cell(row, c.prefetch_count, "num");
  }
}

async function openQueue(vhost, name) {
  current = { vhost, name };
  delete shown.queueConsumers;
  showPage("queue-page");
  $("queue-title").textContent = `${name} (${vhost})`;
  $("queue-messages").hidden = true;
  $("queue-publish-result").textContent = "";
  const path = `/api/queues/${enc(vhost)}/${enc(name)}`;
  try {
    const q = await api("GET", path);
    if (latest) renderQueueFacts(latest);
    drawCharts();
    const bindings = await api("GET", `${path}/bindings`);
    const body = $("queue-bindings").tBodies[0];
    body.replaceChildren();
    for (const b of bindings) {
      const row = body.insertRow();
      cell(row, b.source || "(default exchange)");
      cell(row, b.routing_key);
      cell(row, b.arguments ? JSON.stringify(b.arguments) : "");
    }
    $("queue-offsets-box").hidden = q.type !== "stream";
    if (q.type === "stream") {
      const o = await api("GET", `${path}/offsets`);
      $("queue-offsets-range").textContent = `offsets ${o.first} to ${o.end}`;
      const ob = $("queue-offsets").tBodies[0];
      ob.replaceChildren();
      for (const c of o.consumers) {
        const row = ob.insertRow();
        cell(row, c.name ?? "");
        cell(row, c.consumer_tag ?? "(away)");
        cell(row, c.next ?? "", "num");
        cell(row, c.committed ?? "", "num");
        cell(row, c.lag, "num");
      }
    }
  } catch (e) { showError(e); }
}

$("queue-back").addEventListener("click", () => showPage("queues-page"));

$("queue-peek").addEventListener("click", async () => {
  if (!current) return;
  try {
    const msgs = await api("GET", `/api/queues/${enc(current.vhost)}/${enc(current.name)}/messages?peek=10`);
    const out = $("queue-messages");
    out.hidden = false;
    out.textContent = `${msgs.length} message(s)\n` + msgs.map((m) => `[${m.routing_key}] ${m.payload}`).join("\n");
  } catch (e) { showError(e); }
});

$("queue-purge").addEventListener("click", async () => {
  if (!current || !confirm(`Purge every ready message of ${current.name}?`)) return;
  try { await api("DELETE", `/api/queues/${enc(current.vhost)}/${enc(current.name)}/contents`); } catch (e) { showError(e); }
});

$("queue-publish").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  if (!current) return;
  const f = new FormData(ev.target);
  try {
    const r = await api("POST", `/api/exchanges/${enc(current.vhost)}/amq.default/publish`,
      { routing_key: current.name, payload: f.get("payload"), payload_encoding: "string" });
    $("queue-publish-result").textContent = r.routed ? "published" : "not routed";
  } catch (e) { $("queue-publish-result").textContent = e.message; }
});

// ---- exchanges ----

async function loadExchanges() {
  try {
    const all = await api("GET", "/api/exchanges");
    if (shown.exchanges === JSON.stringify(all)) return;
    shown.exchanges = JSON.stringify(all);
    const body = $("exchanges").tBodies[0];
    body.replaceChildren();
    for (const x of all) {
      const row = body.insertRow();
      row.dataset.exchange = x.name;
      cell(row, x.vhost);
      cell(row, x.name || "(default exchange)");
      cell(row, x.type);
      cell(row, [x.durable ? "durable" : "transient", x.auto_delete ? "auto-delete" : "", x.internal ? "internal" : ""]
        .filter(Boolean).join(", "));
      const st = x.message_stats;
      cell(row, st ? st.publish_in_details.rate : "-", "num");
      cell(row, st ? st.publish_out_details.rate : "-", "num");
      cell(row, st ? st.publish_in : "-", "num");
    }
  } catch (e) { showError(e); }
}

// ---- users and permissions (administrators change them) ----

async function loadUsers() {
  try {
    const [users, perms] = await Promise.all([api("GET", "/api/users"), api("GET", "/api/permissions")]);
    $("users-refused").hidden = true;
    const body = $("users").tBodies[0];
    body.replaceChildren();
    for (const u of users) {
      const row = body.insertRow();
      row.dataset.user = u.name;
      cell(row, u.name);
      cell(row, u.tags.join(", ") || "(none: no management access)");
      cell(row, u.has_password ? "set" : "none");
      const actions = cell(row, "");
      button(actions, "Delete", () => deleteUser(u.name));
    }
    const pbody = $("permissions").tBodies[0];
    pbody.replaceChildren();
    for (const p of perms) {
      const row = pbody.insertRow();
      cell(row, p.user);
      cell(row, p.vhost);
      cell(row, p.configure, "regex");
      cell(row, p.write, "regex");
      cell(row, p.read, "regex");
      row.dataset.permission = `${p.vhost} ${p.user}`;
      const actions = cell(row, "");
      button(actions, "Clear", () => clearPermissions(p.vhost, p.user));
    }
  } catch (e) {
    // Only administrators may list users: say so rather than fail.
    $("users-refused").hidden = false;
    $("users-refused").textContent = `Users and permissions: ${e.message}`;
  }
}

async function deleteUser(name) {
  try {
    await api("DELETE", `/api/users/${enc(name)}`);
    $("user-result").textContent = `deleted ${name}`;
  } catch (e) { $("user-result").textContent = e.message; }
  loadUsers();
}

async function clearPermissions(vhost, user) {
  try {
    await api("DELETE", `/api/permissions/${enc(vhost)}/${enc(user)}`);
    $("permission-result").textContent = `cleared ${user} in ${vhost}`;
  } catch (e) { $("permission-result").textContent = e.message; }
  loadUsers();
}

$("user-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const f = new FormData(ev.target);
  const name = f.get("name");
  const body = { tags: f.get("tags") };
  if (f.get("password")) body.password = f.get("password");
  try {
    await api("PUT", `/api/users/${enc(name)}`, body);
    $("user-result").textContent = `saved ${name}`;
    ev.target.elements.password.value = "";
  } catch (e) { $("user-result").textContent = e.message; }
  loadUsers();
});

$("permission-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const f = new FormData(ev.target);
  const body = { configure: f.get("configure"), write: f.get("write"), read: f.get("read") };
  try {
    await api("PUT", `/api/permissions/${enc(f.get("vhost"))}/${enc(f.get("user"))}`, body);
    $("permission-result").textContent = `set for ${f.get("user")} in ${f.get("vhost")}`;
  } catch (e) { $("permission-result").textContent = e.message; }
  loadUsers();
});

// Last, so that every binding above exists before the first render.
if (auth) start();
