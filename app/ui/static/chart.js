// A small SVG line chart of our own (no library, nothing from a CDN): series of (x, y) points per epoch,
// optional horizontal reference lines (the teacher's accuracy). Each point is a <circle class="point">.
"use strict";
const Chart = (() => {
  const NS = "http://www.w3.org/2000/svg";
  const COLORS = ["#2563eb", "#16a34a", "#d97706", "#9333ea", "#dc2626"];
  const M = { left: 52, right: 14, top: 14, bottom: 44 };

  function node(tag, attrs, text) {
    const n = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, v);
    if (text !== undefined) n.textContent = text;
    return n;
  }

  function niceTicks(lo, hi, count) {
    const span = hi - lo || 1;
    const raw = span / count;
    const mag = Math.pow(10, Math.floor(Math.log10(raw)));
    const step = [1, 2, 2.5, 5, 10].map((s) => s * mag).find((s) => span / s <= count) || raw;
    const ticks = [];
    for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) ticks.push(+t.toFixed(10));
    return ticks;
  }

  // opts: {series: [{name, points: [[x, y]]}], refs: [{name, y}], xLabel, yMin, yMax, format}
  function draw(svg, opts) {
    const [, , W, H] = svg.getAttribute("viewBox").split(" ").map(Number);
    while (svg.firstChild) svg.removeChild(svg.firstChild);
    const series = opts.series.filter((s) => s.points.length);
    const refs = (opts.refs || []).filter((r) => typeof r.y === "number");
    if (!series.length) {
      svg.append(node("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "empty" }, "waiting for the first epoch…"));
      return 0;
    }
    const xs = series.flatMap((s) => s.points.map((p) => p[0]));
    const ys = series.flatMap((s) => s.points.map((p) => p[1])).concat(refs.map((r) => r.y));
    let [x0, x1] = [Math.min(...xs), Math.max(...xs)];
    if (x0 === x1) { x0 -= 1; x1 += 1; }
    let y0 = opts.yMin !== undefined ? Math.min(opts.yMin, ...ys) : Math.min(...ys);
    let y1 = opts.yMax !== undefined ? Math.max(opts.yMax, ...ys) : Math.max(...ys);
    const pad = (y1 - y0) * 0.08 || Math.abs(y1) * 0.1 || 1;
    if (opts.yMin === undefined) y0 -= pad;
    if (opts.yMax === undefined) y1 += pad;
    const px = (x) => M.left + ((x - x0) / (x1 - x0)) * (W - M.left - M.right);
    const py = (y) => H - M.bottom - ((y - y0) / (y1 - y0)) * (H - M.top - M.bottom);
    const format = opts.format || ((v) => String(+v.toFixed(3)));

    const axes = node("g", { class: "axes" });
    for (const t of niceTicks(y0, y1, 5)) {
      axes.append(node("line", { x1: M.left, x2: W - M.right, y1: py(t), y2: py(t), class: "grid" }));
      axes.append(node("text", { x: M.left - 6, y: py(t) + 4, "text-anchor": "end" }, format(t)));
    }
    for (const t of niceTicks(x0, x1, 8).filter((t) => Number.isInteger(t))) {
      axes.append(node("text", { x: px(t), y: H - M.bottom + 16, "text-anchor": "middle" }, String(t)));
    }
    axes.append(node("line", { x1: M.left, x2: M.left, y1: M.top, y2: H - M.bottom, class: "axis" }));
    axes.append(node("line", { x1: M.left, x2: W - M.right, y1: H - M.bottom, y2: H - M.bottom, class: "axis" }));
    axes.append(node("text", { x: (M.left + W - M.right) / 2, y: H - 8, "text-anchor": "middle" }, opts.xLabel || "epoch"));
    svg.append(axes);

    for (const r of refs) {
      svg.append(node("line", { x1: M.left, x2: W - M.right, y1: py(r.y), y2: py(r.y), class: "ref" }));
      svg.append(node("text", { x: W - M.right - 4, y: py(r.y) - 5, "text-anchor": "end", class: "ref-label" },
        `${r.name} ${format(r.y)}`));
    }
    let drawn = 0;
    series.forEach((s, i) => {
      const color = COLORS[i % COLORS.length];
      const pts = s.points.slice().sort((a, b) => a[0] - b[0]);
      svg.append(node("polyline", { points: pts.map((p) => `${px(p[0])},${py(p[1])}`).join(" "),
        fill: "none", stroke: color, "stroke-width": 2, class: "line" }));
      for (const [x, y] of pts) {
        const c = node("circle", { cx: px(x), cy: py(y), r: 3.5, fill: color, class: "point" });
        c.append(node("title", {}, `${s.name} · epoch ${x}: ${format(y)}`));
        svg.append(c);
        drawn++;
      }
      svg.append(node("text", { x: M.left + 8, y: M.top + 12 + 14 * i, fill: color, class: "legend" }, s.name));
    });
    return drawn;
  }

  return { draw };
})();
