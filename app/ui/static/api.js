// Shared by every dashboard page: the key (a SameSite=Strict session cookie), calls to /v1, small helpers.
"use strict";
const Distill = (() => {
  const COOKIE = "distill_key";

  function key() {
    const m = document.cookie.match(/(?:^|;\s*)distill_key=([^;]*)/);
    return m && m[1] ? decodeURIComponent(m[1]) : null;
  }
  function setKey(k) {
    const secure = location.protocol === "https:" ? "; Secure" : "";
    document.cookie = `${COOKIE}=${encodeURIComponent(k)}; path=/; SameSite=Strict${secure}`;
  }
  function clearKey() { document.cookie = `${COOKIE}=; path=/; max-age=0; SameSite=Strict`; }
  function toLogin() {
    if (!location.pathname.startsWith("/ui/login")) {
      location.href = "/ui/login?next=" + encodeURIComponent(location.pathname);
    }
  }

  class ApiError extends Error {
    constructor(status, body) {
      super(body.detail || body.title || `HTTP ${status}`);
      this.status = status;
      this.code = body.code || `http_${status}`;
    }
    toString() { return `${this.code}: ${this.message}`; }
  }

  async function api(path, opts = {}) {
    const k = opts.key || key();
    if (!k) { toLogin(); throw new ApiError(401, { code: "unauthorized", detail: "log in first" }); }
    const headers = Object.assign({ Authorization: `Bearer ${k}` }, opts.headers || {});
    let body = opts.body;
    if (opts.json !== undefined) { headers["Content-Type"] = "application/json"; body = JSON.stringify(opts.json); }
    const res = await fetch(path, { method: opts.method || "GET", headers, body, credentials: "same-origin" });
    if (res.status === 401 && !opts.key) { clearKey(); toLogin(); }
    if (!res.ok) {
      let problem = {};
      try { problem = await res.json(); } catch (e) { /* not problem+json: keep the status */ }
      throw new ApiError(res.status, problem);
    }
    return res.json();
  }

  // Builds elements from text only, so nothing the API returns is ever parsed as markup.
  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "text") node.textContent = v; else node.setAttribute(k, v);
    }
    for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    return node;
  }

  const fmt = {
    pct: (v) => (typeof v === "number" ? `${(100 * v).toFixed(1)}%` : "–"),
    num: (v, d = 3) => (typeof v === "number" ? v.toFixed(d) : "–"),
    int: (v) => (typeof v === "number" ? v.toLocaleString("en") : "–"),
    bytes: (v) => {
      if (typeof v !== "number") return "–";
      const units = ["B", "KB", "MB", "GB"];
      let i = 0;
      while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
      return `${v.toFixed(i ? 1 : 0)} ${units[i]}`;
    },
    time: (iso) => (iso ? new Date(iso).toLocaleString() : ""),
    seconds: (s) => (s < 90 ? `${s.toFixed(1)} s` : `${(s / 60).toFixed(1)} min`),
  };

  const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);

  function idempotencyKey() {
    if (window.crypto && crypto.randomUUID) return `ui-${crypto.randomUUID()}`;
    const bytes = crypto.getRandomValues(new Uint8Array(16));
    return "ui-" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  function showError(id, err) {
    const node = document.getElementById(id);
    if (node) node.textContent = err ? String(err) : "";
  }

  if (!key()) toLogin();  // every page but the login needs the key; send the user there first
  document.addEventListener("DOMContentLoaded", () => {
    const out = document.getElementById("logout");
    if (out) out.addEventListener("click", (e) => { e.preventDefault(); clearKey(); location.href = "/ui/login"; });
  });

  return { api, key, setKey, clearKey, el, fmt, TERMINAL, idempotencyKey, showError, ApiError };
})();
