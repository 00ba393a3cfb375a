// A small SVG line chart: a few series over time, redrawn in place (no library).

const NS = "http://www.w3.org/2000/svg";

function svg(tag, attrs) {
  const node = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  return node;
}

export class LineChart {
  // lines: [{key, label, cls}]; log: logarithmic y axis; format: value -> text
  constructor(title, lines, { log = false, format = (v) => String(v), width = 320,
    height = 120 } = {}) {
    this.lines = lines;
    this.log = log;
    this.format = format;
    this.width = width;
    this.height = height;
    this.root = document.createElement("figure");
    this.root.className = "chart";
    const caption = document.createElement("figcaption");
    caption.textContent = title;
    this.value = document.createElement("span");
    this.value.className = "chart-value";
    caption.append(" ", this.value);
    this.svg = svg("svg", { viewBox: `0 0 ${width} ${height}`, preserveAspectRatio: "none",
      role: "img", "aria-label": title });
    this.paths = lines.map((line) => {
      const path = svg("polyline", { class: `line ${line.cls || ""}`, fill: "none" });
      this.svg.append(path);
      return path;
    });
    this.top = svg("text", { x: 2, y: 10, class: "axis" });
    this.bottom = svg("text", { x: 2, y: height - 2, class: "axis" });
    this.svg.append(this.top, this.bottom);
    const legend = document.createElement("div");
    legend.className = "legend";
    for (const line of lines) {
      const item = document.createElement("span");
      item.className = `key ${line.cls || ""}`;
      item.textContent = line.label;
      legend.append(item);
    }
    this.root.append(caption, this.svg, legend);
  }

  // points: [{ts, [key]: number|null}], oldest first
  draw(points) {
    const values = [];
    for (const p of points) for (const l of this.lines) {
      const v = p[l.key];
      if (typeof v === "number" && isFinite(v) && (!this.log || v > 0)) values.push(v);
    }
    if (!points.length || !values.length) {
      for (const path of this.paths) path.setAttribute("points", "");
      this.value.textContent = "no data yet";
      this.top.textContent = "";
      this.bottom.textContent = "";
      return;
    }
    let lo = this.log ? Math.min(...values) : 0;
    let hi = Math.max(...values);
    if (hi <= lo) hi = lo + (this.log ? lo : 1);
    const t0 = points[0].ts;
    const t1 = Math.max(points[points.length - 1].ts, t0 + 1);
    const scale = (v) => this.log ? (Math.log(v) - Math.log(lo)) / (Math.log(hi) - Math.log(lo))
      : (v - lo) / (hi - lo);
    const pad = 12;
    this.lines.forEach((line, i) => {
      const coords = [];
      for (const p of points) {
        const v = p[line.key];
        if (typeof v !== "number" || !isFinite(v) || (this.log && v <= 0)) continue;
        const x = ((p.ts - t0) / (t1 - t0)) * this.width;
        const y = this.height - pad - scale(v) * (this.height - 2 * pad);
        coords.push(`${x.toFixed(1)},${y.toFixed(1)}`);
      }
      this.paths[i].setAttribute("points", coords.join(" "));
    });
    this.top.textContent = this.format(hi);
    this.bottom.textContent = this.format(lo);
    const last = points[points.length - 1];
    this.value.textContent = this.lines.map((l) => `${l.label} ${
      typeof last[l.key] === "number" ? this.format(last[l.key]) : "–"}`).join(" · ");
  }
}
