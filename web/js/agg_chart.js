// Asymmetric Gradient Guidance: a live chart of the guidance on the node that guides.
//
// Every guided step the pack sends an "agg.terms" event (see README, "Guidance strength"): per loss
// term its value, and the step's size (delta_rms). This extension draws them on the guiding node
// (Apply AGG or AGG Guider): one line per loss term, each scaled to its own range in this run, the
// step size as a dashed line, one point per guided step, and the latest values as text. The chart
// appears below the node's inputs at the node's first guided step and is cleared when a new run starts.
// It is drawn on the canvas only: it is not saved in the workflow and not sent with the prompt.

import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";

const EVENT = "agg.terms";
const WIDGET = "agg_chart";
const HEIGHT = 118; // the chart's height in canvas units
const MIN_WIDTH = 240;
// Node types that send agg.terms, by the name the server reports in `event.node`.
const GUIDING = { "Apply AGG": "AGGApply", "AGG Guider": "AGGGuider" };
const COLORS = ["#4fc3f7", "#ffb74d", "#81c784", "#f06292", "#ba68c8", "#e57373", "#fff176"];
const STEP_COLOR = "#e0e0e0";

let executing = null; // id of the node ComfyUI says is executing (the sampler, while it guides)

function fmt(v) {
  if (typeof v !== "number" || !Number.isFinite(v)) return String(v);
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-3 || a >= 1e4)) return v.toExponential(2);
  return v.toPrecision(3);
}

function displayName(node) {
  const ctor = node.constructor || {};
  return ctor.nodeData?.display_name ?? ctor.title ?? node.type;
}

function graphs() {
  const out = [];
  if (app.graph) out.push(app.graph);
  const shown = app.canvas?.graph;
  if (shown && !out.includes(shown)) out.push(shown);
  return out;
}

function nodesOf(graph) {
  return graph?._nodes ?? graph?.nodes ?? [];
}

// Node ids reachable upstream from `node` through its inputs.
function upstream(node) {
  const seen = new Set();
  const todo = node ? [node] : [];
  while (todo.length) {
    const n = todo.pop();
    for (let i = 0; i < (n.inputs?.length ?? 0); i++) {
      let up = null;
      try {
        up = n.getInputNode(i);
      } catch {
        up = null;
      }
      if (up && !seen.has(up.id)) {
        seen.add(up.id);
        todo.push(up);
      }
    }
  }
  return seen;
}

// The node an agg.terms event comes from: by id when the event carries one, else the node whose type
// has the reported display name (or whose title is that name); among several, the one that feeds
// the node now executing.
export function guidingNode(event) {
  const id = event?.node_id ?? event?.unique_id;
  if (id != null) {
    for (const g of graphs()) {
      const n = g.getNodeById?.(id);
      if (n) return n;
    }
  }
  const name = event?.node;
  const type = GUIDING[name];
  const candidates = [];
  for (const g of graphs()) {
    for (const n of nodesOf(g)) {
      if (candidates.includes(n)) continue;
      if ((type && n.type === type) || displayName(n) === name || n.title === name) candidates.push(n);
    }
  }
  if (candidates.length <= 1) return candidates[0] ?? null;
  if (executing != null) {
    for (const g of graphs()) {
      const ex = g.getNodeById?.(executing);
      if (!ex) continue;
      if (candidates.includes(ex)) return ex;
      const up = upstream(ex);
      const hit = candidates.find((n) => up.has(n.id));
      if (hit) return hit;
    }
  }
  return candidates[0];
}

function normalise(values) {
  const finite = values.filter((v) => Number.isFinite(v));
  if (!finite.length) return values.map(() => null);
  const lo = Math.min(...finite);
  const hi = Math.max(...finite);
  return values.map((v) => (Number.isFinite(v) ? (hi > lo ? (v - lo) / (hi - lo) : 0.5) : null));
}

function series(points) {
  const names = [];
  for (const p of points) for (const k of Object.keys(p.terms ?? {})) if (!names.includes(k)) names.push(k);
  const lines = names.map((k, i) => ({
    name: k,
    color: COLORS[i % COLORS.length],
    values: points.map((p) => p.terms?.[k]),
    dash: null,
  }));
  lines.push({ name: "step", color: STEP_COLOR, values: points.map((p) => p.delta_rms), dash: [4, 3] });
  return lines;
}

function drawChart(ctx, node, width, y) {
  const chart = node.aggChart;
  const points = chart?.points ?? [];
  const x0 = 10;
  const w = Math.max(40, width - 20);
  const h = HEIGHT - 6;
  ctx.save();
  ctx.fillStyle = "#161616";
  ctx.strokeStyle = "#444";
  ctx.lineWidth = 1;
  ctx.beginPath();
  if (ctx.roundRect) ctx.roundRect(x0, y, w, h, 6);
  else ctx.rect(x0, y, w, h);
  ctx.fill();
  ctx.stroke();

  ctx.font = "11px sans-serif";
  ctx.textBaseline = "top";
  ctx.textAlign = "left";
  if (!points.length) {
    ctx.fillStyle = "#888";
    ctx.fillText("AGG: no guided step in this run yet", x0 + 8, y + 8);
    ctx.restore();
    return;
  }
  const last = points[points.length - 1];
  const flags = [last.trust_region ? "trust region" : "", last.element_bound ? "element bound" : "",
    last.fallback ? "fallback" : "",
    last.skipped ? "skipped" : ""].filter(Boolean).join(", ");
  ctx.fillStyle = "#ddd";
  ctx.fillText(`step ${last.step}  σ ${fmt(last.sigma)}  ·  ${points.length} guided`, x0 + 8, y + 5);
  if (flags) {
    ctx.fillStyle = "#ffb74d";
    ctx.textAlign = "right";
    ctx.fillText(flags, x0 + w - 8, y + 5);
    ctx.textAlign = "left";
  }

  const lines = series(points);
  // Legend: name and latest value of each line, wrapped to the width.
  ctx.font = "10px sans-serif";
  const legend = [];
  for (const line of lines) {
    const v = line.values[line.values.length - 1];
    legend.push({ color: line.color, dash: line.dash, text: `${line.name} ${fmt(v)}` });
  }
  let lx = x0 + 8;
  let ly = y + h - 14;
  const rows = [[]];
  for (const item of legend) {
    const iw = 14 + ctx.measureText(item.text).width + 10;
    if (lx + iw > x0 + w - 4 && rows[rows.length - 1].length) {
      rows.push([]);
      lx = x0 + 8;
    }
    rows[rows.length - 1].push({ ...item, x: lx });
    lx += iw;
  }
  ly = y + h - 14 * rows.length - 2;
  const legendTop = ly;
  for (const row of rows) {
    for (const item of row) {
      ctx.strokeStyle = item.color;
      ctx.lineWidth = 2;
      ctx.setLineDash(item.dash ?? []);
      ctx.beginPath();
      ctx.moveTo(item.x, ly + 6);
      ctx.lineTo(item.x + 10, ly + 6);
      ctx.stroke();
      ctx.setLineDash([]);
      ctx.fillStyle = "#ccc";
      ctx.fillText(item.text, item.x + 14, ly);
    }
    ly += 14;
  }

  // Plot area.
  const px = x0 + 8;
  const pw = w - 16;
  const py = y + 20;
  const ph = Math.max(12, legendTop - 4 - py);
  ctx.strokeStyle = "#2c2c2c";
  ctx.lineWidth = 1;
  ctx.beginPath();
  ctx.moveTo(px, py + ph);
  ctx.lineTo(px + pw, py + ph);
  ctx.moveTo(px, py);
  ctx.lineTo(px + pw, py);
  ctx.stroke();
  const n = points.length;
  const xs = points.map((_, i) => (n === 1 ? px + pw / 2 : px + (pw * i) / (n - 1)));
  for (let i = 0; i < n; i++) {
    if (points[i].skipped) {
      ctx.fillStyle = "#666";
      ctx.fillRect(xs[i] - 1, py + ph - 4, 2, 4);
    }
  }
  for (const line of lines) {
    const ys = normalise(line.values).map((v) => (v == null ? null : py + ph - v * ph));
    ctx.strokeStyle = line.color;
    ctx.fillStyle = line.color;
    ctx.lineWidth = 1.5;
    ctx.setLineDash(line.dash ?? []);
    ctx.beginPath();
    let open = false;
    for (let i = 0; i < n; i++) {
      if (ys[i] == null) {
        open = false;
        continue;
      }
      if (open) ctx.lineTo(xs[i], ys[i]);
      else ctx.moveTo(xs[i], ys[i]);
      open = true;
    }
    ctx.stroke();
    ctx.setLineDash([]);
    for (let i = 0; i < n; i++) {
      if (ys[i] == null) continue;
      ctx.beginPath();
      ctx.arc(xs[i], ys[i], 2, 0, Math.PI * 2);
      ctx.fill();
    }
  }
  ctx.restore();
}

function ensureChart(node) {
  if (!node.aggChart) node.aggChart = { points: [] };
  if (!node.widgets?.some((w) => w.name === WIDGET)) {
    node.addCustomWidget({
      name: WIDGET,
      type: WIDGET,
      value: null,
      serialize: false, // not in the saved workflow's widgets_values
      options: { serialize: false }, // not an input of the prompt
      computeSize: (width) => [width ?? MIN_WIDTH, HEIGHT],
      draw(ctx, n, width, y) {
        drawChart(ctx, n, width, y);
      },
      mouse() {
        return false;
      },
    });
    // Make room for the chart in this node only; other nodes keep their places and sizes.
    const size = node.computeSize();
    node.setSize([Math.max(node.size[0], size[0], MIN_WIDTH), Math.max(node.size[1], size[1])]);
  }
  return node.aggChart;
}

function redraw() {
  app.graph?.setDirtyCanvas(true, false);
  app.canvas?.setDirty?.(true, false);
}

function clearCharts() {
  for (const g of graphs()) {
    for (const n of nodesOf(g)) {
      if (n.aggChart) n.aggChart.points = [];
    }
  }
  redraw();
}

function onTerms(event) {
  const detail = event.detail;
  if (!detail || typeof detail !== "object") return;
  const node = guidingNode(detail);
  if (!node) return;
  const chart = ensureChart(node);
  chart.points.push({
    step: detail.step,
    sigma: detail.sigma,
    terms: { ...(detail.terms ?? {}) },
    delta_rms: detail.delta_rms,
    trust_region: !!detail.trust_region,
    element_bound: !!detail.element_bound,
    fallback: detail.fallback ?? null,
    skipped: detail.skipped ?? null,
  });
  redraw();
}

app.registerExtension({
  name: "agg.chart",
  setup() {
    api.addEventListener(EVENT, onTerms);
    api.addEventListener("execution_start", () => {
      executing = null;
      clearCharts();
    });
    api.addEventListener("executing", (e) => {
      executing = e.detail ?? null;
    });
  },
});
