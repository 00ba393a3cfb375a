// Fleet: one tile per worker, grouped; the services; the suite's CPU, memory and tokens.

import { LineChart } from "./charts.js";
import { clear, duration, el, number, taskLink } from "./util.js";

const STATES = ["idle", "busy", "starting", "stopping", "lost", "exited"];

export class FleetPage {
  constructor(store) {
    this.store = store;
    this.title = "Fleet";
    this.tiles = new Map(); // worker name -> {tile, row}
    this.groups = new Map(); // group label -> {section, grid, count}
    this.services = el("tbody");
    this.charts = {
      cpu: new LineChart("Suite CPU (cores)", [{ key: "cpu", label: "cores", cls: "c1" }],
        { format: (v) => v.toFixed(2) }),
      rss: new LineChart("Suite memory (MB)", [{ key: "rss_mb", label: "RSS", cls: "c2" }],
        { format: (v) => number(Math.round(v)) }),
      tokens: new LineChart("Tokens committed per second", [{ key: "tokens", label: "tokens/s",
        cls: "c3" }], { format: (v) => number(Math.round(v)) }),
    };
    this.summary = el("p", { class: "summary" });
    this.workers = el("div", { class: "groups" });
    this.root = el("section", { id: "fleet" },
      el("div", { class: "row" },
        el("div", { class: "card" }, el("h2", { text: "Services" }),
          el("table", { class: "services" }, el("thead", {}, el("tr", {},
            ...["service", "state", "bus", "pid", "uptime"].map((h) => el("th", { text: h })))),
          this.services)),
        el("div", { class: "card charts" }, ...Object.values(this.charts).map((c) => c.root))),
      el("div", { class: "card" }, el("h2", { text: "Workers" }), this.summary,
        el("p", { class: "legend" }, ...STATES.map((s) => el("span", { class: `tile-key ${s}`,
          text: s })), el("span", { class: "tile-key extra", text: "surge / autoscaled" })),
        this.workers));
  }

  show() { this.tiles.clear(); this.groups.clear(); clear(this.workers); }
  hide() {}

  render(dirty) {
    const s = this.store;
    if (dirty.has("fleet")) this.drawWorkers();
    if (dirty.has("fleet") || dirty.has("tick")) this.drawTimes();
    if (dirty.has("services") || dirty.has("tick")) this.drawServices();
    if (dirty.has("resources")) for (const chart of Object.values(this.charts)) {
      chart.draw(s.resources);
    }
    return [];
  }

  groupOf(row) {
    const types = (row.types || []).join(", ");
    return row.group ? `${row.group}${types ? ` · ${types}` : ""}` : types || "unregistered";
  }

  drawWorkers() {
    const seen = new Set();
    const counts = {};
    const names = [...this.store.fleet.keys()].sort((a, b) => a.localeCompare(b, "en",
      { numeric: true }));
    for (const name of names) {
      const row = this.store.fleet.get(name);
      seen.add(name);
      counts[row.state] = (counts[row.state] || 0) + 1;
      let entry = this.tiles.get(name);
      const label = this.groupOf(row);
      if (entry && entry.group !== label) { entry.tile.remove(); entry = null; }
      if (!entry) {
        const tile = el("div", { class: "tile", dataset: { worker: name } },
          el("div", { class: "tile-name", text: name }),
          el("div", { class: "tile-state" }), el("div", { class: "tile-task" }),
          el("div", { class: "tile-time" }));
        entry = { tile, group: label, row: null };
        this.grid(label).append(tile);
        this.tiles.set(name, entry);
      }
      if (entry.row !== row) this.drawTile(entry, row);
    }
    for (const [name, entry] of this.tiles) {
      if (!seen.has(name)) { entry.tile.remove(); this.tiles.delete(name); }
    }
    for (const [label, group] of this.groups) {
      if (!group.grid.childElementCount) { group.section.remove(); this.groups.delete(label); continue; }
      const states = {};
      for (const tile of group.grid.children) {
        states[tile.dataset.state] = (states[tile.dataset.state] || 0) + 1;
      }
      group.count.textContent = `${group.grid.childElementCount} workers: ` +
        Object.entries(states).map(([k, v]) => `${v} ${k}`).join(", ");
    }
    this.summary.textContent = `${names.length} workers — ` +
      (Object.entries(counts).map(([k, v]) => `${v} ${k}`).join(", ") || "none yet");
  }

  grid(label) {
    let group = this.groups.get(label);
    if (!group) {
      const grid = el("div", { class: "tiles" });
      const count = el("span", { class: "muted" });
      const section = el("section", { class: "group" }, el("h3", {}, label, " ", count), grid);
      this.workers.append(section);
      group = { section, grid, count };
      this.groups.set(label, group);
    }
    return group.grid;
  }

  drawTile(entry, row) {
    const { tile } = entry;
    entry.row = row;
    tile.dataset.state = row.state;
    tile.className = `tile ${row.state}${row.extra ? " extra" : ""}`;
    tile.title = `${row.name}\npid ${row.pid ?? "–"}, ${row.done} tasks done` +
      (row.rss_mb ? `, ${row.rss_mb} MB` : "") + (row.extra ? "\nsurge/autoscaled: retires when idle" : "") +
      (row.next ? `\nnext (prefetched): ${row.next}` : "");
    tile.children[1].textContent = row.state + (row.extra ? " · extra" : "");
    clear(tile.children[2]).append(row.task ? taskLink(row.task) : "");
    if (row.next) tile.children[2].append(" · next ", taskLink(row.next));
    tile.dataset.task = row.task || "";
  }

  drawTimes() {
    const now = this.store.now();
    for (const { tile, row } of this.tiles.values()) {
      if (!row) continue;
      tile.children[3].textContent = row.state === "busy" && row.since
        ? `running ${duration(now - row.since)}` : "";
    }
  }

  drawServices() {
    const now = this.store.now();
    clear(this.services);
    for (const s of this.store.services) {
      const state = s.supervisor || (s.answering ? "RUNNING" : "unknown");
      this.services.append(el("tr", { dataset: { service: s.name } },
        el("td", { text: s.name }),
        el("td", { class: `state ${state.toLowerCase()}`, text: state }),
        el("td", { class: s.answering ? "ok" : "bad",
          text: s.answering === null ? "…" : s.answering ? "answering" : "NOT ANSWERING" }),
        el("td", { class: "num", text: s.pid ?? "–" }),
        el("td", { class: "num", text: s.started ? duration(now - s.started) : "–" })));
    }
  }
}
