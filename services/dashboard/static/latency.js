// Latency: P50/P95/P99 of the three stages over time, per type and priority or overall.

import { LineChart } from "./charts.js";
import { clear, duration, el, number } from "./util.js";

const STAGES = [["queue", "submit → start"], ["run", "start → end"], ["total", "end to end"]];
const LINES = [{ key: "p50", label: "P50", cls: "c1" }, { key: "p95", label: "P95", cls: "c2" },
  { key: "p99", label: "P99", cls: "c3" }];

export class LatencyPage {
  constructor(store) {
    this.store = store;
    this.title = "Latency";
    this.choice = "all";
    this.select = el("select", { "aria-label": "series", onchange: () => {
      this.choice = this.select.value;
      this.render(new Set(["latency"]));
    } });
    this.charts = STAGES.map(([stage, label]) => [stage, new LineChart(label, LINES,
      { log: true, format: duration, width: 480, height: 160 })]);
    this.table = el("tbody");
    this.root = el("section", { id: "latency" },
      el("div", { class: "card" }, el("h2", {}, "Over time (each point: the last 5 s) ",
        this.select), el("div", { class: "charts wide" }, ...this.charts.map(([, c]) => c.root))),
      el("div", { class: "card" }, el("h2", { text: "Since the event router started" }),
        el("table", { class: "latency" }, el("thead", {}, el("tr", {}, el("th", { text: "type" }),
          el("th", { text: "priority" }), el("th", { text: "tasks" }),
          ...STAGES.map(([, label]) => el("th", { text: `${label} P50 / P95 / P99` })))), this.table)));
  }

  show() {}
  hide() {}

  render(dirty) {
    if (!dirty.has("latency")) return [];
    const { series, summary } = this.store.latency;
    const labels = Object.keys(series || {}).sort((a, b) => a === "all" ? -1 : b === "all" ? 1
      : a.localeCompare(b));
    if ([...this.select.options].map((o) => o.value).join() !== labels.join()) {
      clear(this.select).append(...labels.map((l) => el("option", { value: l, text: l })));
      this.select.value = labels.includes(this.choice) ? this.choice : "all";
    }
    const points = (series || {})[this.choice] || [];
    for (const [stage, chart] of this.charts) {
      chart.draw(points.map((p) => ({ ts: p.ts, ...(p[stage] || {}) })));
    }
    clear(this.table);
    for (const row of summary || []) {
      this.table.append(el("tr", {}, el("td", { text: row.type }), el("td", { text: row.priority }),
        el("td", { class: "num", text: number(row.total ? row.total.count : 0) }),
        ...STAGES.map(([stage]) => {
          const s = row[stage] || {};
          return el("td", { class: "num", text: s.count
            ? `${duration(s.p50)} / ${duration(s.p95)} / ${duration(s.p99)}` : "–" });
        })));
    }
    if (!(summary || []).length) this.table.append(el("tr", {}, el("td", { colspan: 6,
      class: "muted", text: "no task has finished yet" })));
    return [];
  }
}
