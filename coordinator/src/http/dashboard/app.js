// flotilla's dashboard: reads the coordinator's HTTP API (/api/v1) with
// an API token kept in session storage and sent only in the Authorization
// header; follows a job through its server-sent events, read with fetch so
// that the token stays in a header. Plain DOM and SVG, no libraries.
"use strict";

const TOKEN_KEY = "flotilla-token";
const SVG = "http://www.w3.org/2000/svg";
const REFRESH_MS = 2000;
const MAX_DRAWN = 2000;

let view = null; // the current view's stop function

function token() {
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

async function api(path, signal) {
  const resp = await fetch(path, { headers: { Authorization: "Bearer " + token() }, signal });
  const body = await resp.json().catch(() => ({}));
  if (!resp.ok) {
    throw new ApiError(resp.status, body.code || "error", body.message || resp.statusText);
  }
  return body;
}

// ---------------------------------------------------------------- DOM help

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") e.className = v;
    else if (k.startsWith("data-")) e.setAttribute(k, v);
    else e[k] = v;
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    e.append(c instanceof Node ? c : String(c));
  }
  return e;
}

function svg(tag, attrs) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  return e;
}

function table(id, headers, rows) {
  return el("table", { id },
    el("thead", {}, el("tr", {}, headers.map((h) => el("th", {}, h)))),
    el("tbody", {}, rows));
}

function section(title, ...content) {
  return el("section", {}, el("h2", {}, title), content);
}

function fmt(x, digits) {
  if (x === null || x === undefined || Number.isNaN(x)) return "–";
  if (typeof x !== "number") return String(x);
  if (x !== 0 && (Math.abs(x) < 1e-3 || Math.abs(x) >= 1e6)) return x.toExponential(digits || 3);
  return x.toFixed(digits === undefined ? 4 : digits);
}

function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i === 0 ? n : n.toFixed(1)) + " " + units[i];
}

function when(ms) {
  return ms ? new Date(ms).toLocaleString() : "–";
}

function setStatus(text, error) {
  const s = document.getElementById("status");
  s.textContent = text;
  s.className = error ? "error" : "";
}

function phaseBadge(phase) {
  return el("span", { class: "phase phase-" + phase }, phase);
}

// ---------------------------------------------------------------- charts

// A line chart of one or more series of {x, y}; its svg carries the number
// of points of the first series in data-points (all of them, drawn or not).
function chart(id, title, series) {
  const W = 420, H = 180, L = 56, R = 10, T = 10, B = 24;
  const box = svg("svg", { id, class: "chart", viewBox: `0 0 ${W} ${H}`, role: "img" });
  const pts = series.flatMap((s) => s.points.filter((p) => Number.isFinite(p.y)));
  box.setAttribute("data-points", String(series[0].points.filter((p) => Number.isFinite(p.y)).length));
  const wrap = el("figure", { class: "chart-box" }, el("figcaption", {}, title), box);
  if (pts.length === 0) {
    const t = svg("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "empty" });
    t.textContent = "no points yet";
    box.append(t);
    return wrap;
  }
  let [x0, x1] = [Math.min(...pts.map((p) => p.x)), Math.max(...pts.map((p) => p.x))];
  let [y0, y1] = [Math.min(...pts.map((p) => p.y)), Math.max(...pts.map((p) => p.y))];
  if (x1 === x0) x1 = x0 + 1;
  if (y1 === y0) { y1 += Math.abs(y1) * 0.05 || 1; y0 -= Math.abs(y0) * 0.05 || 1; }
  const sx = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const sy = (y) => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
  for (const f of [0, 0.5, 1]) {
    const y = y0 + f * (y1 - y0);
    box.append(svg("line", { x1: L, x2: W - R, y1: sy(y), y2: sy(y), class: "grid" }));
    const t = svg("text", { x: L - 4, y: sy(y) + 4, "text-anchor": "end", class: "tick" });
    t.textContent = Math.abs(y) >= 1e5 || (y !== 0 && Math.abs(y) < 1e-4) ? y.toExponential(2) : String(Number(y.toPrecision(3)));
    box.append(t);
  }
  for (const x of [x0, x1]) {
    const t = svg("text", { x: sx(x), y: H - 6, "text-anchor": x === x0 ? "start" : "end", class: "tick" });
    t.textContent = String(Math.round(x));
    box.append(t);
  }
  series.forEach((s, i) => {
    let ps = s.points.filter((p) => Number.isFinite(p.y));
    if (ps.length === 0) return;
    // A long run draws at most about MAX_DRAWN points (always its last).
    if (ps.length > MAX_DRAWN) {
      const stride = Math.ceil(ps.length / MAX_DRAWN);
      ps = ps.filter((_, k) => k % stride === 0 || k === ps.length - 1);
    }
    const line = svg("polyline", {
      class: "series series-" + i,
      points: ps.map((p) => `${sx(p.x).toFixed(1)},${sy(p.y).toFixed(1)}`).join(" "),
    });
    box.append(line);
    if (ps.length < 40 || s.dots) {
      for (const p of ps) box.append(svg("circle", { cx: sx(p.x), cy: sy(p.y), r: 2.5, class: "dot series-" + i }));
    }
  });
  if (series.length > 1) {
    wrap.append(el("div", { class: "legend" },
      series.map((s, i) => el("span", { class: "key series-" + i }, s.name))));
  }
  return wrap;
}

// ---------------------------------------------------------------- events

// Follows a job's server-sent events with fetch (the token in a header),
// calling onEvent(name, data) for each; reconnects until the job ended or
// the view stops. Returns the stop function.
function follow(jobId, onOpen, onEvent) {
  const ctl = new AbortController();
  let ended = false;
  (async () => {
    while (!ctl.signal.aborted && !ended) {
      try {
        const resp = await fetch(`/api/v1/jobs/${encodeURIComponent(jobId)}/events`, {
          headers: { Authorization: "Bearer " + token(), Accept: "text/event-stream" },
          signal: ctl.signal,
        });
        if (!resp.ok) {
          const body = await resp.json().catch(() => ({}));
          throw new ApiError(resp.status, body.code, body.message || resp.statusText);
        }
        onOpen();
        setStatus("live");
        const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
        let buf = "";
        let name = "message", data = [];
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buf += value;
          let nl;
          while ((nl = buf.indexOf("\n")) >= 0) {
            const line = buf.slice(0, nl).replace(/\r$/, "");
            buf = buf.slice(nl + 1);
            if (line === "") {
              if (data.length) {
                const payload = JSON.parse(data.join("\n"));
                if (name === "end") ended = true;
                onEvent(name, payload);
              }
              name = "message";
              data = [];
            } else if (line.startsWith("event:")) {
              name = line.slice(6).trim();
            } else if (line.startsWith("data:")) {
              data.push(line.slice(5).replace(/^ /, ""));
            }
          }
        }
      } catch (e) {
        if (ctl.signal.aborted) return;
        if (e instanceof ApiError && e.status === 401) return loggedOut(e.message);
        setStatus("reconnecting: " + e.message, true);
      }
      if (!ended && !ctl.signal.aborted) await new Promise((r) => setTimeout(r, REFRESH_MS));
    }
    if (ended) setStatus("ended");
  })();
  return () => ctl.abort();
}

// ---------------------------------------------------------------- views

// Runs refresh() now and every REFRESH_MS until stopped.
function poll(refresh) {
  let stopped = false, timer = null;
  const run = async () => {
    try {
      await refresh();
      if (!stopped) setStatus("updated " + new Date().toLocaleTimeString());
    } catch (e) {
      if (e instanceof ApiError && e.status === 401) return loggedOut(e.message);
      setStatus(e.message, true);
    }
    if (!stopped) timer = setTimeout(run, REFRESH_MS);
  };
  run();
  return () => { stopped = true; clearTimeout(timer); };
}

function jobsView(root) {
  return poll(async () => {
    const [{ jobs }, { sweeps }] = await Promise.all([api("/api/v1/jobs"), api("/api/v1/sweeps")]);
    const rows = jobs.slice().reverse().map((j) => el("tr", { class: "job", "data-job": j.job_id },
      el("td", {}, el("a", { href: "#/jobs/" + encodeURIComponent(j.job_id) }, j.name)),
      el("td", {}, j.job_id),
      el("td", {}, phaseBadge(j.phase)),
      el("td", { class: "progress" }, progressBar(j.step, j.total_steps)),
      el("td", { class: "num" }, fmt(j.loss)),
      el("td", { class: "num" }, j.queue_position ?? "–"),
      el("td", { class: "num" }, j.priority),
      el("td", { class: "num" }, j.world_size)));
    const sweepRows = sweeps.slice().reverse().map((s) => el("tr", { class: "sweep" },
      el("td", {}, el("a", { href: "#/sweeps/" + encodeURIComponent(s.sweep_id) }, s.name)),
      el("td", {}, s.sweep_id),
      el("td", {}, s.state),
      el("td", {}, `${s.goal} ${s.metric}`),
      el("td", { class: "num" }, s.trials.length),
      el("td", { class: "num" }, fmt(best(s)?.metric))));
    root.replaceChildren(
      section("Jobs", jobs.length ? table("jobs",
        ["name", "id", "phase", "progress", "loss", "queue", "priority", "workers"], rows)
        : el("p", { class: "empty" }, "no jobs yet")),
      section("Sweeps", sweeps.length ? table("sweeps",
        ["name", "id", "state", "goal", "trials", "best"], sweepRows)
        : el("p", { class: "empty" }, "no sweeps")));
  });
}

function progressBar(step, total) {
  const frac = total ? Math.min(1, step / total) : 0;
  const bar = el("span", { class: "bar" }, el("span", { class: "fill" }));
  bar.firstChild.style.width = (100 * frac).toFixed(1) + "%";
  return el("span", {}, bar, ` ${step}/${total}`);
}

function best(sweep) {
  return sweep.trials.filter((t) => t.rank).sort((a, b) => a.rank - b.rank)[0];
}

// The split of a rank's step as a stacked bar, and its parts as text.
const PARTS = [
  ["compute_ms", "forward+backward"],
  ["stage_wait_ms", "stage wait"],
  ["comm_ms", "exposed comm"],
  ["optimizer_ms", "optimizer"],
  ["data_wait_ms", "data wait"],
];

function splitBar(t, scale) {
  const bar = el("span", { class: "split" });
  bar.style.width = Math.max(2, (100 * t.step_ms) / scale).toFixed(1) + "%";
  PARTS.forEach(([k, name], i) => {
    const part = el("span", { class: "part part-" + i, title: `${name} ${fmt(t[k], 2)} ms` });
    part.style.width = t.step_ms > 0 ? ((100 * t[k]) / t.step_ms).toFixed(1) + "%" : "0";
    bar.append(part);
  });
  return bar;
}

function ranksTable(r) {
  const timed = r.ranks.filter((x) => x.step_times);
  const scale = Math.max(1e-9, ...timed.map((x) => x.step_times.step_ms));
  const rows = r.ranks.map((x) => {
    const m = x.memory, t = x.step_times;
    const total = m ? m.params_bytes + m.grads_bytes + m.optimizer_bytes + m.activation_bytes : null;
    const slow = timed.length > 1 && r.slowest_rank === x.rank;
    return el("tr", { class: "rank" + (slow ? " slow" : ""), "data-rank": x.rank },
      el("td", {}, x.worker_id),
      el("td", { class: "num" }, x.rank),
      el("td", { class: "num" }, x.stage),
      el("td", { class: "num" }, x.replica),
      el("td", { class: "num", title: m ? `params ${bytes(m.params_bytes)}, grads ${bytes(m.grads_bytes)}, `
        + `optimizer ${bytes(m.optimizer_bytes)}, activations ${bytes(m.activation_bytes)}` : "" }, bytes(total)),
      el("td", { class: "num" }, t ? fmt(t.step_ms, 2) : "–"),
      PARTS.map(([k]) => el("td", { class: "num" }, t ? fmt(t[k], 2) : "–")),
      el("td", { class: "split-cell" }, t ? splitBar(t, scale) : "", slow ? el("span", { class: "slow-tag" }, "slowest") : ""));
  });
  return el("div", {},
    table("ranks", ["worker", "rank", "stage", "replica", "memory", "step ms",
      ...PARTS.map(([, n]) => n + " ms"), "split"], rows),
    el("div", { class: "legend" }, PARTS.map(([, n], i) => el("span", { class: "key part-" + i }, n))));
}

function jobView(root, jobId) {
  let points = [];
  let job = null;
  const head = el("div", { id: "job-head" });
  const charts = el("div", { class: "charts" });
  const details = el("div", { id: "job-details" });
  root.replaceChildren(head, charts, details);

  const drawHead = () => {
    if (!job) return;
    const last = points.length ? points[points.length - 1] : null;
    const ended = ["succeeded", "failed", "cancelled"].includes(job.phase);
    const finalLoss = ended && last ? el("div", { class: "final" }, "final loss ",
      el("strong", { id: "final-loss", "data-value": String(last.loss) }, fmt(last.loss))) : null;
    head.replaceChildren(...[
      el("h1", {}, job.name, " ", phaseBadge(job.phase)),
      el("p", { class: "muted" }, job.job_id, job.message ? " · " + job.message : ""),
      el("dl", { class: "facts" },
        el("dt", {}, "step"), el("dd", { id: "job-step" }, `${job.step}/${job.total_steps}`),
        el("dt", {}, "loss"), el("dd", { id: "job-loss" }, fmt(job.loss)),
        el("dt", {}, "samples/s"), el("dd", {}, fmt(job.samples_per_sec, 0)),
        el("dt", {}, "generation"), el("dd", {}, job.generation),
        el("dt", {}, "workers"), el("dd", {}, `${job.world_size} (min ${job.min_workers}, max ${job.max_workers})`),
        el("dt", {}, "priority"), el("dd", {}, job.priority),
        el("dt", {}, "queue"), el("dd", {}, job.queue_position ?? "–"),
        el("dt", {}, "submitted by"), el("dd", {}, job.submitted_by || "–")),
      finalLoss].filter((x) => x));
  };

  let drawQueued = false;
  const drawCharts = () => {
    if (drawQueued) return;
    drawQueued = true;
    requestAnimationFrame(() => {
      drawQueued = false;
      const s = (k) => points.map((p) => ({ x: p.step, y: p[k] }));
      const evals = points.filter((p) => p.eval_loss !== null && p.eval_loss !== undefined);
      charts.replaceChildren(
        chart("chart-loss", "loss", [
          { name: "train", points: s("loss") },
          { name: "validation", points: evals.map((p) => ({ x: p.step, y: p.eval_loss })), dots: true },
        ]),
        chart("chart-lr", "learning rate", [{ name: "lr", points: s("lr") }]),
        chart("chart-throughput", "samples/s", [{ name: "samples/s", points: s("samples_per_sec") }]),
        chart("chart-grad-norm", "gradient norm", [{ name: "grad norm", points: s("grad_norm") }]));
      drawHead();
    });
  };

  const drawDetails = async () => {
    const [ranks, gens, cks, reg] = await Promise.all([
      api(`/api/v1/jobs/${encodeURIComponent(jobId)}/ranks`),
      api(`/api/v1/jobs/${encodeURIComponent(jobId)}/generations`),
      api(`/api/v1/jobs/${encodeURIComponent(jobId)}/checkpoints`),
      api(`/api/v1/jobs/${encodeURIComponent(jobId)}/registration`),
    ]);
    const r = reg.registration;
    details.replaceChildren(
      section(`Ranks (generation ${ranks.generation})`, ranks.ranks.length ? ranksTable(ranks)
        : el("p", { class: "empty" }, "no ranks: the job is not running")),
      section("Generations", table("generations", ["generation", "workers", "reason", "resumed from", "at"],
        gens.generations.map((g) => el("tr", {},
          el("td", { class: "num" }, g.generation), el("td", { class: "num" }, g.world_size),
          el("td", {}, g.reason), el("td", { class: "num" }, g.resumed_from_step ?? "–"),
          el("td", {}, when(g.at_unix_ms)))))),
      section("Checkpoints", cks.checkpoints.length ? table("checkpoints",
        ["step", "generation", "blocked ms", "total ms", "location"],
        cks.checkpoints.map((c) => el("tr", {},
          el("td", { class: "num" }, c.step), el("td", { class: "num" }, c.generation),
          el("td", { class: "num" }, fmt(c.blocked_ms, 1)), el("td", { class: "num" }, fmt(c.total_ms, 1)),
          el("td", { class: "path" }, c.location))))
        : el("p", { class: "empty" }, "none committed")),
      section("Model", el("dl", { class: "facts" },
        el("dt", {}, "final model"), el("dd", { class: "path" }, reg.final_model || "–"),
        el("dt", {}, "registry"), el("dd", { id: "registration" }, r
          ? (r.version ? `${r.model} version ${r.version} in ${r.registry}` : `not registered yet (${r.attempts} attempts${r.last_error ? ": " + r.last_error : ""})`)
          : "none (the job has no registry section)"))));
  };

  // Details are read when the stream says something changed, at most
  // every REFRESH_MS, and once more after the end.
  let lastDetails = 0, detailsTimer = null;
  const refreshDetails = (now) => {
    clearTimeout(detailsTimer);
    const wait = now ? 0 : Math.max(0, lastDetails + REFRESH_MS - Date.now());
    detailsTimer = setTimeout(() => {
      lastDetails = Date.now();
      drawDetails().catch((e) => setStatus(e.message, true));
    }, wait);
  };

  const stopEvents = follow(jobId, () => { points = []; }, (name, data) => {
    if (name === "metric") {
      points.push(data);
      drawCharts();
      refreshDetails(false);
    } else if (name === "progress" || name === "phase") {
      job = Object.assign(job || {}, data);
      if (!job.name) api(`/api/v1/jobs/${encodeURIComponent(jobId)}`).then((j) => { job = Object.assign(j, job); drawHead(); });
      drawHead();
      refreshDetails(false);
    } else if (name === "end") {
      job = data;
      drawCharts();
      refreshDetails(true);
    } else if (name === "error") {
      setStatus(data.message, true);
    }
  });
  // The details also change without steps (a rank's report, a hand-off).
  const ticker = setInterval(() => refreshDetails(false), REFRESH_MS);
  api(`/api/v1/jobs/${encodeURIComponent(jobId)}`).then((j) => { job = Object.assign(j, job || {}); drawHead(); })
    .catch((e) => setStatus(e.message, true));
  drawCharts();
  return () => { stopEvents(); clearInterval(ticker); clearTimeout(detailsTimer); };
}

function sweepView(root, sweepId) {
  return poll(async () => {
    const s = await api(`/api/v1/sweeps/${encodeURIComponent(sweepId)}`);
    const paths = [...new Set(s.trials.flatMap((t) => Object.keys(t.params)))];
    const ranked = s.trials.slice().sort((a, b) => (a.rank || 1e9) - (b.rank || 1e9) || a.trial - b.trial);
    const done = s.trials.filter((t) => t.metric !== null && t.metric !== undefined);
    root.replaceChildren(
      el("h1", {}, s.name, " ", el("span", { class: "phase" }, s.state)),
      el("p", { class: "muted" }, `${s.sweep_id} · ${s.goal} ${s.metric} · at most ${s.max_parallel} at a time`),
      el("div", { class: "charts" }, chart("chart-trials", `${s.metric} by trial`,
        [{ name: s.metric, points: done.map((t) => ({ x: t.trial, y: t.metric })), dots: true }])),
      section("Leaderboard", table("leaderboard", ["rank", "trial", "job", "state", s.metric, "step", ...paths, "note"],
        ranked.map((t) => el("tr", { class: t.rank === 1 ? "best" : "" },
          el("td", { class: "num" }, t.rank ?? "–"), el("td", { class: "num" }, t.trial),
          el("td", {}, t.job_id ? el("a", { href: "#/jobs/" + encodeURIComponent(t.job_id) }, t.job_id) : "–"),
          el("td", {}, t.state), el("td", { class: "num" }, fmt(t.metric)), el("td", { class: "num" }, t.step),
          paths.map((p) => el("td", { class: "num" }, t.params[p] === undefined ? "–" : JSON.stringify(t.params[p]))),
          el("td", {}, t.message))))));
  });
}

// ---------------------------------------------------------------- routing

function route() {
  if (view) view();
  view = null;
  const root = document.getElementById("view");
  root.replaceChildren();
  if (!token()) return loggedOut("");
  document.getElementById("login").hidden = true;
  document.getElementById("forget").hidden = false;
  const parts = location.hash.replace(/^#\/?/, "").split("/").map(decodeURIComponent);
  const where = document.getElementById("where");
  if (parts[0] === "jobs" && parts[1]) {
    where.textContent = "› job " + parts[1];
    view = jobView(root, parts[1]);
  } else if (parts[0] === "sweeps" && parts[1]) {
    where.textContent = "› sweep " + parts[1];
    view = sweepView(root, parts[1]);
  } else {
    where.textContent = "";
    view = jobsView(root);
  }
}

function loggedOut(message) {
  if (view) view();
  view = null;
  document.getElementById("view").replaceChildren();
  document.getElementById("forget").hidden = true;
  document.getElementById("login").hidden = false;
  document.getElementById("login-error").textContent = message || "";
  document.getElementById("token").focus();
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("login").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const t = document.getElementById("token").value.trim();
    if (!t) return;
    sessionStorage.setItem(TOKEN_KEY, t);
    try {
      await api("/api/v1/jobs");
      document.getElementById("token").value = "";
      route();
    } catch (e) {
      if (e instanceof ApiError && e.status === 401) sessionStorage.removeItem(TOKEN_KEY);
      loggedOut(e.message);
    }
  });
  document.getElementById("forget").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    loggedOut("");
  });
  window.addEventListener("hashchange", route);
  route();
});
