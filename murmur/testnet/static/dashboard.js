// murmur testnet dashboard: polls /api/state every second and renders the
// peer graph (with partitions), accuracy and ε per round, the network's
// traffic, each node's time per phase, the nodes and the events as inline
// SVG/DOM. The same views as the run's report, live. No libraries: every
// element is created with createElement(NS) and text is set through
// textContent, so node names can never inject markup.
"use strict";

const POLL_MS = 1000;
const SVG_NS = "http://www.w3.org/2000/svg";
const PALETTE = ["#1c7ed6", "#2f9e44", "#e8590c", "#7048e8", "#d6336c", "#0c8599", "#f08c00", "#5c940d",
                 "#862e9c", "#364fc7", "#c92a2a", "#495057"];
const PHASES = [["train", "#1c7ed6"], ["commit", "#7048e8"], ["send", "#f08c00"], ["wait", "#adb5bd"],
                ["aggregate", "#2f9e44"], ["eval", "#94d82d"]];
const CHART = { W: 520, H: 300, L: 52, R: 12, T: 14, B: 32 };
const MAX_MARK = 30;  // characters of an event's label on a chart (the events list has all of it)

function svgEl(tag, attrs, text) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, String(v));
  if (text !== undefined) el.textContent = text;
  return el;
}

function cell(row, text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  row.appendChild(td);
  return td;
}

function fmt(x, digits) {
  return x === null || x === undefined ? "–" : Number(x).toFixed(digits === undefined ? 3 : digits);
}

const BYTE_UNITS = ["B", "KiB", "MiB", "GiB", "TiB"];

function byteUnit(largest) {
  let e = 0;
  while (e < BYTE_UNITS.length - 1 && Math.abs(largest) >= Math.pow(1024, e + 1)) e++;
  return [BYTE_UNITS[e], Math.pow(1024, e)];
}

function fmtBytes(x) {
  if (x === null || x === undefined) return "–";
  const [unit, size] = byteUnit(x);
  return unit === "B" ? Math.round(x) + " B" : (x / size).toFixed(1) + " " + unit;
}

function fmtSeconds(x) {
  if (x === null || x === undefined) return "–";
  return x < 1 ? (x * 1000).toFixed(1) + " ms" : x < 60 ? x.toFixed(2) + " s" : Math.floor(x / 60) + " min " + Math.round(x % 60) + " s";
}

function colourOf(names) {
  const map = {};
  names.forEach((n, i) => { map[n] = PALETTE[i % PALETTE.length]; });
  return map;
}

// A line chart: series [{name, points: [[x, y]], colour, dashed, mean}], markers [{x, label}], optional budget line.
function lineChart(svg, opts) {
  svg.replaceChildren();
  const { W, H, L, R, T, B } = CHART;
  let xMax = 1, yMax = opts.yMax || 0;
  for (const s of opts.series) for (const [x, y] of s.points) { xMax = Math.max(xMax, x); if (!opts.yMax) yMax = Math.max(yMax, y); }
  if (opts.budget !== undefined && opts.budget !== null) yMax = Math.max(yMax, opts.budget * 1.1);
  if (yMax <= 0) yMax = 1;
  const sx = (x) => L + ((W - L - R) * x) / xMax;
  const sy = (y) => T + (H - T - B) * (1 - Math.min(1, Math.max(0, y / yMax)));
  svg.appendChild(svgEl("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, class: "axis" }));
  svg.appendChild(svgEl("line", { x1: L, y1: T, x2: L, y2: H - B, class: "axis" }));
  for (const f of [0, 0.25, 0.5, 0.75, 1]) {
    svg.appendChild(svgEl("text", { x: L - 5, y: sy(f * yMax) + 3, class: "tick", "text-anchor": "end" },
                          opts.yFormat ? opts.yFormat(f * yMax) : (f * yMax).toFixed(2)));
  }
  svg.appendChild(svgEl("text", { x: W - R, y: H - 8, class: "tick", "text-anchor": "end" }, opts.xLabel + " " + Math.round(xMax)));
  svg.appendChild(svgEl("text", { x: L, y: H - 8, class: "tick" }, "0"));
  for (const m of opts.markers || []) {
    if (m.x === null || m.x === undefined || m.x > xMax) continue;
    svg.appendChild(svgEl("line", { x1: sx(m.x), y1: T, x2: sx(m.x), y2: H - B, class: "event" }));
    const x = sx(m.x) - 3, y = T + 4;  // vertical, along its line: labels of close events do not run into each other
    svg.appendChild(svgEl("text", { x: x, y: y, class: "event-label", "text-anchor": "end",
                                    transform: "rotate(-90 " + x + " " + y + ")", "data-event": m.label },
                              m.label.length > MAX_MARK ? m.label.slice(0, MAX_MARK - 1) + "\u2026" : m.label));
  }
  if (opts.budget !== undefined && opts.budget !== null) {
    svg.appendChild(svgEl("line", { x1: L, y1: sy(opts.budget), x2: W - R, y2: sy(opts.budget), class: "budget" }));
    svg.appendChild(svgEl("text", { x: W - R, y: sy(opts.budget) - 4, class: "tick", "text-anchor": "end" }, "budget ε = " + opts.budget));
  }
  for (const s of opts.series) {
    if (s.points.length === 0) continue;
    const points = s.points.map(([x, y]) => sx(x).toFixed(1) + "," + sy(y).toFixed(1)).join(" ");
    const attrs = { points: points, class: s.mean ? "series mean" : "series", "data-node": s.name };
    if (!s.mean) attrs.stroke = s.colour;
    if (s.dashed) attrs["stroke-dasharray"] = "5 3";  // attackers dashed, as in the report
    svg.appendChild(svgEl("polyline", attrs));
  }
}

function renderGraph(state) {
  const svg = document.getElementById("graph");
  svg.replaceChildren();
  const nodes = state.nodes;
  const cx = 210, cy = 210, r = 150;
  const pos = {};
  const labelAt = {};
  nodes.forEach((n, i) => {
    const a = (2 * Math.PI * i) / Math.max(1, nodes.length) - Math.PI / 2;
    pos[n.name] = [cx + r * Math.cos(a), cy + r * Math.sin(a)];
    labelAt[n.name] = [cx + (r + 30) * Math.cos(a), cy + (r + 30) * Math.sin(a) + 4];  // outside the ring
  });
  const side = {};
  if (state.partition) state.partition.forEach((names, i) => names.forEach((n) => { side[n] = i; }));
  document.getElementById("partition-legend").hidden = !state.partition;
  const down = new Set(state.downweights.map((d) => [d.from, d.to].sort().join("\u0000")));
  for (const [a, b] of state.edges) {
    if (!pos[a] || !pos[b]) continue;
    const crossing = state.partition && side[a] !== side[b];
    const cls = crossing ? "edge crossing" : down.has([a, b].sort().join("\u0000")) ? "edge downweight" : "edge";
    svg.appendChild(svgEl("line", {
      x1: pos[a][0], y1: pos[a][1], x2: pos[b][0], y2: pos[b][1], class: cls, "data-edge": a + "-" + b,
    }));
  }
  // a down-weighting between nodes that are not (or no longer) neighbours is still shown
  for (const d of state.downweights) {
    const key = [d.from, d.to].sort().join("\u0000");
    const known = state.edges.some(([a, b]) => [a, b].sort().join("\u0000") === key);
    if (known || !pos[d.from] || !pos[d.to]) continue;
    svg.appendChild(svgEl("line", {
      x1: pos[d.from][0], y1: pos[d.from][1], x2: pos[d.to][0], y2: pos[d.to][1],
      class: "edge downweight", "stroke-dasharray": "4 3", "data-edge": d.from + "-" + d.to,
    }));
  }
  for (const n of nodes) {
    const [x, y] = pos[n.name];
    const cls = !n.alive ? "node-dead" : state.partition ? "node-side" + side[n.name]
      : n.role === "attacker" ? "node-attacker" : "node-honest";
    const g = svgEl("g", { "data-node": n.name });
    const circle = svgEl("circle", { cx: x, cy: y, r: 14, class: cls });
    if (n.role === "attacker") circle.setAttribute("stroke", "#e8590c"), circle.setAttribute("stroke-width", "3");
    circle.appendChild(svgEl("title", {}, n.name + " (" + n.role + (n.alive ? "" : ", down") + ")"));
    g.appendChild(circle);
    g.appendChild(svgEl("text", { x: labelAt[n.name][0], y: labelAt[n.name][1], class: "node-label" }, n.name));
    svg.appendChild(g);
  }
}

function roundMarkers(state) {
  return state.events.filter((e) => Number.isInteger(e.round)).map((e) => ({ x: e.round, label: e.label }));
}

function renderAccuracy(state, colours) {
  const attackers = new Set(state.nodes.filter((n) => n.role === "attacker").map((n) => n.name));
  const series = Object.entries(state.accuracy_series).map(([name, pts]) => (
    { name: name, points: pts, colour: colours[name], dashed: attackers.has(name) }));
  lineChart(document.getElementById("accuracy"), { series: series, xLabel: "round", yMax: 1, markers: roundMarkers(state) });
  const legend = document.getElementById("accuracy-legend");
  legend.replaceChildren();
  for (const s of series) {
    if (s.points.length === 0) continue;
    const item = document.createElement("span");
    item.style.color = s.colour;
    item.textContent = "\u25A0 " + s.name;
    legend.appendChild(item);
  }
}

function renderEpsilon(state, colours) {
  const panel = document.getElementById("epsilon-panel");
  const entries = Object.entries(state.epsilon_series || {});
  panel.hidden = entries.length === 0;
  if (panel.hidden) return;
  const series = entries.map(([name, pts]) => ({ name: name, points: pts, colour: colours[name] }));
  lineChart(document.getElementById("epsilon"), {
    series: series, xLabel: "round", budget: state.epsilon_budget, markers: roundMarkers(state),
  });
}

function renderTraffic(state) {
  const points = state.traffic || [];
  const [unit, size] = byteUnit(Math.max(0, ...points.map(([, r]) => r)));
  lineChart(document.getElementById("traffic"), {
    series: [{ name: "network", points: points.map(([t, r]) => [t, r / size]), mean: true }],
    xLabel: "seconds", yFormat: (y) => y.toFixed(1) + " " + unit + "/s",
    markers: state.events.filter((e) => typeof e.t === "number").map((e) => ({ x: e.t, label: e.label })),
  });
}

function renderPhases(state) {
  const svg = document.getElementById("phases");
  svg.replaceChildren();
  const nodes = state.nodes.filter((n) => n.phases && Object.keys(n.phases).length);
  const { W, L, R, T } = CHART;
  const rowH = Math.min(22, 250 / Math.max(1, nodes.length));
  const total = (n) => Object.values(n.phases).reduce((a, b) => a + b, 0);
  const xMax = Math.max(1e-3, ...nodes.map(total));
  svg.setAttribute("viewBox", "0 0 " + W + " " + Math.max(120, T + rowH * nodes.length + 30));
  nodes.forEach((n, i) => {
    const y = T + i * rowH;
    svg.appendChild(svgEl("text", { x: L + 8, y: y + rowH * 0.7, class: "tick", "text-anchor": "end" }, n.name));
    let x = L + 12;
    for (const [phase, colour] of PHASES) {
      const w = ((W - L - R - 70) * (n.phases[phase] || 0)) / xMax;
      if (w > 0) svg.appendChild(svgEl("rect", { x: x, y: y + 2, width: w, height: rowH - 4, fill: colour, "data-phase": phase }));
      x += w;
    }
    svg.appendChild(svgEl("text", { x: x + 4, y: y + rowH * 0.7, class: "tick" }, fmtSeconds(total(n))));
  });
  const legend = document.getElementById("phases-legend");
  legend.replaceChildren();
  for (const [phase, colour] of PHASES) {
    const item = document.createElement("span");
    item.style.color = colour;
    item.textContent = "\u25A0 " + (phase === "commit" ? "privacy commit" : phase);
    legend.appendChild(item);
  }
}

function renderNodes(state) {
  const body = document.querySelector("#nodes tbody");
  body.replaceChildren();
  for (const n of state.nodes) {
    const row = document.createElement("tr");
    row.className = n.alive ? "alive" : "dead";
    row.dataset.node = n.name;
    cell(row, n.name).title = n.peer_id || "";
    cell(row, n.role);
    cell(row, n.alive ? "yes" : "no");
    const target = n.target_rounds === null || n.target_rounds === undefined ? "" : " / " + n.target_rounds;
    cell(row, (n.round === null ? "–" : String(n.round)) + target + (n.state === "done" ? " done" : ""), "num");
    cell(row, fmt(n.accuracy), "num");
    cell(row, fmt(n.epsilon, 2), "num");
    cell(row, n.connections === null ? "–" : String(n.connections), "num");
    cell(row, String(n.neighbours), "num");
    cell(row, fmtBytes(n.bytes_sent), "num");
    cell(row, fmtBytes(n.bytes_received), "num");
    body.appendChild(row);
  }
}

function renderDownweights(state) {
  document.getElementById("downweights-panel").hidden = !state.attackers && state.downweights.length === 0;
  const body = document.querySelector("#downweights tbody");
  body.replaceChildren();
  for (const d of state.downweights) {
    const row = document.createElement("tr");
    row.className = "downweight";
    cell(row, d.from);
    cell(row, d.to);
    cell(row, fmt(d.weight, 4));
    cell(row, fmt(d.relative, 2));
    body.appendChild(row);
  }
}

function renderEvents(state) {
  const list = document.getElementById("events");
  list.replaceChildren();
  for (const e of state.events) {
    const li = document.createElement("li");
    const when = document.createElement("span");
    when.className = "when";
    when.textContent = (typeof e.t === "number" ? e.t.toFixed(1) + " s" : "–") + " · round " + (e.round === null ? "–" : e.round) + " · ";
    li.appendChild(when);
    li.appendChild(document.createTextNode(e.label));
    list.appendChild(li);
  }
}

function renderProgress(state) {
  const live = state.nodes.filter((n) => n.alive);
  const rounds = live.map((n) => n.round).filter((r) => r !== null);
  const target = state.nodes.map((n) => n.target_rounds).find((t) => t !== null && t !== undefined);
  document.getElementById("progress").textContent = "round " + (rounds.length ? Math.max(...rounds) : "–")
    + (target ? " / " + target : "") + " · " + live.length + "/" + state.nodes.length + " up · " + fmtSeconds(state.t);
}

function render(state) {
  const colours = colourOf(state.nodes.map((n) => n.name));
  renderProgress(state);
  renderGraph(state);
  renderAccuracy(state, colours);
  renderEpsilon(state, colours);
  renderTraffic(state);
  renderPhases(state);
  renderNodes(state);
  renderDownweights(state);
  renderEvents(state);
}

async function poll() {
  const status = document.getElementById("status");
  try {
    const resp = await fetch("/api/state", { cache: "no-store" });
    if (!resp.ok) throw new Error("HTTP " + resp.status);
    render(await resp.json());
    status.textContent = "updated " + new Date().toLocaleTimeString();
  } catch (err) {
    status.textContent = "no connection to the controller (" + err.message + ")";
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

poll();
