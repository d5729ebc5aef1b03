// OncoFed consoles: charts (Plotly, from the installed plotly package) and the live run view
// (server-sent events). No inline script: the pages carry their data as JSON blocks.
"use strict";

const PLOT_CONFIG = { displaylogo: false, displayModeBar: false, responsive: true };
const fmt = (v, d = 3) => (v === null || v === undefined ? "-" : Number(v).toFixed(d));

function readJson(id) {
  const el = document.getElementById(id);
  return el ? JSON.parse(el.textContent) : null;
}

function line(x, y, name, extra) {
  return Object.assign({ x: x, y: y, name: name, type: "scatter", mode: x.length > 60 ? "lines" : "lines+markers" }, extra || {});
}

// a tick per round on a short run; Plotly's own spacing on a long one (a tick per round would draw hundreds)
const roundAxis = (rounds) => Object.assign({ title: { text: "round" } }, rounds.length <= 20 ? { dtick: 1 } : {});

function target(x, value, name) {
  if (!value || !x.length) return null;
  return { x: [Math.min(...x), Math.max(...x)], y: [value, value], name: name, type: "scatter", mode: "lines",
           line: { dash: "dash", color: "#cf222e" } };
}

function scoreFigure(view) {
  const c = view.charts.score, data = [];
  if (c.aggregate.some(v => v !== null)) data.push(line(c.rounds, c.aggregate, "score (aggregate)", { line: { width: 3 } }));
  for (const [node, series] of Object.entries(c.nodes)) data.push(line(series[0], series[1], "node " + node.slice(-6), { opacity: 0.6 }));
  if (c.train_loss.some(v => v !== null)) data.push(line(c.rounds, c.train_loss, "train loss", { yaxis: "y2", line: { dash: "dot" } }));
  return { data: data, layout: { title: { text: "Score and loss by round" }, xaxis: roundAxis(c.rounds),
    yaxis: { title: { text: "score" } }, yaxis2: { title: { text: "loss" }, overlaying: "y", side: "right" },
    margin: { t: 40, r: 50, l: 50, b: 40 }, legend: { orientation: "h", y: -0.25 } } };
}

function epsilonFigure(view) {
  const c = view.charts.epsilon, p = view.privacy, data = [];
  if (c.client.some(v => v !== null)) data.push(line(c.rounds, c.client, "client-level ε"));
  for (const [node, series] of Object.entries(c.nodes)) data.push(line(series[0], series[1], "record-level ε, node " + node.slice(-6)));
  const t1 = target(c.rounds, p.client_target, "client-level target"), t2 = target(c.rounds, p.record_target, "node budget");
  if (t1) data.push(t1);
  if (t2) data.push(t2);
  const title = data.length ? "Privacy spent (ε) by round" : "Privacy spent: no DP in this run";
  return { data: data, layout: { title: { text: title }, xaxis: roundAxis(c.rounds),
    yaxis: { title: { text: "ε" }, rangemode: "tozero" }, margin: { t: 40, r: 20, l: 50, b: 40 },
    legend: { orientation: "h", y: -0.25 } } };
}

function cell(tr, text, cls) { const td = document.createElement("td"); td.textContent = text; if (cls) td.className = cls; tr.appendChild(td); return td; }

function fillRounds(view) {
  const body = document.querySelector("#rounds tbody");
  if (!body) return;
  body.replaceChildren();
  for (const r of view.table.slice().reverse()) {
    const tr = document.createElement("tr");
    cell(tr, r.initial ? r.round + " (initial)" : String(r.round));
    cell(tr, r.trained.length ? r.trained.length + ": " + r.trained.map(n => n.slice(-6)).join(", ") : "-");
    cell(tr, r.evaluated.length ? String(r.evaluated.length) : "-");
    const failed = Object.entries(r.failures);
    cell(tr, failed.length ? failed.map(([n, why]) => n.slice(-6) + ": " + why).join("; ") : "none", failed.length ? "bad" : "");
    cell(tr, fmt(r.score) + (r.dp_released ? " (DP)" : ""));
    cell(tr, fmt(r.train_loss, 4));
    cell(tr, r.version || "-");
    cell(tr, fmt(r.seconds, 1));
    body.appendChild(tr);
  }
}

function showStatus(view) {
  const s = view.status, set = (id, text) => { const el = document.getElementById(id); if (el) el.textContent = text; };
  set("run-state", s.state);
  const st = document.getElementById("run-state");
  if (st) st.className = "state " + s.state;
  set("run-round", s.round === undefined || s.round === null ? "-" : String(s.round));
  set("run-phase", s.phase || "-");
  set("run-replies", (s.done || 0) + " / " + (s.total || 0));
  set("run-updated", s.time ? new Date(s.time * 1000).toISOString().replace("T", " ").slice(0, 19) + " UTC" : "-");
}

function drawRun(view) {
  showStatus(view);
  fillRounds(view);
  const a = scoreFigure(view), b = epsilonFigure(view);
  Plotly.react("chart-score", a.data, a.layout, PLOT_CONFIG);
  const eps = document.getElementById("chart-epsilon");
  if (b.data.length) Plotly.react(eps, b.data, b.layout, PLOT_CONFIG);
  else if (!view.privacy.dp) { eps.textContent = "No DP in this run: no privacy budget is spent or accounted."; eps.className = "chart empty"; }
  document.body.dataset.rounds = String(view.table.length);
  document.body.dataset.state = view.status.state;
}

function runPage() {
  const view = readJson("run-view");
  if (!view) return;
  drawRun(view);
  if (view.status.state === "finished") return;
  const source = new EventSource(document.getElementById("live").dataset.events);
  source.onmessage = (e) => drawRun(JSON.parse(e.data));
  source.addEventListener("finished", () => source.close());
}

function ledgerPage() {
  const d = readJson("ledger-view");
  if (!d) return;
  for (const [id, series] of [["chart-record", d.record], ["chart-client", d.client]]) {
    if (!document.getElementById(id)) continue;
    const data = [line(series.index, series.epsilon, "ε spent")];
    if (series.budget) data.push(target(series.index.length ? series.index : [0, 1], series.budget, "budget"));
    Plotly.react(id, data, { title: { text: series.title }, xaxis: { title: { text: "ledger entry" } },
      yaxis: { title: { text: "ε" }, rangemode: "tozero" }, margin: { t: 40, r: 20, l: 50, b: 40 },
      legend: { orientation: "h", y: -0.25 } }, PLOT_CONFIG);
  }
  document.body.dataset.ledger = String(d.record.index.length);
}

document.addEventListener("DOMContentLoaded", () => {
  if (typeof Plotly === "undefined") return;
  runPage();
  ledgerPage();
  document.body.dataset.ready = "1";
});
