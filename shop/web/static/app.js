// The vmgrid dashboard: plain JavaScript, no build step. It signs in with a
// bearer token (kept in sessionStorage), follows /v1/events (server-sent
// events read with fetch, since EventSource cannot send Authorization) and
// acts through the shop's HTTP/JSON API.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { token: sessionStorage.getItem("vmgrid-token") || "", overview: null, caller: null,
  samples: [], clones: new Map(), auctions: new Map(), expanded: new Set(), abort: null };
const COLORS = ["#4f7cff", "#34c38f", "#f0a23b", "#d6453d", "#8e6bff", "#19a7c9"];

function esc(s) {
  return String(s ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}
function num(v) { return Number(v || 0); }
function bytes(n) {
  n = num(n);
  const u = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(n < 10 ? 1 : 0) : n) + " " + u[i];
}
function dur(nanos) {
  const ms = num(nanos) / 1e6;
  if (!ms) return "—";
  return ms < 1000 ? ms.toFixed(0) + " ms" : (ms / 1000).toFixed(ms < 10000 ? 2 : 1) + " s";
}
function short(s, n = 14) { s = String(s || ""); return s.length > n ? s.slice(0, n) + "…" : s; }
function stateName(s) { return String(s || "").replace(/^(VM|TASK)_STATE_/, ""); }
function b64(s) { try { return s ? new TextDecoder().decode(Uint8Array.from(atob(s), (c) => c.charCodeAt(0))) : ""; } catch { return ""; } }
function plantColor(name) {
  const names = (state.overview?.plants || []).map((p) => p.name).sort();
  const i = Math.max(names.indexOf(name), 0);
  return COLORS[i % COLORS.length];
}

function toast(msg, bad) {
  const t = $("toast");
  t.textContent = msg;
  t.className = "toast" + (bad ? " bad" : "");
  t.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { t.hidden = true; }, 5000);
}

// api calls the shop's HTTP/JSON API with the token.
async function api(method, path, body) {
  const res = await fetch(path, { method, headers: { Authorization: "Bearer " + state.token, "Content-Type": "application/json" },
    body: body ? JSON.stringify(body) : undefined });
  if (!res.ok) {
    let msg = res.statusText;
    try { msg = (await res.json()).message || msg; } catch { /* not JSON */ }
    throw new Error(msg);
  }
  return res;
}

// lines reads a streamed response: newline-delimited JSON (the API's
// server streams) or server-sent events, calling each per record.
async function readStream(res, sep, each) {
  const reader = res.body.getReader();
  const dec = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += dec.decode(value, { stream: true });
    let i;
    while ((i = buf.indexOf(sep)) >= 0) {
      const rec = buf.slice(0, i);
      buf = buf.slice(i + sep.length);
      if (rec.trim()) each(rec);
    }
  }
}

// ---- sign in and the event stream ----

function showLogin(err) {
  $("app").hidden = true;
  $("login").hidden = false;
  $("login-error").hidden = !err;
  $("login-error").textContent = err || "";
  $("login-token").focus();
}

async function connect() {
  if (state.abort) state.abort.abort();
  const ctl = new AbortController();
  state.abort = ctl;
  let res;
  try {
    res = await fetch("/v1/events", { headers: { Authorization: "Bearer " + state.token }, signal: ctl.signal });
  } catch (e) {
    if (!ctl.signal.aborted) setTimeout(connect, 2000);
    return;
  }
  if (res.status === 401 || res.status === 403) {
    let msg = "the token was refused";
    try { msg = (await res.json()).message || msg; } catch { /* keep */ }
    sessionStorage.removeItem("vmgrid-token");
    state.token = "";
    showLogin(msg);
    return;
  }
  $("login").hidden = true;
  $("app").hidden = false;
  $("conn").classList.add("live");
  try {
    await readStream(res, "\n\n", (rec) => {
      let name = "message", data = "";
      for (const line of rec.split("\n")) {
        if (line.startsWith("event: ")) name = line.slice(7);
        else if (line.startsWith("data: ")) data += line.slice(6);
      }
      onEvent(name, data ? JSON.parse(data) : null);
    });
  } catch { /* the stream broke: reconnect */ }
  $("conn").classList.remove("live");
  if (!ctl.signal.aborted) setTimeout(connect, 1500);
}

function onEvent(name, d) {
  switch (name) {
    case "hello":
      state.caller = d;
      $("caller").innerHTML = `<b>${esc(d.name)}</b> <span class="muted">${esc(d.role)}</span>`;
      break;
    case "overview":
      state.overview = d;
      for (const vm of d.vms) {
        if (num(vm.readyNanos) > 0) state.clones.set(vm.vmId, { at: num(vm.createdUnixNano) / 1e6, ms: num(vm.readyNanos) / 1e6, plant: vm.plant });
      }
      render();
      break;
    case "stats":
      state.samples.push(d);
      if (state.samples.length > 150) state.samples.shift();
      renderPlants();
      renderWAN();
      break;
    case "bid": {
      const a = state.auctions.get(d.vm) || { vm: d.vm, at: d.at, bids: [], winner: "" };
      a.bids.push(d);
      state.auctions.set(d.vm, a);
      renderAuctions();
      break;
    }
    case "won": {
      const a = state.auctions.get(d.vm);
      if (a) { a.winner = d.plant; renderAuctions(); }
      break;
    }
    case "problem":
      toast(d.message, true);
      break;
  }
}

// ---- rendering ----

function render() {
  renderSummary();
  renderPlants();
  renderVMs();
  renderClones();
  renderWAN();
  renderTasks();
  renderImages();
}

function renderSummary() {
  const o = state.overview;
  const running = o.vms.filter((v) => stateName(v.state) === "RUNNING").length;
  $("summary").innerHTML = `<span><b>${o.plants.length}</b> plants</span><span><b>${running}</b> / ${o.vms.length} VMs running</span>` +
    `<span><b>${o.tasks.length}</b> tasks</span><span><b>${o.images.length}</b> images</span>`;
}

function latestStats(name) {
  const last = state.samples[state.samples.length - 1];
  return last?.plants?.[name];
}

function renderPlants() {
  const o = state.overview;
  if (!o) return;
  $("plants").innerHTML = o.plants.map((p) => {
    const used = num(p.memoryMib) - num(p.memoryFreeMib);
    const pct = p.memoryMib ? (100 * used) / p.memoryMib : 0;
    const st = latestStats(p.name);
    const hits = num(st?.hits), misses = num(st?.misses);
    const rate = hits + misses ? ((100 * hits) / (hits + misses)).toFixed(1) + "%" : "—";
    const images = Object.entries(p.images || {}).map(([n, b]) => `<span class="chip">${esc(n)} · ${bytes(b)}</span>`).join("") || `<span class="muted">no image cached</span>`;
    return `<div class="plant" data-plant="${esc(p.name)}">
      <div class="plant-head"><span class="plant-name"><i class="dot" style="background:${plantColor(p.name)}"></i>${esc(p.name)}${p.draining ? ` <span class="chip">draining</span>` : ""}</span><span class="muted mono">${esc(p.addr)}</span></div>
      <div><div class="muted">memory ${bytes(used * 1048576)} of ${bytes(p.memoryMib * 1048576)} in use · ${bytes(p.memoryFreeMib * 1048576)} free</div>
        <div class="bar"><span style="width:${pct.toFixed(1)}%"></span></div></div>
      <div class="kv">
        <div><span class="k">running</span><span class="v">${p.running}</span></div>
        <div><span class="k">offer</span><span class="v">${num(p.offer).toFixed(1)}</span></div>
        <div><span class="k">auctions won</span><span class="v">${p.won}</span></div>
        <div><span class="k">cache hit rate</span><span class="v">${rate}</span></div>
        <div><span class="k">from upstream</span><span class="v">${st ? bytes(st.fetchedBytes) : "—"}</span></div>
        <div><span class="k">zero blocks</span><span class="v">${st ? num(st.zeroBlocks).toLocaleString() : "—"}</span></div>
        <div><span class="k">dirty</span><span class="v">${st ? bytes(st.dirtyBytes) : "—"}</span></div>
        <div><span class="k">cached blocks</span><span class="v">${st ? num(st.cachedBlocks).toLocaleString() : "—"}</span></div>
        <div><span class="k">file channel</span><span class="v">${st ? bytes(st.fileCacheBytes) : "—"}</span></div>
      </div>
      <div class="chips">${images}</div>
    </div>`;
  }).join("") || `<p class="empty">No plant is registered.</p>`;
}

function renderVMs() {
  const vms = state.overview.vms;
  $("vm-count").textContent = vms.length ? `${vms.length} visible to you` : "";
  $("vms-empty").hidden = vms.length > 0;
  $("vms").querySelector("tbody").innerHTML = vms.map((vm) => {
    const s = stateName(vm.state);
    const mine = state.caller && vm.owner === state.caller.name;
    const row = `<tr class="vm" data-vm="${esc(vm.vmId)}" data-state="${esc(s)}">
      <td class="mono" title="${esc(vm.vmId)}">${esc(short(vm.vmId))}</td><td>${esc(vm.owner)}</td>
      <td><span class="state ${esc(s)}">${esc(s)}</span></td><td>${esc(vm.plant || "—")}</td><td>${esc(vm.image || "—")}</td>
      <td>${esc(vm.network?.domain || vm.labels?.domain || "—")}</td><td class="mono">${esc(vm.network?.address || vm.sshEndpoint || "—")}</td>
      <td class="num">${dur(vm.readyNanos)}</td><td class="num">${num(vm.fetchedBytes) ? bytes(vm.fetchedBytes) : "—"}</td>
      <td class="num">${mine ? `<button class="danger destroy" data-vm="${esc(vm.vmId)}">Destroy</button>` : ""}</td></tr>`;
    return row + (state.expanded.has(vm.vmId) ? vmDetail(vm) : "");
  }).join("");
}

function vmDetail(vm) {
  const hw = vm.hardware || {};
  const acts = (vm.actions || []).map((a) => {
    const out = b64(a.stdout), err = b64(a.stderr);
    const tag = a.skipped ? "performed in the golden image" : a.recovered ? "recovered" : a.error ? "failed" : "exit " + (a.exitCode || 0);
    return `<div class="action"><b>${esc(a.id)}</b> <span class="muted">${esc(tag)} · ${dur(a.tookNanos)}</span>
      ${a.error ? `<div class="err">${esc(a.error)}</div>` : ""}${out ? `<pre>${esc(out)}</pre>` : ""}${err ? `<pre class="err">${esc(err)}</pre>` : ""}</div>`;
  }).join("") || `<span class="muted">no configuration actions</span>`;
  return `<tr class="detail"><td colspan="10">
    <div class="muted">${esc(hw.arch || "")} · ${hw.vcpus || "?"} vCPU · ${hw.memoryMib || "?"} MiB · console ${esc(vm.consoleLog || "—")}</div>
    ${vm.error ? `<p class="err">${esc(vm.error)}</p>` : ""}<div class="actions">${acts}</div></td></tr>`;
}

// plot draws series ([{name, color, points: [[x, y]]}]) as inline SVG.
function plot(el, series, fmtY, kind) {
  const W = 600, H = 170, L = 52, B = 20, T = 8, R = 8;
  const pts = series.flatMap((s) => s.points);
  if (!pts.length) { el.innerHTML = `<p class="empty">No data yet.</p>`; return; }
  const xs = pts.map((p) => p[0]), ys = pts.map((p) => p[1]);
  const x0 = Math.min(...xs), x1 = Math.max(...xs, x0 + 1), y1 = Math.max(...ys, 1);
  const X = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R), Y = (y) => H - B - (y / y1) * (H - B - T);
  let g = `<line class="axis" x1="${L}" y1="${H - B}" x2="${W - R}" y2="${H - B}"/><line class="axis" x1="${L}" y1="${T}" x2="${L}" y2="${H - B}"/>`;
  for (const f of [0.5, 1]) g += `<text x="${L - 6}" y="${Y(y1 * f) + 4}" text-anchor="end">${esc(fmtY(y1 * f))}</text><line class="axis" stroke-dasharray="2 3" x1="${L}" x2="${W - R}" y1="${Y(y1 * f)}" y2="${Y(y1 * f)}"/>`;
  g += `<text x="${L}" y="${H - 4}">${new Date(x0).toLocaleTimeString()}</text><text x="${W - R}" y="${H - 4}" text-anchor="end">${new Date(x1).toLocaleTimeString()}</text>`;
  for (const s of series) {
    const p = s.points.slice().sort((a, b) => a[0] - b[0]);
    if (kind === "line" && p.length > 1) g += `<polyline fill="none" stroke="${s.color}" stroke-width="1.8" points="${p.map((q) => X(q[0]) + "," + Y(q[1])).join(" ")}"/>`;
    for (const q of p) g += `<circle cx="${X(q[0])}" cy="${Y(q[1])}" r="${kind === "line" ? 1.8 : 4}" fill="${s.color}"><title>${esc(s.name)}: ${esc(fmtY(q[1]))}</title></circle>`;
  }
  const legend = series.map((s) => `<span><i style="background:${s.color}"></i>${esc(s.name)}</span>`).join("");
  el.innerHTML = `<svg viewBox="0 0 ${W} ${H}" preserveAspectRatio="none">${g}</svg><div class="legend">${legend}</div>`;
}

function renderClones() {
  const by = new Map();
  for (const c of state.clones.values()) {
    if (!by.has(c.plant)) by.set(c.plant, []);
    by.get(c.plant).push([c.at, c.ms]);
  }
  plot($("clone-plot"), [...by].map(([name, points]) => ({ name, color: plantColor(name), points })), (v) => dur(v * 1e6), "dots");
}

function renderWAN() {
  const by = new Map();
  for (let i = 1; i < state.samples.length; i++) {
    const a = state.samples[i - 1], b = state.samples[i];
    for (const [name, st] of Object.entries(b.plants || {})) {
      const prev = a.plants?.[name];
      if (!prev) continue;
      if (!by.has(name)) by.set(name, []);
      by.get(name).push([b.at, Math.max(num(st.fetchedBytes) + num(st.fileCacheBytes) - num(prev.fetchedBytes) - num(prev.fileCacheBytes), 0)]);
    }
  }
  plot($("wan-plot"), [...by].map(([name, points]) => ({ name, color: plantColor(name), points })), bytes, "line");
}

function renderAuctions() {
  const list = [...state.auctions.values()].sort((a, b) => b.at - a.at).slice(0, 30);
  $("auctions-empty").hidden = list.length > 0;
  $("auctions").innerHTML = list.map((a) => {
    const bids = a.bids.slice().sort((x, y) => (x.refusal ? 1 : 0) - (y.refusal ? 1 : 0) || x.cost - y.cost).map((b) =>
      `<span class="bid ${b.plant === a.winner ? "win" : ""} ${b.refusal ? "refused" : ""}" title="${esc(b.refusal)}">${esc(b.plant)} ${b.refusal ? "refused" : num(b.cost).toFixed(2)}</span>`).join("");
    return `<li><span class="mono">${esc(short(a.vm, 20))}</span> <span class="muted">${new Date(a.at).toLocaleTimeString()}${a.winner ? " · won by " + esc(a.winner) : ""}</span><div class="bids">${bids}</div></li>`;
  }).join("");
}

const TASK_STEPS = ["QUEUED", "STAGING_IN", "RUNNING", "STAGING_OUT", "SUCCEEDED"];
function renderTasks() {
  const tasks = state.overview.tasks;
  $("tasks-empty").hidden = tasks.length > 0;
  $("tasks").innerHTML = tasks.slice().reverse().map((t) => {
    const s = stateName(t.state);
    const at = TASK_STEPS.indexOf(s);
    const bad = s === "FAILED" || s === "CANCELED";
    const steps = TASK_STEPS.map((n, i) => `<span class="${bad ? (i === 0 ? "bad" : "") : i <= at ? "done" : ""}" title="${n}"></span>`).join("");
    const took = num(t.finishedUnixNano) ? dur(num(t.finishedUnixNano) - num(t.submittedUnixNano)) : "";
    return `<div class="task" data-task="${esc(t.taskId)}"><div><span class="mono">${esc(short(t.taskId, 20))}</span> <span class="state ${esc(s)}">${esc(s)}</span>
      <span class="muted">${esc(t.owner)} · ${esc(t.plant || "")} ${took ? "· " + took : ""} ${num(t.finishedUnixNano) ? "· exit " + (t.exitCode || 0) : ""}</span></div>
      <div class="timeline">${steps}</div><div class="mono">${esc(t.spec?.command || "")}</div>
      ${t.error ? `<div class="err">${esc(t.error)}</div>` : ""}
      ${(t.outputs || []).length ? `<div class="chips">${t.outputs.map((o) => `<span class="chip">${esc(o)}</span>`).join("")}</div>` : ""}
      ${t.stdoutTail ? `<div class="action"><pre>${esc(t.stdoutTail)}</pre></div>` : ""}${t.stderrTail ? `<div class="action"><pre class="err">${esc(t.stderrTail)}</pre></div>` : ""}</div>`;
  }).join("");
}

function renderImages() {
  const images = state.overview.images;
  const sel = $("create-image"), cur = sel.value;
  sel.innerHTML = `<option value="">best match</option>` + images.filter((m) => !m.writable).map((m) => `<option>${esc(m.name)}</option>`).join("");
  sel.value = cur;
  $("images").innerHTML = images.map((m) => {
    const a = m.attributes || {};
    const files = (m.files || []).map((f) => `<tr><td class="mono">${esc(f.name)}</td><td class="num">${bytes(f.size)}</td><td class="num muted">${bytes(f.nonzeroBytes)} non-zero</td></tr>`).join("");
    const acts = (a.actions || []).map((x) => `<span class="chip" title="${esc(x.digest)}">${esc(x.name || x.kind)}</span>`).join("") || `<span class="muted">none</span>`;
    return `<div class="image" data-image="${esc(m.name)}"><div><b>${esc(m.name)}</b><div class="muted">${esc(a.os || "")} ${esc(a.arch || "")} · ${a.vcpus || "?"} vCPU · ${a.memoryMib || "?"} MiB${m.writable ? " · persistent disk" : ""}</div></div>
      <table class="files">${files}</table><div><div class="muted">performed actions</div><div class="chips">${acts}</div></div></div>`;
  }).join("") || `<p class="empty">The warehouse is empty.</p>`;
}

// ---- actions ----

async function createVM(ev) {
  ev.preventDefault();
  const btn = $("create-submit"), out = $("create-progress");
  const hostname = $("create-hostname").value.trim();
  const req = { requestId: "web-" + Date.now().toString(36) + Math.random().toString(36).slice(2, 8),
    hardware: { vcpus: num($("create-vcpus").value), memoryMib: String(num($("create-memory").value)) },
    image: $("create-image").value, networkDomain: $("create-domain").value.trim(),
    config: { actions: hostname ? [{ id: "hostname", setHostname: { hostname } }] : [] } };
  btn.disabled = true;
  out.hidden = false;
  out.textContent = "";
  const log = (s) => { out.textContent += s + "\n"; out.scrollTop = out.scrollHeight; };
  try {
    const res = await api("POST", "/v1/vms", req);
    await readStream(res, "\n", (line) => {
      const m = JSON.parse(line);
      if (m.error) throw new Error(m.error.message);
      const p = m.result;
      log(`${(num(p.elapsedNanos) / 1e9).toFixed(2)}s  ${p.stage}  ${p.message}`);
    });
    toast("VM created");
  } catch (e) {
    log("error: " + e.message);
    toast(e.message, true);
  } finally {
    btn.disabled = false;
  }
}

async function destroyVM(id) {
  try {
    await api("DELETE", "/v1/vms/" + encodeURIComponent(id));
    toast("VM " + short(id) + " destroyed");
  } catch (e) {
    toast(e.message, true);
  }
}

$("login-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  state.token = $("login-token").value.trim();
  sessionStorage.setItem("vmgrid-token", state.token);
  connect();
});
$("logout").addEventListener("click", () => {
  sessionStorage.removeItem("vmgrid-token");
  state.token = "";
  if (state.abort) state.abort.abort();
  showLogin();
});
$("create-form").addEventListener("submit", createVM);
$("vms").addEventListener("click", (ev) => {
  const d = ev.target.closest("button.destroy");
  if (d) { ev.stopPropagation(); d.disabled = true; destroyVM(d.dataset.vm); return; }
  const row = ev.target.closest("tr.vm");
  if (!row) return;
  const id = row.dataset.vm;
  if (state.expanded.has(id)) state.expanded.delete(id); else state.expanded.add(id);
  renderVMs();
});

if (state.token) connect(); else showLogin();
