// Task: one task's whole story (as `cortex task trace`), its progress, its prediction
// against what it used, its result or error with the traceback, and a cancel button.

import { send } from "./app.js";
import { clear, clock, duration, el, number, short, stamp, summary, token } from "./util.js";

const FINAL = new Set(["completed", "failed", "cancelled", "dead"]);
const MAX_TRACE = 5000;

export class TaskPage {
  constructor(store) {
    this.store = store;
    this.title = "Task";
    this.id = null;
    this.task = null;
    this.trace = [];
    this.ids = new Set();
    this.fresh = [];
    this.refetch = null;
    this.input = el("input", { placeholder: "task id", "aria-label": "task id", spellcheck: "false" });
    const form = el("form", { class: "filter", onsubmit: (e) => {
      e.preventDefault();
      if (this.input.value.trim()) location.hash = `#task/${encodeURIComponent(this.input.value.trim())}`;
    } }, this.input, el("button", { type: "submit", text: "Open" }));
    this.head = el("div", { class: "task-head" });
    this.body = el("div", { class: "task-body" });
    this.traceBody = el("tbody");
    this.root = el("section", { id: "task" }, el("div", { class: "card" }, form, this.head),
      this.body, el("div", { class: "card" }, el("h2", { text: "Trace" }),
        el("table", { class: "trace" }, el("thead", {}, el("tr", {}, ...["+time", "at", "source",
          "type", "worker", "data"].map((h) => el("th", { text: h })))), this.traceBody)));
  }

  show() {}
  hide() { send({ t: "task", id: null }); clearTimeout(this.refetch); }
  resend() { if (this.id) send({ t: "task", id: this.id }); }

  open(id) {
    if (!id) {
      this.id = null;
      clear(this.head).append(el("p", { class: "muted", text: "Open a task by its id, or follow a task link from another page." }));
      clear(this.body);
      clear(this.traceBody);
      return;
    }
    if (id === this.id) return;
    this.id = id;
    this.outcome = "";
    this.input.value = id;
    this.task = null;
    this.trace = [];
    this.ids = new Set();
    clear(this.head).append(el("p", { class: "muted", text: `Loading ${id}…` }));
    clear(this.body);
    clear(this.traceBody);
    send({ t: "task", id }); // its live events come before the fetch ends: none is missed
    this.load();
  }

  async load() {
    const id = this.id;
    clearTimeout(this.refetch);
    try {
      const response = await fetch(`/api/task/${encodeURIComponent(id)}`,
        { headers: { "X-Cortex-Token": token() } });
      const reply = await response.json();
      if (id !== this.id) return;
      if (!response.ok) {
        clear(this.head).append(el("p", { class: "bad", text: reply.message || response.statusText }));
        return;
      }
      this.task = reply.task;
      this.reservation = reply.reservation;
      this.addEvents(reply.trace.events || [], true);
      this.draw();
    } catch (e) {
      if (id === this.id) clear(this.head).append(el("p", { class: "bad", text: `Could not load: ${e.message}` }));
    }
    // While it runs, its status (progress, tokens) is read again every second.
    if (id === this.id && !(this.task && FINAL.has(this.task.state))) {
      this.refetch = setTimeout(() => this.load(), 1000);
    }
  }

  addEvents(events, fromLoad = false) {
    let added = false;
    for (const event of events) {
      if (event.task !== this.id || this.ids.has(event.id)) continue;
      this.ids.add(event.id);
      this.trace.push(event);
      if (!fromLoad) this.fresh.push(event); // live ones: their age is measured once drawn
      added = true;
    }
    if (!added) return;
    this.pendingDraw = true;
    this.trace.sort((a, b) => (a.ts || 0) - (b.ts || 0));
    if (this.trace.length > MAX_TRACE) this.trace.splice(0, this.trace.length - MAX_TRACE);
    if (!fromLoad) {
      const last = events[events.length - 1];
      if (this.task && last.type === "task.progress" && last.data) {
        this.task.progress = last.data.fraction;
        this.task.message = last.data.message;
      }
      // An event about it: its status moved, read it again now.
      clearTimeout(this.refetch);
      this.refetch = setTimeout(() => this.load(), 50);
    }
  }

  render(dirty) {
    if (!this.id) return [];
    if (dirty.has("task") && (this.fresh.length || this.pendingDraw)) this.draw();
    else if (dirty.has("tick") && this.task && !FINAL.has(this.task.state)) this.drawHead();
    const drawn = this.fresh;
    this.fresh = [];
    return drawn;
  }

  draw() {
    this.pendingDraw = false;
    this.drawHead();
    this.drawBody();
    this.drawTrace();
  }

  drawHead() {
    const t = this.task;
    clear(this.head);
    if (!t) {
      this.head.append(el("p", { class: "muted", text: `${this.id}: not in the scheduler's memory; its events follow.` }));
      return;
    }
    const now = this.store.now();
    const times = t.times || {};
    const end = FINAL.has(t.state) ? times[t.state] : null;
    const progress = typeof t.progress === "number" ? t.progress : 0;
    this.head.append(...[
      el("h2", {}, el("span", { class: "mono", text: t.id }), " ",
        el("span", { class: `badge ${t.state}`, id: "task-state", text: t.state })),
      el("p", {}, `${t.type} · ${t.priority} · agent ${t.agent} · attempt ${t.attempt}` +
        (t.worker ? ` · worker ${t.worker}` : "")),
      el("p", { class: "muted", text: short(t.description || "", 300) }),
      t.routing ? routingLine(t.routing) : null,
      el("p", {}, `created ${stamp(times.created)}` + (times.started ? `, started ${clock(times.started)}` : "") +
        (end ? `, ended ${clock(end)} (${duration(end - times.created)} in all)` : `, ${duration(now - times.created)} so far`)),
      t.state === "queued" ? el("p", { class: "waiting" }, `waiting for ${t.waiting || "a worker"}` +
        (t.waiting_detail ? ` (${short(t.waiting_detail, 200)})` : "") +
        (typeof t.eta === "number" ? `, expected to start in ${duration(t.eta - now)}` : "")) : null,
      el("div", { class: "progress", id: "task-progress" },
        el("div", { class: "bar-fill", style: `width:${Math.round(progress * 100)}%` }),
        el("span", { text: `${Math.round(progress * 100)} %${t.message ? ` — ${t.message}` : ""}` })),
      FINAL.has(t.state) ? null : el("button", { class: "danger", id: "cancel",
        onclick: () => this.cancel(), text: "Cancel this task" }),
      el("span", { id: "cancel-outcome", class: "muted", text: this.outcome || "" }),
    ].filter(Boolean));
  }

  drawBody() {
    const t = this.task;
    clear(this.body);
    if (!t) return;
    const predicted = t.predicted || {};
    const actual = t.actual || {};
    const r = this.reservation || {};
    const rows = [["duration", duration(predicted.duration), duration(actual.duration)],
      ["tokens", number(predicted.tokens), number(t.tokens_used)],
      ["memory (MB)", number(predicted.memory_mb), number(actual.memory_mb)],
      ["CPU", predicted.cpu_s !== undefined ? `${number(predicted.cpu_s)} s` : "–",
        actual.cpu_s !== undefined ? `${number(actual.cpu_s)} s` : "–"]];
    this.body.append(el("div", { class: "row" },
      el("div", { class: "card" }, el("h2", {}, "Predicted and used ", el("span", { class: "muted",
        text: predicted.source ? `(model: ${predicted.source})` : "" })),
        el("table", { class: "predicted" }, el("thead", {}, el("tr", {}, el("th", { text: "" }),
          el("th", { text: "predicted" }), el("th", { text: "used" }))),
          el("tbody", {}, ...rows.map(([k, p, a]) => el("tr", {}, el("th", { text: k }),
            el("td", { class: "num", text: p }), el("td", { class: "num", text: a })))))),
      el("div", { class: "card" }, el("h2", { text: "Tokens" }), el("dl", {},
        el("dt", { text: "asked" }), el("dd", { text: number(t.tokens) }),
        el("dt", { text: "reserved" }), el("dd", { text: number(r.reserved ?? t.reserved) }),
        el("dt", { text: "used" }), el("dd", { text: number(r.used ?? t.tokens_used) }),
        el("dt", { text: "overrun" }), el("dd", { text: number(r.overrun ?? 0) })))));
    if (t.error) {
      this.body.append(el("div", { class: "card error", id: "task-error" },
        el("h2", { text: `Error: ${t.error.category || "error"}` }),
        el("p", { class: "mono", text: t.error.message || "" }),
        t.error.traceback ? el("pre", { class: "traceback", text: t.error.traceback }) : null));
    }
    if (t.state === "completed") {
      this.body.append(el("div", { class: "card", id: "task-result" }, el("h2", { text: "Result" }),
        el("pre", { text: JSON.stringify(t.result, null, 2) ?? "null" })));
    }
  }

  drawTrace() {
    clear(this.traceBody);
    const base = this.trace.length ? this.trace[0].ts : 0;
    for (const event of this.trace) {
      this.traceBody.append(el("tr", { dataset: { type: event.type || "" } },
        el("td", { class: "num mono", text: `+${duration((event.ts || base) - base)}` }),
        el("td", { class: "mono", text: clock(event.ts) }), el("td", { text: event.source || "" }),
        el("td", { text: event.type || "" }), el("td", { class: "mono", text: event.worker || "" }),
        el("td", { class: "data", text: summary(event) })));
    }
  }

  async cancel() {
    try {
      const response = await fetch(`/api/task/${encodeURIComponent(this.id)}/cancel`,
        { method: "POST", headers: { "X-Cortex-Token": token() } });
      const reply = await response.json();
      this.outcome = response.ok ? `cancel asked: now ${reply.task.state}`
        : `not cancelled: ${reply.message}`;
      if (response.ok) this.task = reply.task;
    } catch (e) {
      this.outcome = `not cancelled: ${e.message}`;
    }
    this.draw();
  }
}

// A task submitted as "auto": the type chosen from its description, how sure, the
// runner-up, and what became of it (routed, or the fallback below the bar).
function routingLine(r) {
  const pct = (p) => (typeof p === "number" ? `${Math.round(p * 100)} %` : "–");
  const top = (r.top || []).map((c) => `${c.type} ${pct(c.probability)}`).join(", ");
  return el("p", { class: "routing", id: "task-routing" },
    `routed by description: ${r.outcome} to ${r.type} (chose ${r.chosen} at ${pct(r.confidence)}` +
    (r.runner_up ? `, runner-up ${r.runner_up} at ${pct(r.runner_up_confidence)}` : "") +
    `)` + (top ? ` · top: ${top}` : ""));
}
