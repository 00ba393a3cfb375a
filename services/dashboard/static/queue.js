// Queue: what waits, by priority and type, why, until when; and what admission refused.

import { clear, clock, duration, el, number, short, taskLink } from "./util.js";

const PRIORITIES = ["critical", "high", "medium", "low"];

function waitingText(row) {
  const reason = row.waiting || "worker";
  const d = row.detail;
  if (!d || typeof d !== "object") return reason;
  if (d.detail) return `${reason}: ${short(d.detail, 100)}`;
  const parts = [];
  if (d.needs) parts.push(`needs ${short(d.needs, 80)}`);
  if (d.limit !== undefined) parts.push(`limit ${number(d.limit)}`);
  if (d.available !== undefined) parts.push(`left ${number(d.available)}`);
  if (d.asked !== undefined) parts.push(`asked ${number(d.asked)}`);
  return parts.length ? `${reason}: ${parts.join(", ")}` : reason;
}

export class QueuePage {
  constructor(store) {
    this.store = store;
    this.title = "Queue";
    this.counts = el("div", { class: "stats" });
    this.body = el("tbody");
    this.refusals = el("tbody");
    this.root = el("section", { id: "queue" },
      el("div", { class: "card" }, el("h2", { text: "Admission and queue" }), this.counts),
      el("div", { class: "card" }, el("h2", { text: "Queued tasks" }),
        el("table", { class: "queue" }, el("thead", {}, el("tr", {}, ...["priority", "type",
          "task", "agent", "waiting for", "ETA", "age", "description"].map((h) =>
          el("th", { text: h })))), this.body)),
      el("div", { class: "card" }, el("h2", { text: "Recent refusals" }),
        el("table", {}, el("thead", {}, el("tr", {}, ...["time", "code", "type", "priority",
          "reason"].map((h) => el("th", { text: h })))), this.refusals)));
  }

  show() {}
  hide() {}

  render(dirty) {
    if (!dirty.has("queue") && !dirty.has("tick")) return [];
    const q = this.store.queue;
    const now = this.store.now();
    const a = q.admission || {};
    const t = q.totals || {};
    const byPriority = t.by_priority || {};
    const stat = (label, value, cls = "") => el("div", { class: `stat ${cls}` },
      el("span", { class: "stat-value", text: number(value) }), el("span", { text: label }));
    clear(this.counts).append(
      stat("admitted", a.admitted), stat("refused (queue full)", a.refused, a.refused ? "warn" : ""),
      stat("rejected (deadline, max wait)", a.rejected, a.rejected ? "warn" : ""),
      stat("queued", t.total),
      ...PRIORITIES.map((p) => stat(p, byPriority[p] || 0)),
      el("div", { class: "stat wide" }, el("span", { text: "waiting: " +
        (Object.entries(t.waiting || {}).map(([k, v]) => `${k} ${v}`).join(", ") || "none") +
        (t.backoff ? `; in retry backoff ${t.backoff}` : "") +
        (t.memory_pressure ? "; MEMORY PRESSURE: only critical work starts" : "") }),
      el("span", { class: "muted", text: " codes: " + (Object.entries(a.codes || {}).map(
        ([k, v]) => `${k} ${v}`).join(", ") || "none") })));
    const rows = [...(q.rows || [])].sort((x, y) =>
      PRIORITIES.indexOf(x.priority) - PRIORITIES.indexOf(y.priority) ||
      String(x.type).localeCompare(String(y.type)) || (x.created || 0) - (y.created || 0));
    clear(this.body);
    let last = null;
    for (const row of rows) {
      const group = `${row.priority}/${row.type}`;
      const eta = typeof row.eta === "number" ? row.eta - now : null;
      this.body.append(el("tr", { class: group !== last ? "first" : "", dataset: { task: row.id } },
        el("td", { class: `prio ${row.priority}`, text: group !== last ? row.priority : "" }),
        el("td", { text: group !== last ? row.type : "" }),
        el("td", {}, taskLink(row.id)), el("td", { text: row.agent || "" }),
        el("td", { class: "waiting", text: waitingText(row) }),
        el("td", { class: "num eta", text: eta === null ? "unknown" : eta <= 0 ? "due" : `in ${duration(eta)}` }),
        el("td", { class: "num", text: row.created ? duration(now - row.created) : "–" }),
        el("td", { class: "muted", text: short(row.description || "", 60) })));
      last = group;
    }
    if (!rows.length) this.body.append(el("tr", {}, el("td", { colspan: 8, class: "muted",
      text: "nothing queued" })));
    clear(this.refusals);
    for (const r of q.refusals || []) {
      this.refusals.append(el("tr", {}, el("td", { text: clock(r.ts) }),
        el("td", { text: r.code }), el("td", { text: r.type || "" }),
        el("td", { text: r.priority || "" }), el("td", { text: short(r.reason || "", 200) })));
    }
    if (!(q.refusals || []).length) this.refusals.append(el("tr", {}, el("td", { colspan: 5,
      class: "muted", text: "none since the dashboard started" })));
    return [];
  }
}
