// The xcloud dashboard: one page, no build step. Views are chosen by the URL's hash
// (#/, #/workers, #/worker/ID, #/jobs, #/job/ID, #/reservations, #/audit); data comes from /api/...
// and live updates from the server-sent events of /api/events (docs/monitoring.md).
"use strict";

(function () {
  const S = {
    me: null, view: null, workers: new Map(), loadingWorkers: false, sort: { key: "name", dir: 1 },
    filter: "", stateFilter: "", source: null, worker: null, range: 3600,
    charts: {}, chartData: {}, sparks: {}, sparkData: null, grid: {},
    jobs: [], jobsMore: false, loadingJobs: false, jobSort: { key: "submitted_at", dir: -1 },
    jobFilter: "", job: null, jobDetail: null,
  };
  const $ = (sel) => document.querySelector(sel);
  const el = (tag, attrs, ...kids) => {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") node.className = v;
      else if (k.startsWith("data-")) node.setAttribute(k, v);
      else node[k] = v;
    }
    for (const kid of kids) node.append(kid instanceof Node ? kid : String(kid ?? ""));
    return node;
  };

  // ---- formatting
  const UNITS = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
  function bytes(n) {
    if (n === null || n === undefined) return "–";
    let i = 0; n = Number(n);
    while (Math.abs(n) >= 1024 && i < UNITS.length - 1) { n /= 1024; i++; }
    return (i ? n.toFixed(1) : n.toFixed(0)) + " " + UNITS[i];
  }
  const pct = (v) => (v === null || v === undefined) ? "–" : Number(v).toFixed(1) + " %";
  const num = (v, d = 2) => (v === null || v === undefined) ? "–" : Number(v).toFixed(d);
  function ago(ts) {
    if (!ts) return "never";
    const s = Math.max(0, Date.now() / 1000 - ts);
    if (s < 60) return s.toFixed(0) + " s ago";
    if (s < 3600) return (s / 60).toFixed(0) + " min ago";
    if (s < 86400) return (s / 3600).toFixed(1) + " h ago";
    return (s / 86400).toFixed(1) + " d ago";
  }
  const when = (ts) => ts ? new Date(ts * 1000).toLocaleString() : "–";
  const spanName = (s) => s >= 86400 ? (s / 86400) + "d" : s >= 3600 ? (s / 3600) + "h" : (s / 60) + "m";

  // ---- the API
  async function api(path, options = {}) {
    const headers = { "Accept": "application/json" };
    if (options.body !== undefined) headers["Content-Type"] = "application/json";
    if (options.method && options.method !== "GET" && S.me && S.me.csrf) headers["X-XCloud-CSRF"] = S.me.csrf;
    const res = await fetch(path, {
      method: options.method || "GET", credentials: "same-origin", headers,
      body: options.body === undefined ? undefined : JSON.stringify(options.body),
    });
    let data = null;
    try { data = await res.json(); } catch (e) { data = null; }
    if (res.status === 401 && path !== "/api/login") { showLogin(); throw new Error("not logged in"); }
    if (!res.ok) throw new Error((data && data.error) || res.statusText);
    return data;
  }

  // ---- login
  function showLogin(message) {
    S.me = null;
    if (S.source) { S.source.close(); S.source = null; }
    $("#top").hidden = true;
    for (const v of document.querySelectorAll(".view")) v.hidden = true;
    $("#login").hidden = false;
    $("#login-error").textContent = message || "";
    document.body.dataset.view = "login";
  }
  async function login(event) {
    event.preventDefault();
    try {
      S.me = await api("/api/login", { method: "POST", body: {
        principal: $("#login-principal").value.trim(), token: $("#login-token").value.trim() } });
      $("#login-token").value = "";
      start();
    } catch (e) { $("#login-error").textContent = e.message; }
  }
  async function logout() {
    try { await api("/api/logout", { method: "POST", body: {} }); } catch (e) { /* gone anyway */ }
    showLogin("logged out");
  }

  function start() {
    $("#login").hidden = true;
    $("#top").hidden = false;
    $("#grid-name").textContent = "grid " + S.me.grid;
    $("#who").textContent = S.me.principal + " (" + S.me.role + ")";
    $("#jobs-mine-label").hidden = S.me.role !== "admin";
    const jobStates = $("#jobs-state");
    if (jobStates.options.length === 2) {
      for (const st of ["queued", "running", "held", "completed", "failed", "cancelled"]) jobStates.append(el("option", { value: st }, st));
    }
    connectLive();
    route();
  }

  // ---- live updates
  function connectLive() {
    if (S.source) S.source.close();
    const source = new EventSource("/api/events");
    S.source = source;
    let dropped = false;
    source.addEventListener("hello", () => {
      $("#live").classList.remove("off");
      if (dropped) { dropped = false; route(); }
    });
    source.addEventListener("tick", (e) => applyTick(JSON.parse(e.data)));
    source.addEventListener("logout", () => showLogin("your session ended"));
    source.onerror = () => { $("#live").classList.add("off"); dropped = true; };
  }

  function applyTick(tick) {
    S.grid = tick.grid;
    for (const w of tick.workers) {
      const known = S.workers.get(w.id);
      if (known) Object.assign(known, w);
    }
    if (S.view === "overview") { renderCards(); appendSpark(tick); }
    if (S.view === "workers" && !S.loadingWorkers) {
      if (tick.workers.some((w) => !S.workers.has(w.id))) loadWorkers(); else renderWorkers();
    }
    if (S.view === "worker") liveWorker(tick);
    if (tick.jobs_changed) {
      if (S.view === "jobs") loadJobs();
      if (S.view === "job" && S.job) loadJob(S.job);
    }
    if (tick.reservations_changed) {
      if (S.view === "reservations") loadReservations();
      if (S.view === "workers") loadWorkers();
    }
  }

  // ---- router
  function route() {
    if (!S.me) return;
    const hash = location.hash || "#/";
    const parts = hash.slice(2).split("/");
    const view = parts[0] === "" ? "overview" : parts[0];
    S.view = view;
    document.body.dataset.view = view;
    for (const v of document.querySelectorAll(".view")) v.hidden = v.id !== "view-" + view;
    for (const a of document.querySelectorAll("nav a")) {
      a.classList.toggle("active", a.dataset.nav === view || (view === "worker" && a.dataset.nav === "workers") ||
        (view === "job" && a.dataset.nav === "jobs"));
    }
    destroyCharts();
    if (view !== "job") stopFollow();
    if (view === "overview") loadOverview();
    else if (view === "workers") loadWorkers();
    else if (view === "worker") loadWorker(decodeURIComponent(parts.slice(1).join("/")));
    else if (view === "jobs") loadJobs();
    else if (view === "job") loadJob(decodeURIComponent(parts.slice(1).join("/")));
    else if (view === "reservations") loadReservations();
    else if (view === "audit") loadAudit();
  }

  // ---- overview
  const CARDS = [
    ["workers_online", "workers online"], ["workers_draining", "draining"],
    ["workers_lost", "lost"], ["workers_offline", "offline"],
    ["slots_busy", "slots busy", (g) => (g.slots_busy ?? 0) + " / " + (g.slots_total ?? 0)],
    ["reservations", "reservations"], ["exec_sessions", "commands running"],
    ["heartbeats_per_s", "heartbeats / s", (g) => num(g.heartbeats_per_s, 1)],
    ["jobs_queued", "jobs queued"], ["jobs_running", "jobs running"], ["jobs_held", "jobs held"],
    ["jobs_completed_per_min", "jobs completed / min", (g) => num(g.jobs_completed_per_min, 1)],
    ["jobs_failed_per_min", "jobs failed / min", (g) => num(g.jobs_failed_per_min, 1)],
  ];
  const SPARKS = [["workers_online", "Workers online"], ["slots_busy", "Slots busy"],
    ["reservations", "Reservations"], ["exec_sessions", "Commands running"],
    ["heartbeats_per_s", "Heartbeats / s"], ["jobs_queued", "Jobs queued"],
    ["jobs_running", "Jobs running"], ["jobs_completed_per_min", "Jobs completed / min"],
    ["jobs_failed_per_min", "Jobs failed / min"]];

  async function loadOverview() {
    const data = await api("/api/overview");
    S.grid = data.grid;
    renderCards();
    S.sparkData = data.series;
    const box = $("#sparklines");
    box.replaceChildren();
    S.sparks = {};
    for (const [key, title] of SPARKS) {
      const holder = el("div", { class: "spark", "data-series": key }, el("h3", {}, title));
      box.append(holder);
      S.sparks[key] = makeChart(holder, [title], [data.series.t, data.series[key] || []], 150, {});
    }
  }
  function renderCards() {
    const g = S.grid || {};
    const box = $("#cards");
    box.replaceChildren(...CARDS.map(([key, label, fmt]) => el("div", { class: "card", "data-card": key },
      el("div", { class: "value" }, fmt ? fmt(g) : String(g[key] ?? 0)), el("div", { class: "label" }, label))));
  }
  function appendSpark(tick) {
    const d = S.sparkData;
    if (!d) return;
    d.t.push(tick.now);
    for (const [key] of SPARKS) { (d[key] = d[key] || []).push(tick.grid[key] ?? null); }
    while (d.t.length && d.t[0] < tick.now - 3600) { d.t.shift(); for (const [key] of SPARKS) d[key].shift(); }
    for (const [key] of SPARKS) if (S.sparks[key]) S.sparks[key].setData([d.t, d[key]]);
  }

  // ---- workers table
  async function loadWorkers() {
    // One request at a time: ticks that arrive meanwhile are folded in by the next render.
    if (S.loadingWorkers) return;
    S.loadingWorkers = true;
    let data;
    try { data = await api("/api/workers"); } finally { S.loadingWorkers = false; }
    S.workers = new Map(data.workers.map((w) => [w.id, w]));
    const select = $("#workers-state");
    if (select.options.length === 1) {
      for (const s of (S.me.series || []).filter((x) => x.startsWith("workers_")).map((x) => x.slice(8))) {
        select.append(el("option", { value: s }, s));
      }
    }
    renderWorkers();
  }
  function sortValue(w, key) {
    if (key === "busy") return (w.slots || 0) - (w.free_slots || 0);
    if (key === "holder") return w.reservation ? (w.reservation.client || "~") : "";
    const v = w[key];
    return v === undefined || v === null ? -Infinity : v;
  }
  function renderWorkers() {
    const f = S.filter.toLowerCase();
    let rows = [...S.workers.values()].filter((w) => (!S.stateFilter || w.state === S.stateFilter) &&
      (!f || [w.id, w.name, w.state, w.os, w.arch, ...(w.tags || [])].join(" ").toLowerCase().includes(f)));
    const { key, dir } = S.sort;
    rows.sort((a, b) => {
      const x = sortValue(a, key), y = sortValue(b, key);
      return x < y ? -dir : x > y ? dir : a.id < b.id ? -dir : a.id > b.id ? dir : 0;
    });
    $("#workers-count").textContent = rows.length + " of " + S.workers.size;
    for (const th of document.querySelectorAll("#workers-table th")) {
      th.classList.toggle("sorted-asc", th.dataset.sort === key && dir > 0);
      th.classList.toggle("sorted-desc", th.dataset.sort === key && dir < 0);
    }
    $("#workers-table tbody").replaceChildren(...rows.map(workerRow));
  }
  function workerRow(w) {
    const bar = el("span", { class: "bar" }, el("i"));
    bar.firstChild.style.width = Math.min(100, w.cpu || 0) + "%";
    const holder = w.reservation ? (w.reservation.client ? w.reservation.client +
      (w.reservation.client === S.me.principal ? " (you)" : "") : "reserved") : "";
    const link = el("a", { href: "#/worker/" + encodeURIComponent(w.id) }, w.name);
    const name = w.name === w.id ? el("td", {}, link) : el("td", {}, link, " ", el("span", { class: "muted" }, w.id));
    return el("tr", { "data-worker": w.id, "data-state": w.state },
      name, el("td", {}, el("span", { class: "badge " + w.state }, w.state)),
      el("td", {}, w.cpus), el("td", {}, bytes(w.memory_bytes)), el("td", {}, (w.os || "?") + " / " + (w.arch || "?")),
      el("td", {}, ((w.slots || 0) - (w.free_slots || 0)) + " / " + (w.slots || 0)),
      el("td", { "data-cpu": w.cpu ?? "" }, bar, pct(w.cpu)), el("td", {}, num(w.load)),
      el("td", {}, bytes(w.mem)), el("td", {}, holder), el("td", {}, w.execs || 0),
      el("td", { title: when(w.last_seen) }, ago(w.last_seen)));
  }

  // ---- one worker
  const CHARTS = [
    { key: "cpu", title: "CPU %", series: [["cpu", "avg"], ["cpu_max", "max"]], scale: { min: 0, max: 100 } },
    { key: "mem", title: "Memory used", series: [["mem", "avg"], ["mem_max", "max"]], fmt: bytes },
    { key: "net", title: "Network (bytes/s)", series: [["rx", "received"], ["tx", "sent"]], fmt: bytes },
    { key: "load", title: "Load (1 min)", series: [["load", "load1"]] },
    { key: "gpu", title: "GPU %", series: [["gpu", "avg"], ["gpu_max", "max"]], scale: { min: 0, max: 100 }, gpu: true },
    { key: "gpu_mem", title: "GPU memory used", series: [["gpu_mem", "avg"]], fmt: bytes, gpu: true },
  ];
  async function loadWorker(wid) {
    S.worker = wid;
    let detail;
    try { detail = await api("/api/workers/" + encodeURIComponent(wid)); }
    catch (e) { $("#worker-name").textContent = wid; $("#worker-summary").textContent = e.message; return; }
    S.detail = detail;
    renderWorkerHead(detail);
    $("#ranges").replaceChildren(...S.me.ranges.map((r) => {
      const b = el("button", { type: "button", "data-range": r }, spanName(r));
      b.classList.toggle("active", r === S.range);
      b.onclick = () => { S.range = r; loadWorker(wid); };
      return b;
    }));
    $("#events-table tbody").replaceChildren(...detail.events.map((e) => el("tr", {},
      el("td", {}, when(e.ts)), el("td", {}, e.old_state || "(joined)"), el("td", {}, e.new_state),
      el("td", {}, e.reason))));
    const data = await api("/api/workers/" + encodeURIComponent(wid) + "/series?range=" + S.range);
    if (S.worker !== wid || S.view !== "worker") return;
    S.series = data;
    drawWorkerCharts(data, detail.gpus > 0 || (data.gpu || []).some((v) => v !== null));
  }
  function renderWorkerHead(d) {
    $("#worker-name").textContent = d.name === d.id ? d.name : d.name + " (" + d.id + ")";
    const badge = $("#worker-state");
    badge.textContent = d.state; badge.className = "badge " + d.state;
    const held = d.reservation ? (d.reservation.client ? "reserved by " + d.reservation.client : "reserved") : "free";
    $("#worker-summary").textContent = [d.id, d.cpus + " CPUs", bytes(d.memory_bytes), (d.os || "?") + "/" + (d.arch || "?"),
      (d.executors || []).join(", "), d.gpus ? d.gpus + " GPU(s)" : "", held, d.state_reason ? "— " + d.state_reason : "",
      "last seen " + ago(d.last_seen)].filter(Boolean).join(" · ");
    const drain = $("#drain");
    drain.hidden = !(S.me.role === "admin" && (d.state === "online" || d.state === "draining"));
    drain.textContent = d.state === "draining" ? "Resume" : "Drain";
    drain.onclick = () => doDrain(d.id, d.state !== "draining");
  }
  async function doDrain(wid, drain) {
    $("#drain-error").textContent = "";
    try { await api("/api/workers/" + encodeURIComponent(wid) + "/drain", { method: "POST", body: { drain } }); loadWorker(wid); }
    catch (e) { $("#drain-error").textContent = e.message; }
  }
  function drawWorkerCharts(data, withGpu) {
    destroyCharts();
    const box = $("#charts");
    box.replaceChildren();
    for (const spec of CHARTS) {
      if (spec.gpu && !withGpu) continue;
      const columns = spec.series.filter(([name]) => data[name]);
      const holder = el("div", { class: "chart", "data-chart": spec.key }, el("h3", {}, spec.title));
      box.append(holder);
      const cols = [data.t.slice(), ...columns.map(([name]) => data[name].slice())];
      S.chartData[spec.key] = { names: columns.map(([n]) => n), cols };
      S.charts[spec.key] = makeChart(holder, columns.map(([, label]) => label), cols, 220, spec);
      holder.dataset.points = String(cols[1].filter((v) => v !== null).length);
    }
  }
  function liveWorker(tick) {
    const mine = tick.workers.find((w) => w.id === S.worker);
    if (!mine) return;
    if (S.detail) { Object.assign(S.detail, mine); renderWorkerHead(S.detail); }
    if (!S.series || S.series.res !== 0 || !mine.t) return;
    for (const [key, chart] of Object.entries(S.charts)) {
      const d = S.chartData[key];
      if (!d || (d.cols[0].length && mine.t <= d.cols[0][d.cols[0].length - 1])) continue;
      d.cols[0].push(mine.t);
      d.names.forEach((name, i) => d.cols[i + 1].push(mine[name] ?? null));
      while (d.cols[0].length && d.cols[0][0] < mine.t - S.range) d.cols.forEach((c) => c.shift());
      chart.setData(d.cols);
      chart.root.parentNode.dataset.points = String(d.cols[1].filter((v) => v !== null).length);
    }
  }

  // ---- charts (uPlot)
  const COLORS = ["#2f6fde", "#d64545", "#1f9d55", "#c98a00"];
  function makeChart(holder, labels, data, height, spec) {
    const width = Math.max(280, holder.clientWidth - 14);
    const fmt = spec.fmt;
    const opts = {
      width, height, legend: { show: labels.length > 1 },
      scales: { x: { time: true }, y: spec.scale ? { range: [spec.scale.min, spec.scale.max] } : {} },
      axes: [{}, { size: 70, values: (u, ticks) => ticks.map((v) => fmt ? fmt(v) : v) }],
      series: [{}, ...labels.map((label, i) => ({ label, stroke: COLORS[i % COLORS.length], width: 1.5,
        spanGaps: false, points: { show: false } }))],
    };
    return new uPlot(opts, data, holder);
  }
  function destroyCharts() {
    for (const c of Object.values(S.charts)) c.destroy();
    for (const c of Object.values(S.sparks)) c.destroy();
    S.charts = {}; S.sparks = {}; S.chartData = {};
  }

  // ---- jobs (clients see their own, admins everybody's: the server decides)
  async function loadJobs() {
    if (S.loadingJobs) return;
    S.loadingJobs = true;
    const params = new URLSearchParams({ limit: "200" });
    const state = $("#jobs-state").value;
    if (state) params.set("state", state);
    if ($("#jobs-mine").checked) params.set("mine", "1");
    let data;
    try { data = await api("/api/jobs?" + params); } finally { S.loadingJobs = false; }
    if (S.view !== "jobs") return;
    S.jobs = data.jobs; S.jobsMore = data.more;
    renderJobs();
  }
  async function moreJobs() {
    if (!S.jobs.length) return;
    const params = new URLSearchParams({ limit: "200", before: S.jobs[S.jobs.length - 1].id });
    const state = $("#jobs-state").value;
    if (state) params.set("state", state);
    if ($("#jobs-mine").checked) params.set("mine", "1");
    const data = await api("/api/jobs?" + params);
    const known = new Set(S.jobs.map((j) => j.id));
    S.jobs = S.jobs.concat(data.jobs.filter((j) => !known.has(j.id)));
    S.jobsMore = data.more;
    renderJobs();
  }
  function jobDuration(j) {
    if (!j.started_at) return null;
    return (j.ended_at || Date.now() / 1000) - j.started_at;
  }
  function jobSortValue(j, key) {
    const v = key === "duration" ? jobDuration(j) : key === "worker" ? (j.worker_name || j.worker) : j[key];
    return v === undefined || v === null ? -Infinity : v;
  }
  function renderJobs() {
    const f = S.jobFilter.toLowerCase();
    const rows = S.jobs.filter((j) => !f || [j.id, j.name, j.owner, j.state, j.command, j.worker, j.worker_name, j.batch]
      .join(" ").toLowerCase().includes(f));
    const { key, dir } = S.jobSort;
    rows.sort((a, b) => {
      const x = jobSortValue(a, key), y = jobSortValue(b, key);
      return x < y ? -dir : x > y ? dir : a.id < b.id ? -dir : a.id > b.id ? dir : 0;
    });
    $("#jobs-count").textContent = rows.length + " of " + S.jobs.length + (S.jobsMore ? "+" : "");
    $("#jobs-more").hidden = !S.jobsMore;
    for (const th of document.querySelectorAll("#jobs-table th")) {
      th.classList.toggle("sorted-asc", th.dataset.sort === key && dir > 0);
      th.classList.toggle("sorted-desc", th.dataset.sort === key && dir < 0);
    }
    $("#jobs-table tbody").replaceChildren(...rows.map(jobRow));
  }
  function jobRow(j) {
    const link = el("a", { href: "#/job/" + encodeURIComponent(j.id) }, j.name || j.id);
    const name = j.name ? el("td", {}, link, " ", el("span", { class: "muted" }, j.id)) : el("td", {}, link);
    const d = jobDuration(j);
    return el("tr", { "data-job": j.id, "data-state": j.state },
      name, el("td", {}, j.owner), el("td", {}, el("span", { class: "badge " + j.state }, j.state)),
      el("td", { class: "cmd" }, j.command), el("td", {}, j.worker ? (j.worker_name || j.worker) : ""),
      el("td", {}, j.attempts), el("td", {}, j.exit_code ?? ""), el("td", { title: when(j.submitted_at) }, ago(j.submitted_at)),
      el("td", {}, d === null ? "–" : num(d, 1) + " s"));
  }

  async function loadJob(jid) {
    S.job = jid;
    let d;
    try { d = await api("/api/jobs/" + encodeURIComponent(jid)); }
    catch (e) { $("#job-name").textContent = jid; $("#job-summary").textContent = e.message; return; }
    if (S.job !== jid || S.view !== "job") return;
    S.jobDetail = d;
    $("#job-name").textContent = d.name ? d.name + " (" + d.id + ")" : d.id;
    const badge = $("#job-state");
    badge.textContent = d.state; badge.className = "badge " + d.state;
    $("#job-summary").textContent = ["owner " + d.owner, "batch " + d.batch, "priority " + d.priority,
      d.cpus + " CPU(s)", d.memory_bytes ? bytes(d.memory_bytes) : "", "submitted " + when(d.submitted_at),
      d.ended_at ? "ended " + when(d.ended_at) : "", d.hold_reason ? "held: " + d.hold_reason : "",
      "retries " + d.job_failures + "/" + d.max_retries + ", system " + d.system_failures + "/" + d.max_system_retries,
    ].filter(Boolean).join(" · ");
    $("#job-command").textContent = d.command;
    const start = d.submitted_at, end = Math.max(d.ended_at || Date.now() / 1000, start + 1);
    const span = end - start;
    const pos = (t) => Math.max(0, Math.min(100, ((t - start) / span) * 100));
    $("#attempts-table tbody").replaceChildren(...d.attempts_list.map((a) => {
      const bar = el("span", { class: "timeline" });
      const began = a.started_at || a.acked_at || a.assigned_at;
      const wait = el("i", { class: "wait" });
      wait.style.left = pos(a.assigned_at) + "%"; wait.style.width = Math.max(0.5, pos(began) - pos(a.assigned_at)) + "%";
      const run = el("i", { class: a.kind === "success" ? "success" : a.live ? "" : "failed" });
      run.style.left = pos(began) + "%"; run.style.width = Math.max(0.5, pos(a.ended_at || end) - pos(began)) + "%";
      bar.append(wait, run);
      return el("tr", { "data-attempt": a.id, "data-kind": a.kind },
        el("td", {}, a.id), el("td", {}, el("a", { href: "#/worker/" + encodeURIComponent(a.worker) }, a.worker_name || a.worker)),
        el("td", {}, el("span", { class: "badge" }, a.kind)), el("td", {}, bar),
        clock(a.assigned_at), clock(a.acked_at), clock(a.started_at), clock(a.ended_at), el("td", {}, a.exit_code ?? ""), el("td", { class: "cmd" }, a.error || ""));
    }));
    followJob(d);
    const r = d.result;
    $("#job-result").hidden = !r;
    if (r) {
      $("#job-result-summary").textContent = [r.kind, "exit " + (r.exit_code ?? "?"),
        r.duration_s !== undefined && r.duration_s !== null ? num(r.duration_s, 2) + " s" : "", r.error ? "error: " + r.error : ""]
        .filter(Boolean).join(" · ");
      showOutput("stdout", r.stdout_preview);
      showOutput("stderr", r.stderr_preview);
    }
  }
  // A running job's stdout and stderr as they come (/api/jobs/ID/output, server-sent
  // events). Text goes in with textContent only: job output never becomes HTML.
  const LIVE_KEEP = 256 * 1024;  // characters of each stream the page holds
  function followJob(d) {
    const key = d.id + "/" + d.current_attempt;
    if (S.outKey === key) return;  // following (or followed to its end) this attempt
    if (S.outJob !== d.id) stopFollow();
    if (d.state !== "running") return;
    if (S.outSource) S.outSource.close();  // a new attempt of this job
    S.outJob = d.id; S.outKey = key;
    delete $("#job-live").dataset.ended;
    $("#job-live").hidden = false;
    $("#job-live-state").textContent = "(following)";
    const source = new EventSource("/api/jobs/" + encodeURIComponent(d.id) + "/output");
    S.outSource = source;
    const put = (stream, text, replace) => {
      const box = $("#job-live-" + stream);
      const all = (replace ? "" : box.textContent) + text;
      box.textContent = all.length > LIVE_KEEP ? all.slice(all.length - LIVE_KEEP) : all;
    };
    source.addEventListener("snapshot", (e) => {
      const m = JSON.parse(e.data);
      put("stdout", m.stdout, true); put("stderr", m.stderr, true);
    });
    source.addEventListener("output", (e) => { const m = JSON.parse(e.data); put(m.stream, m.text, false); });
    source.addEventListener("end", (e) => {
      const m = JSON.parse(e.data);
      $("#job-live-state").textContent = "(" + m.line + ")";
      $("#job-live").dataset.ended = "1";
      source.close();
      if (S.outSource === source) S.outSource = null;
      if (S.view === "job" && S.job === d.id) loadJob(d.id);
    });
  }
  function stopFollow() {
    if (S.outSource) S.outSource.close();
    S.outSource = null; S.outJob = null; S.outKey = null;
    const live = $("#job-live");
    live.hidden = true; delete live.dataset.ended;
    $("#job-live-stdout").textContent = ""; $("#job-live-stderr").textContent = "";
  }
  function clock(ts) {
    return el("td", { title: when(ts) }, ts ? new Date(ts * 1000).toLocaleTimeString() : "–");
  }
  function showOutput(which, p) {
    const box = $("#job-" + which), note = $("#job-" + which + "-note");
    box.textContent = p ? p.text : "";
    box.dataset.loaded = p ? "1" : "0";
    note.textContent = !p ? "(none)" : p.missing ? "(no longer stored)" :
      p.truncated ? "(first " + bytes(p.shown) + " of " + bytes(p.size) + ")" : "(" + bytes(p.size) + ")";
  }

  // ---- reservations and audit
  async function loadReservations() {
    const all = $("#res-all").checked;
    const data = await api("/api/reservations?active=" + (all ? "0" : "1"));
    $("#reservations-table tbody").replaceChildren(...data.reservations.map((r) => el("tr", { "data-reservation": r.id },
      el("td", {}, r.id), el("td", {}, el("a", { href: "#/worker/" + encodeURIComponent(r.worker) }, r.worker_name || r.worker)),
      el("td", {}, r.client), el("td", {}, el("span", { class: "badge" }, r.state)), el("td", {}, when(r.created_at)),
      el("td", {}, r.state === "ended" ? "–" : when(r.expires_at)),
      el("td", {}, r.ended_at ? when(r.ended_at) + " (" + (r.ended_reason || "") + ")" : ""))));
  }
  async function loadAudit() {
    const data = await api("/api/audit?limit=200");
    $("#audit-table tbody").replaceChildren(...data.records.map((r) => el("tr", { "data-exec": r.exec_id },
      el("td", {}, when(r.started_at)), el("td", {}, r.client), el("td", {}, r.worker),
      el("td", { class: "cmd" }, r.command), el("td", {}, r.duration_s === undefined ? "–" : num(r.duration_s, 2) + " s"),
      el("td", {}, r.error ? "error: " + r.error : r.timed_out ? "timed out" : r.signal ? "signal " + r.signal :
        "exit " + (r.exit_code ?? "?")))));
  }

  // ---- wiring
  window.xcloud = {
    chartData: (key) => S.chartData[key] ? S.chartData[key].cols : null,
    workers: () => [...S.workers.values()],
    jobs: () => S.jobs.slice(),
  };
  document.addEventListener("DOMContentLoaded", async () => {
    $("#login-form").addEventListener("submit", login);
    $("#logout").addEventListener("click", logout);
    $("#workers-filter").addEventListener("input", (e) => { S.filter = e.target.value; renderWorkers(); });
    $("#workers-state").addEventListener("change", (e) => { S.stateFilter = e.target.value; renderWorkers(); });
    $("#res-all").addEventListener("change", loadReservations);
    $("#jobs-filter").addEventListener("input", (e) => { S.jobFilter = e.target.value; renderJobs(); });
    $("#jobs-state").addEventListener("change", loadJobs);
    $("#jobs-mine").addEventListener("change", loadJobs);
    $("#jobs-more").addEventListener("click", moreJobs);
    for (const th of document.querySelectorAll("#jobs-table th[data-sort]")) {
      th.addEventListener("click", () => {
        const key = th.dataset.sort;
        S.jobSort = { key, dir: S.jobSort.key === key ? -S.jobSort.dir : 1 };
        renderJobs();
      });
    }
    for (const th of document.querySelectorAll("#workers-table th[data-sort]")) {
      th.addEventListener("click", () => {
        const key = th.dataset.sort;
        S.sort = { key, dir: S.sort.key === key ? -S.sort.dir : 1 };
        renderWorkers();
      });
    }
    window.addEventListener("hashchange", route);
    try { S.me = await api("/api/me"); start(); } catch (e) { if (S.me === null) showLogin(); }
  });
})();
