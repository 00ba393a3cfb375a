// Budgets: each scope's limit, committed, reserved (tasks') and leased (held by the
// scheduler's leases, not yet any task's) as a gauge; the window; overruns.

import { clear, clock, duration, el, number, short, taskLink } from "./util.js";

export class BudgetsPage {
  constructor(store) {
    this.store = store;
    this.title = "Budgets";
    this.cards = el("div", { class: "budgets" });
    this.overruns = el("tbody");
    this.root = el("section", { id: "budgets" },
      el("div", { class: "card" }, el("h2", { text: "Token budgets" }), this.cards),
      el("div", { class: "card" }, el("h2", { text: "Overruns (used past the reservation)" }),
        el("table", {}, el("thead", {}, el("tr", {}, ...["time", "task", "detail"].map((h) =>
          el("th", { text: h })))), this.overruns)));
  }

  show() {}
  hide() {}

  render(dirty) {
    if (!dirty.has("budgets") && !dirty.has("tick")) return [];
    const b = this.store.budgets;
    const now = this.store.now();
    clear(this.cards);
    for (const row of b.rows || []) {
      const limit = row.limit;
      const pct = (v) => (limit ? Math.min(100, (100 * (v || 0)) / limit) : 0);
      const committedPct = pct(row.committed);
      const reservedPct = Math.min(100 - committedPct, pct(row.reserved));
      const leasedPct = Math.min(100 - committedPct - reservedPct, pct(row.leased));
      const resets = row.resets_at ? Date.parse(row.resets_at) / 1000 : null;
      this.cards.append(el("div", { class: `budget${row.over_limit ? " over" : ""}`,
        dataset: { scope: row.scope } },
        el("h3", {}, row.scope, " ", el("span", { class: "muted",
          text: row.window ? `window ${row.window}` : "no window" })),
        el("div", { class: "gauge", role: "meter", "aria-valuemin": 0,
          "aria-valuemax": limit ?? 0,
          "aria-valuenow": (row.committed || 0) + (row.reserved || 0) + (row.leased || 0),
          title: limit ? `${(committedPct + reservedPct + leasedPct).toFixed(1)} % used or held` : "no limit" },
          el("div", { class: "committed", style: `width:${committedPct}%` }),
          el("div", { class: "reserved", style: `width:${reservedPct}%` }),
          el("div", { class: "reserved leased", style: `width:${leasedPct}%` })),
        el("dl", {},
          el("dt", { text: "limit" }), el("dd", { class: "limit", text: limit === null ? "none" : number(limit) }),
          el("dt", { text: "committed" }), el("dd", { class: "committed-n", text: number(row.committed) }),
          el("dt", { text: "reserved" }), el("dd", { class: "reserved-n", text: number(row.reserved) }),
          el("dt", { text: "leased" }), el("dd", { class: "leased-n", text: number(row.leased || 0) }),
          el("dt", { text: "available" }), el("dd", { text: number(row.available) }),
          el("dt", { text: "overrun" }), el("dd", { class: row.overrun ? "bad" : "", text: number(row.overrun) }),
          el("dt", { text: "resets" }), el("dd", { text: resets ? `in ${duration(resets - now)}` : "never" }))));
    }
    if (!(b.rows || []).length) this.cards.append(el("p", { class: "muted", text: "waiting for the ledger…" }));
    clear(this.overruns);
    for (const o of b.overruns || []) {
      this.overruns.append(el("tr", {}, el("td", { text: clock(o.ts) }), el("td", {}, taskLink(o.task)),
        el("td", { text: short(o.data, 200) })));
    }
    if (!(b.overruns || []).length) this.overruns.append(el("tr", {}, el("td", { colspan: 3,
      class: "muted", text: "none since the dashboard started" })));
    return [];
  }
}
