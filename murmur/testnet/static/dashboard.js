// murmur testnet dashboard: polls /api/state every second and renders
// the peer graph, accuracy curves and down-weighting table as inline SVG/DOM.
// No libraries: every element is created with createElement(NS) and text is
// set through textContent, so node names can never inject markup.
"use strict";

const POLL_MS = 1000;
const SVG_NS = "http://www.w3.org/2000/svg";
const PALETTE = ["#1c7ed6", "#2f9e44", "#e8590c", "#7048e8", "#d6336c", "#0c8599", "#f08c00", "#5c940d",
                 "#862e9c", "#364fc7", "#c92a2a", "#495057"];

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

function colourOf(names) {
  const map = {};
  names.forEach((n, i) => { map[n] = PALETTE[i % PALETTE.length]; });
  return map;
}

function renderGraph(state) {
  const svg = document.getElementById("graph");
  svg.replaceChildren();
  const nodes = state.nodes;
  const cx = 210, cy = 210, r = 160;
  const pos = {};
  nodes.forEach((n, i) => {
    const a = (2 * Math.PI * i) / Math.max(1, nodes.length) - Math.PI / 2;
    pos[n.name] = [cx + r * Math.cos(a), cy + r * Math.sin(a)];
  });
  const down = new Set(state.downweights.map((d) => [d.from, d.to].sort().join("\u0000")));
  for (const [a, b] of state.edges) {
    if (!pos[a] || !pos[b]) continue;
    const red = down.has([a, b].sort().join("\u0000"));
    svg.appendChild(svgEl("line", {
      x1: pos[a][0], y1: pos[a][1], x2: pos[b][0], y2: pos[b][1],
      class: red ? "edge downweight" : "edge", "data-edge": a + "-" + b,
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
    const cls = !n.alive ? "node-dead" : n.role === "attacker" ? "node-attacker" : "node-honest";
    const g = svgEl("g", { "data-node": n.name });
    const circle = svgEl("circle", { cx: x, cy: y, r: 14, class: cls });
    circle.appendChild(svgEl("title", {}, n.name + " (" + n.role + (n.alive ? "" : ", down") + ")"));
    g.appendChild(circle);
    g.appendChild(svgEl("text", { x: x, y: y + 28, class: "node-label" }, n.name));
    svg.appendChild(g);
  }
}

function renderAccuracy(state, colours) {
  const svg = document.getElementById("accuracy");
  svg.replaceChildren();
  const W = 520, H = 300, L = 40, R = 10, T = 10, B = 30;
  const series = state.accuracy_series;
  let maxRound = 1;
  for (const pts of Object.values(series)) for (const [rnd] of pts) maxRound = Math.max(maxRound, rnd);
  const sx = (rnd) => L + ((W - L - R) * rnd) / maxRound;
  const sy = (acc) => T + (H - T - B) * (1 - Math.min(1, Math.max(0, acc)));
  svg.appendChild(svgEl("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, class: "axis" }));
  svg.appendChild(svgEl("line", { x1: L, y1: T, x2: L, y2: H - B, class: "axis" }));
  for (const acc of [0, 0.25, 0.5, 0.75, 1]) {
    svg.appendChild(svgEl("text", { x: L - 5, y: sy(acc) + 3, class: "tick", "text-anchor": "end" }, acc.toFixed(2)));
  }
  svg.appendChild(svgEl("text", { x: W - R, y: H - 8, class: "tick", "text-anchor": "end" }, "round " + maxRound));
  svg.appendChild(svgEl("text", { x: L, y: H - 8, class: "tick" }, "0"));
  const legend = document.getElementById("accuracy-legend");
  legend.replaceChildren();
  const attackers = new Set(state.nodes.filter((n) => n.role === "attacker").map((n) => n.name));
  for (const [name, pts] of Object.entries(series)) {
    if (pts.length === 0) continue;
    const points = pts.map(([rnd, acc]) => sx(rnd).toFixed(1) + "," + sy(acc).toFixed(1)).join(" ");
    const attrs = { points: points, class: "series", stroke: colours[name], "data-node": name };
    if (attackers.has(name)) attrs["stroke-dasharray"] = "5 3";  // attackers dashed, as in the report
    svg.appendChild(svgEl("polyline", attrs));
    const item = document.createElement("span");
    item.style.color = colours[name];
    item.textContent = "\u25A0 " + name;
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
    cell(row, n.name);
    cell(row, n.role);
    cell(row, n.alive ? "yes" : "no");
    cell(row, n.round === null ? "–" : String(n.round));
    cell(row, fmt(n.accuracy));
    cell(row, fmt(n.attack_rate));
    cell(row, n.peer_id ? n.peer_id.slice(0, 16) + "…" : "–", "peer");
    body.appendChild(row);
  }
}

function renderDownweights(state) {
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
    li.textContent = JSON.stringify(e);
    list.appendChild(li);
  }
}

function render(state) {
  const colours = colourOf(state.nodes.map((n) => n.name));
  renderGraph(state);
  renderAccuracy(state, colours);
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
