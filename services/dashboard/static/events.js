// Events: the last 1,000 live, newest on top, filtered on the server; paused while the
// reader scrolls; older ones from the event log on request.
//
// The list is virtual: it keeps up to 1,000 events, but only the rows in view (a few
// dozen) are in the DOM, each a fixed height, reused as the view moves. At 1,000 events
// a second a frame then costs the same as at one a minute.

import { MAX_EVENTS, markDirty, send } from "./app.js";
import { clock, el, summary, token } from "./util.js";

const FIELDS = [["type", "type glob, e.g. task.* or *.failed"], ["task", "task id"],
  ["worker", "worker"], ["text", "text anywhere"]];
const ROW = 22; // px: every row is this tall (style.css: .ev)
const SPARE = 4; // rows drawn above and below the view

function bad(type) {
  return /failed|dead|lost|refused|rejected|overrun|fatal/.test(type);
}

export class EventsPage {
  constructor(store) {
    this.store = store;
    this.title = "Events";
    this.filter = {};
    this.list = []; // newest first: what the view shows (live, then older from the log)
    this.held = []; // arrived while paused
    this.heldCount = 0;
    this.scrolled = false;
    this.top = 0;
    this.height = 600;
    this.drawn = [];
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
    this.rows = el("div", { class: "ev-window" });
    this.spacer = el("div", { class: "ev-spacer" }, this.rows);
    this.scroller = el("div", { class: "scroller", onscroll: () => this.onScroll() }, this.spacer);
    this.older = el("button", { class: "older", onclick: () => this.loadOlder(),
      text: "Load older events from the log" });
    this.root = el("section", { id: "events" }, el("div", { class: "card" }, form,
      el("div", { class: "bar" }, this.status, this.resume),
      el("div", { class: "ev ev-head" }, ...["time", "type", "task", "worker", "source",
        "data"].map((h) => el("span", { text: h }))),
      this.scroller, el("div", { class: "bar" }, this.older)));
    new ResizeObserver(() => {
      this.height = this.scroller.clientHeight || this.height;
      markDirty("events");
    }).observe(this.scroller);
  }

  show() { this.visible = true; this.top = this.scroller.scrollTop; markDirty("events"); }
  hide() { this.visible = false; this.drawn = []; }

  setFilter() {
    const filter = {};
    for (const [name, input] of Object.entries(this.inputs)) {
      if (input.value.trim()) filter[name] = input.value.trim();
    }
    this.filter = filter;
    this.older.disabled = false;
    this.older.textContent = "Load older events from the log";
    send({ t: "filter", filter });
  }

  resend() { if (Object.keys(this.filter).length) send({ t: "filter", filter: this.filter }); }

  // Paused while the reader is scrolled down; known from scroll events, never by asking
  // the layout for every message.
  get paused() { return this.scrolled; }

  reset(events) {
    this.list = events.slice(-MAX_EVENTS).reverse();
    this.held = [];
    this.heldCount = 0;
  }

  add(events) {
    if (this.paused) {
      this.held.push(...events);
      this.heldCount += events.length;
      if (this.held.length > MAX_EVENTS) this.held.splice(0, this.held.length - MAX_EVENTS);
      return;
    }
    this.list.unshift(...events.slice(-MAX_EVENTS).reverse());
    if (this.list.length > MAX_EVENTS) this.list.length = MAX_EVENTS;
    if (this.visible) this.drawn.push(...events); // their age is measured once drawn
  }

  onScroll() {
    this.top = this.scroller.scrollTop;
    this.scrolled = this.top > 4;
    if (!this.scrolled && this.held.length) this.unpause();
    markDirty("events");
  }

  unpause() {
    const held = this.held;
    this.held = [];
    this.heldCount = 0;
    this.scrolled = false;
    this.scroller.scrollTop = 0;
    this.top = 0;
    this.add(held);
    markDirty("events");
  }

  fill(row, event) {
    const type = String(event.type || "");
    row.className = `ev${bad(type) ? " bad" : ""}${event.history ? " history" : ""}`;
    row.dataset.id = event.id || "";
    row.dataset.type = type;
    row.dataset.ts = event.ts ?? "";
    const [time, kind, task, worker, source, data] = row.children;
    time.textContent = clock(event.ts);
    kind.textContent = type;
    const link = task.firstChild;
    link.textContent = event.task || "";
    link.href = `#task/${encodeURIComponent(event.task || "")}`;
    link.hidden = !event.task;
    worker.textContent = event.worker || "";
    source.textContent = event.source || "";
    data.textContent = summary(event);
  }

  render(dirty) {
    const list = this.list;
    this.spacer.style.height = `${list.length * ROW}px`;
    const first = Math.max(0, Math.floor(this.top / ROW) - SPARE);
    const count = Math.max(0, Math.min(list.length - first,
      Math.ceil(this.height / ROW) + 2 * SPARE));
    while (this.rows.childElementCount < count) {
      this.rows.append(el("div", { class: "ev" }, el("span", { class: "mono" }), el("span"),
        el("span", { class: "mono" }, el("a")), el("span", { class: "mono" }), el("span"),
        el("span", { class: "data" })));
    }
    while (this.rows.childElementCount > count) this.rows.lastElementChild.remove();
    this.rows.style.transform = `translateY(${first * ROW}px)`;
    for (let i = 0; i < count; i++) this.fill(this.rows.children[i], list[first + i]);
    const f = Object.entries(this.filter).map(([k, v]) => `${k}=${v}`).join(", ");
    this.status.textContent = `${list.length} events` + (f ? ` matching ${f}` : "") +
      (this.paused ? " — paused while you scroll" : " — live") +
      (this.store.skipped ? ` (${this.store.skipped} not shown: more than a page at once)` : "");
    this.resume.hidden = !this.heldCount;
    this.resume.textContent = `${this.heldCount} new — back to live`;
    const drawn = this.drawn;
    this.drawn = [];
    return drawn;
  }

  async loadOlder() {
    const last = this.list[this.list.length - 1];
    const until = last && typeof last.ts === "number" ? last.ts : Date.now() / 1000;
    const params = new URLSearchParams({ ...this.filter, until: String(until), limit: "200" });
    this.older.disabled = true;
    this.older.textContent = "Reading the event log…";
    try {
      const response = await fetch(`/api/events?${params}`, { headers: { "X-Cortex-Token": token() } });
      const reply = await response.json();
      if (!response.ok) throw new Error(reply.message || response.statusText);
      const shown = new Set(this.list.map((e) => e.id));
      const fresh = reply.events.filter((e) => !shown.has(e.id));
      for (const event of fresh) event.history = true;
      // Keep the cap by dropping the newest, and stay paused so they do not come back.
      this.list.push(...fresh);
      if (this.list.length > MAX_EVENTS) this.list.splice(0, this.list.length - MAX_EVENTS);
      if (!this.scrolled) {
        this.scrolled = true;
        this.scroller.scrollTop = 5;
      }
      this.older.textContent = fresh.length
        ? `Load older events (${fresh.length} more from ${reply.source})` : "No older events match";
      this.older.disabled = !fresh.length;
    } catch (e) {
      this.older.textContent = `Could not read the log: ${e.message}`;
      this.older.disabled = false;
    }
    markDirty("events");
  }
}
