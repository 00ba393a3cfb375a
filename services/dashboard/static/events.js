// Events: the last 1,000 live, newest on top, filtered on the server; paused while the
// reader scrolls; older ones from the event log on request.

import { MAX_EVENTS, send } from "./app.js";
import { clear, clock, el, summary, taskLink, token } from "./util.js";

const FIELDS = [["type", "type glob, e.g. task.* or *.failed"], ["task", "task id"],
  ["worker", "worker"], ["text", "text anywhere"]];

export class EventsPage {
  constructor(store) {
    this.store = store;
    this.title = "Events";
    this.filter = {};
    this.pending = []; // arrived, not yet drawn (drawn at the next frame)
    this.held = []; // arrived while paused (the newest MAX_EVENTS)
    this.heldCount = 0;
    this.rebuild = true;
    this.scrolled = false;
    this.inputs = {};
    let timer = null;
    const form = el("form", { class: "filter", onsubmit: (e) => e.preventDefault() },
      ...FIELDS.map(([name, hint]) => {
        const input = el("input", { name, placeholder: hint, "aria-label": name,
          autocomplete: "off", spellcheck: "false" });
        input.addEventListener("input", () => {
          clearTimeout(timer);
          timer = setTimeout(() => this.setFilter(), 250);
        });
        this.inputs[name] = input;
        return input;
      }));
    this.status = el("p", { class: "status muted" });
    this.resume = el("button", { class: "resume", hidden: true, onclick: () => this.unpause() });
    this.body = el("tbody");
    this.scroller = el("div", { class: "scroller", onscroll: () => this.onScroll() },
      // Fixed layout: a new row never makes the browser measure the other 999 again.
      el("table", { class: "events" }, el("colgroup", {}, ...["7.5em", "12em", "13em", "13em",
        "6em", "auto"].map((width) => el("col", { style: `width:${width}` }))),
      el("thead", {}, el("tr", {},
        ...["time", "type", "task", "worker", "source", "data"].map((h) => el("th", { text: h })))),
        this.body));
    this.older = el("button", { class: "older", onclick: () => this.loadOlder(),
      text: "Load older events from the log" });
    this.root = el("section", { id: "events" }, el("div", { class: "card" }, form,
      el("div", { class: "bar" }, this.status, this.resume), this.scroller,
      el("div", { class: "bar" }, this.older)));
  }

  show() { this.rebuild = true; }
  hide() {}

  setFilter() {
    const filter = {};
    for (const [name, input] of Object.entries(this.inputs)) {
      if (input.value.trim()) filter[name] = input.value.trim();
    }
    this.filter = filter;
    this.older.disabled = false;
    send({ t: "filter", filter });
  }

  resend() { if (Object.keys(this.filter).length) send({ t: "filter", filter: this.filter }); }

  // Read on scroll only: reading scrollTop for every message would make the browser lay
  // the whole table out again each time.
  get paused() { return this.scrolled; }

  reset(events) {
    this.pending = [];
    this.held = [];
    this.heldCount = 0;
    this.rebuild = true;
  }

  add(events) {
    if (this.paused) {
      this.held.push(...events);
      this.heldCount += events.length;
      if (this.held.length > MAX_EVENTS) this.held.splice(0, this.held.length - MAX_EVENTS);
      return;
    }
    this.pending.push(...events);
    if (this.pending.length > MAX_EVENTS) this.pending.splice(0, this.pending.length - MAX_EVENTS);
  }

  onScroll() {
    this.scrolled = this.scroller.scrollTop > 4;
    if (!this.scrolled && this.held.length) this.unpause();
  }

  unpause() {
    this.pending.push(...this.held);
    if (this.pending.length > MAX_EVENTS) this.pending.splice(0, this.pending.length - MAX_EVENTS);
    this.held = [];
    this.heldCount = 0;
    this.scroller.scrollTop = 0;
    this.scrolled = false;
    this.render(new Set(["events"]));
  }

  row(event) {
    const type = String(event.type || "");
    return el("tr", { class: `ev ${type.split(".")[0]} ${/failed|dead|lost|refused|rejected|overrun|fatal/.test(type) ? "bad" : ""}`,
      dataset: { id: event.id || "", type, ts: event.ts ?? "" } },
      el("td", { class: "mono", text: clock(event.ts) }), el("td", { text: type }),
      el("td", {}, taskLink(event.task)), el("td", { class: "mono", text: event.worker || "" }),
      el("td", { text: event.source || "" }), el("td", { class: "data", text: summary(event) }));
  }

  render(dirty) {
    let drawn = [];
    if (this.rebuild) {
      this.rebuild = false;
      this.pending = [];
      const events = this.store.events.slice(-MAX_EVENTS);
      const rows = events.map((e) => this.row(e)).reverse();
      this.body.replaceChildren(...rows); // not counted as drawn: they are history
    } else if (this.pending.length) {
      drawn = this.pending;
      this.pending = [];
      const fragment = document.createDocumentFragment();
      for (let i = drawn.length - 1; i >= 0; i--) fragment.append(this.row(drawn[i]));
      this.body.prepend(fragment);
      while (this.body.childElementCount > MAX_EVENTS) this.body.lastElementChild.remove();
    }
    if (dirty.has("events") || dirty.has("tick") || drawn.length) {
      const f = Object.entries(this.filter).map(([k, v]) => `${k}=${v}`).join(", ");
      this.status.textContent = `${this.body.childElementCount} events shown` +
        (f ? ` matching ${f}` : "") + (this.paused ? " — paused while you scroll" : " — live") +
        (this.store.skipped ? ` (${this.store.skipped} not shown: more than a page at once)` : "");
      this.resume.hidden = !this.heldCount;
      this.resume.textContent = `${this.heldCount} new — back to live`;
    }
    return drawn;
  }

  async loadOlder() {
    const last = this.body.lastElementChild;
    const oldest = this.store.events.length ? this.store.events[0].ts : Date.now() / 1000;
    const until = last && last.dataset.ts ? Number(last.dataset.ts) : oldest;
    const params = new URLSearchParams({ ...this.filter, until: String(until), limit: "200" });
    this.older.disabled = true;
    this.older.textContent = "Reading the event log…";
    try {
      const response = await fetch(`/api/events?${params}`, { headers: { "X-Cortex-Token": token() } });
      const reply = await response.json();
      if (!response.ok) throw new Error(reply.message || response.statusText);
      const shown = new Set([...this.body.children].map((r) => r.dataset.id));
      const fresh = reply.events.filter((e) => !shown.has(e.id));
      for (const event of fresh) {
        const row = this.row(event);
        row.classList.add("history");
        this.body.append(row);
      }
      // Keep the cap: drop the newest rows, and stay paused so they do not come back.
      while (this.body.childElementCount > MAX_EVENTS) this.body.firstElementChild.remove();
      if (!this.scrolled) this.scroller.scrollTop = 5; // paused: the live rows would push these out
      this.scrolled = true;
      this.older.textContent = fresh.length ? `Load older events (${fresh.length} more from ${reply.source})`
        : "No older events match";
      this.older.disabled = !fresh.length;
    } catch (e) {
      this.older.textContent = `Could not read the log: ${e.message}`;
      this.older.disabled = false;
    }
  }
}
