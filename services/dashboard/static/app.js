// The dashboard's shell: one WebSocket, one store, one render per animation frame.
//
// Messages change the store and mark what changed; at most once per frame the visible
// page redraws what is marked. Everything kept is capped (events: 1,000; series: the
// server's window), so a long-open page under load stays the same size.

import { FleetPage } from "./fleet.js";
import { QueuePage } from "./queue.js";
import { BudgetsPage } from "./budgets.js";
import { LatencyPage } from "./latency.js";
import { EventsPage } from "./events.js";
import { TaskPage } from "./task.js";
import { el, token } from "./util.js";

export const MAX_EVENTS = 1000;
const MAX_POINTS = 600;

export const store = {
  fleet: new Map(), queue: { rows: [], totals: {}, admission: {}, refusals: [] },
  budgets: { rows: [], overruns: [] }, services: [], resources: [],
  latency: { series: {}, summary: [] }, events: [], counts: {},
  skipped: 0, clockOffset: 0, connected: false,
  now() { return Date.now() / 1000 + this.clockOffset; },
};

// What the tests and the curious can read: how far behind the events are on screen.
const lags = []; // seconds from an event to the frame that drew it
const arrivals = []; // seconds from an event to its message reaching the page
const renderMs = []; // seconds of main-thread time each frame's drawing took
function keep(ring, value) {
  ring.push(value);
  if (ring.length > 5000) ring.splice(0, ring.length - 5000);
}
function quantiles(ring) {
  const s = [...ring].sort((a, b) => a - b);
  const q = (p) => s.length ? s[Math.min(s.length - 1, Math.floor(p * s.length))] : null;
  return { n: s.length, p50: q(0.5), p95: q(0.95), max: s.length ? s[s.length - 1] : null };
}
window.cortexDashboard = {
  store, lags, arrivals, frames: 0,
  lagSummary() {
    return { drawn: quantiles(lags), arrived: quantiles(arrivals), render: quantiles(renderMs) };
  },
  reset() { lags.length = 0; arrivals.length = 0; renderMs.length = 0; },
};

const pages = {
  fleet: new FleetPage(store), queue: new QueuePage(store), budgets: new BudgetsPage(store),
  latency: new LatencyPage(store), events: new EventsPage(store), task: new TaskPage(store),
};
// How many events the events page holds (the DOM has only the rows in view).
window.cortexDashboard.eventsHeld = () => pages.events.list.length;
const dirty = new Set();
let current = null;
let frameRequested = false;
let socket = null;

export function markDirty(...keys) {
  for (const key of keys) dirty.add(key);
  if (!frameRequested) {
    frameRequested = true;
    requestAnimationFrame(frame);
  }
}

function frame() {
  frameRequested = false;
  window.cortexDashboard.frames++;
  const began = performance.now();
  const shown = current ? pages[current] : null;
  const drawnEvents = shown ? shown.render(dirty) || [] : [];
  dirty.clear();
  keep(renderMs, (performance.now() - began) / 1000);
  if (drawnEvents.length) {
    // Measured after the frame is painted: the event's age when a person could see it.
    setTimeout(() => {
      const now = Date.now() / 1000;
      for (const event of drawnEvents) {
        if (typeof event.ts === "number") keep(lags, now - event.ts);
      }
    }, 0);
  }
}

function apply(msg) {
  if (typeof msg.now === "number") store.clockOffset = msg.now - Date.now() / 1000;
  if (msg.t === "snapshot") {
    store.fleet = new Map(Object.entries(msg.fleet || {}));
    store.queue = msg.queue; store.budgets = msg.budgets; store.services = msg.services;
    store.resources = msg.resources || []; store.latency = msg.latency; store.counts = msg.counts;
    store.events = (msg.events || []).slice(-MAX_EVENTS);
    pages.events.reset(store.events);
    markDirty("fleet", "queue", "budgets", "services", "resources", "latency", "events");
  } else if (msg.t === "update") {
    if (msg.fleet) {
      for (const [name, row] of Object.entries(msg.fleet)) {
        if (row === null) store.fleet.delete(name); else store.fleet.set(name, row);
      }
      markDirty("fleet");
    }
    for (const key of ["queue", "budgets", "services"]) {
      if (msg[key]) { store[key] = msg[key]; markDirty(key); }
    }
    if (msg.resources) {
      store.resources.push(msg.resources);
      if (store.resources.length > MAX_POINTS) store.resources.splice(0, store.resources.length - MAX_POINTS);
      markDirty("resources");
    }
    if (msg.latency_point) {
      for (const [label, stats] of Object.entries(msg.latency_point.series)) {
        const series = store.latency.series[label] || (store.latency.series[label] = []);
        series.push({ ts: msg.latency_point.ts, ...stats });
        if (series.length > MAX_POINTS) series.splice(0, series.length - MAX_POINTS);
      }
      markDirty("latency");
    }
    if (msg.latency_summary) { store.latency.summary = msg.latency_summary; markDirty("latency"); }
    if (msg.counts) store.counts = msg.counts;
  } else if (msg.t === "events") {
    if (msg.reset) {
      store.events = (msg.events || []).slice(-MAX_EVENTS);
      pages.events.reset(store.events);
    } else if (msg.events && msg.events.length) {
      const now = Date.now() / 1000;
      for (const event of msg.events) if (typeof event.ts === "number") keep(arrivals, now - event.ts);
      store.events.push(...msg.events);
      if (store.events.length > MAX_EVENTS) store.events.splice(0, store.events.length - MAX_EVENTS);
      pages.events.add(msg.events);
    }
    store.skipped += msg.skipped || 0;
    if (msg.task_events && msg.task_events.length) pages.task.addEvents(msg.task_events);
    markDirty("events", "task");
  } else if (msg.t === "error") {
    console.warn("dashboard:", msg.code, msg.message);
  }
}

export function send(msg) {
  if (socket && socket.readyState === WebSocket.OPEN) socket.send(JSON.stringify(msg));
}

function connect() {
  const url = `ws://${location.host}/ws?token=${encodeURIComponent(token())}`;
  socket = new WebSocket(url);
  socket.onopen = () => {
    store.connected = true;
    setStatus();
    pages.events.resend();
    pages.task.resend();
  };
  socket.onmessage = (e) => apply(JSON.parse(e.data));
  socket.onclose = async () => {
    store.connected = false;
    setStatus();
    // A restarted dashboard has a new token: say so rather than retry for ever.
    try {
      const probe = await fetch("/api/snapshot", { headers: { "X-Cortex-Token": token() } });
      if (probe.status === 403) {
        const status = document.getElementById("connection");
        status.textContent = "new token: open the URL `cortex dashboard` prints";
        return;
      }
    } catch (e) { /* not listening yet: try again */ }
    setTimeout(connect, 1000); // the suite restarting: keep trying, once a second
  };
}

function setStatus() {
  const status = document.getElementById("connection");
  status.textContent = store.connected ? "live" : "reconnecting…";
  status.className = store.connected ? "live" : "down";
}

function route() {
  const [name, ...rest] = location.hash.replace(/^#/, "").split("/");
  const next = pages[name] ? name : "fleet";
  if (current !== next) {
    if (current) pages[current].hide();
    current = next;
    for (const link of document.querySelectorAll("nav a")) {
      link.classList.toggle("active", link.dataset.page === next);
    }
    const main = document.getElementById("page");
    main.replaceChildren(pages[next].root);
    pages[next].show();
  }
  if (next === "task") pages.task.open(decodeURIComponent(rest.join("/")));
  markDirty("fleet", "queue", "budgets", "services", "resources", "latency", "events", "task");
}

function start() {
  const nav = document.querySelector("nav");
  for (const [name, page] of Object.entries(pages)) {
    nav.append(el("a", { href: `#${name}`, dataset: { page: name }, text: page.title }));
  }
  window.addEventListener("hashchange", route);
  setInterval(() => markDirty("tick"), 1000); // ages and running times move on
  route();
  connect();
}

start();
