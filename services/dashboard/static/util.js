// Small helpers shared by the pages. Text from the suite (descriptions, messages, data)
// only ever reaches the page through textContent, never as HTML.

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key === "dataset") Object.assign(node.dataset, value);
    else if (key === "style") node.style.cssText = value; // CSSOM: allowed by our CSP
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

export function clear(node) {
  while (node.firstChild) node.firstChild.remove();
  return node;
}

export function duration(seconds) {
  if (seconds === null || seconds === undefined || !isFinite(seconds)) return "–";
  const s = Math.abs(seconds);
  const sign = seconds < 0 ? "-" : "";
  if (s < 1e-3) return `${sign}${(s * 1e6).toFixed(0)} µs`;
  if (s < 1) return `${sign}${(s * 1e3).toFixed(s < 0.01 ? 2 : 1)} ms`;
  if (s < 60) return `${sign}${s.toFixed(s < 10 ? 2 : 1)} s`;
  if (s < 3600) return `${sign}${Math.floor(s / 60)} min ${Math.floor(s % 60)} s`;
  if (s < 86400) return `${sign}${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
  return `${sign}${Math.floor(s / 86400)} d ${Math.floor((s % 86400) / 3600)} h`;
}

export function number(n) {
  if (n === null || n === undefined) return "–";
  if (typeof n !== "number") return String(n);
  return n.toLocaleString("en-US", { maximumFractionDigits: 2 });
}

export function clock(ts) {
  if (!ts) return "–";
  const d = new Date(ts * 1000);
  const pad = (v, n = 2) => String(v).padStart(n, "0");
  return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}.` +
    pad(d.getMilliseconds(), 3);
}

export function stamp(ts) {
  if (!ts) return "–";
  const d = new Date(ts * 1000);
  return `${d.toLocaleDateString("sv-SE")} ${clock(ts)}`;
}

export function short(value, width = 160) {
  let text = typeof value === "string" ? value : JSON.stringify(value);
  if (text === undefined) text = "";
  return text.length > width ? text.slice(0, width - 1) + "…" : text;
}

// The key data of an event, one line: what a reader wants first for each kind.
export function summary(event) {
  const data = event.data && typeof event.data === "object" ? event.data : {};
  const parts = [];
  for (const key of ["reason", "category", "message", "fraction", "code", "tokens",
    "tokens_used", "attempt", "after", "duration", "waited", "scope", "name"]) {
    if (data[key] === undefined || data[key] === null) continue;
    const v = data[key];
    const text = typeof v === "number" && ["duration", "waited", "after"].includes(key)
      ? duration(v) : short(v, 80);
    parts.push(`${key}=${text}`);
  }
  return parts.length ? parts.join(" ") : short(data, 160);
}

export function taskLink(id) {
  if (!id) return "";
  return el("a", { href: `#task/${encodeURIComponent(id)}`, class: "mono", text: id });
}

export function token() {
  return new URLSearchParams(location.search).get("token") || "";
}
