// A small SVG line chart of our own (no library, nothing from a CDN): series of (x, y) points per epoch,
// optional horizontal reference lines (the teacher's accuracy). Each point is a <circle class="point">.
// A legend above the plot names every line in words beside a sample of its stroke (solid, dotted, dashed),
// so which line is which never depends on telling colours apart.
"use strict";
const Chart = (() => {
  const NS = "http://www.w3.org/2000/svg";
  const COLORS = ["#2563eb", "#16a34a", "#d97706", "#9333ea", "#dc2626"];
  const DASHES = ["", "2 3", "9 3 2 3", "12 4"];  // a series' stroke when it brings none: by position
  const REF = { color: "#dc2626", dash: "6 4" };  // reference lines: the teacher, dashed
  const M = { left: 52, right: 14, top: 14, bottom: 44 };
  const ROW = 16;  // legend row height

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

  // The legend, in rows above the plot: a stroke sample and the name of each entry. Returns its height.
  function legend(svg, entries, W) {
    const g = node("g", { class: "legend" });
    svg.append(g);
    let x = M.left, row = 0;
    for (const e of entries) {
      const item = node("g", { class: "legend-entry", "data-name": e.name });
      const label = node("text", { class: "legend", y: 0 }, e.name);
      item.append(node("line", { x1: 0, x2: 24, y1: 0, y2: 0, stroke: e.color, "stroke-width": e.width,
        "stroke-dasharray": e.dash || "none", class: "sample" }), label);
      g.append(item);
      const width = 30 + (label.getComputedTextLength() || 6.5 * e.name.length) + 16;
      if (x > M.left && x + width > W - M.right) { x = M.left; row++; }
      const y = 10 + ROW * row;
      item.setAttribute("transform", `translate(${x},${y})`);
      label.setAttribute("x", 30);
      label.setAttribute("y", 4);
      x += width;
    }
    return entries.length ? ROW * (row + 1) : 0;
  }

  // opts: {series: [{name, points: [[x, y]], color?, dash?}], refs: [{name, y}], xLabel, yMin, yMax, format}.
  // `name` is what the legend and the points' tooltips say: words a reader knows (student, baseline, teacher).
  function draw(svg, opts) {
    const [, , W, H] = svg.getAttribute("viewBox").split(" ").map(Number);
    while (svg.firstChild) svg.removeChild(svg.firstChild);
    const series = opts.series.filter((s) => s.points.length).map((s, i) => ({
      ...s, color: s.color || COLORS[i % COLORS.length], dash: s.dash ?? DASHES[i % DASHES.length] }));
    const refs = (opts.refs || []).filter((r) => typeof r.y === "number");
    if (!series.length) {
      svg.append(node("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "empty" }, "waiting for the first epoch…"));
      return 0;
    }
    const format = opts.format || ((v) => String(+v.toFixed(3)));
    const top = M.top + legend(svg, series.map((s) => ({ name: s.name, color: s.color, dash: s.dash, width: 2 }))
      .concat(refs.map((r) => ({ name: r.name, color: REF.color, dash: REF.dash, width: 1.5 }))), W);
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
    const py = (y) => H - M.bottom - ((y - y0) / (y1 - y0)) * (H - top - M.bottom);

    const axes = node("g", { class: "axes" });
    for (const t of niceTicks(y0, y1, 5)) {
      axes.append(node("line", { x1: M.left, x2: W - M.right, y1: py(t), y2: py(t), class: "grid" }));
      axes.append(node("text", { x: M.left - 6, y: py(t) + 4, "text-anchor": "end" }, format(t)));
    }
    for (const t of niceTicks(x0, x1, 8).filter((t) => Number.isInteger(t))) {
      axes.append(node("text", { x: px(t), y: H - M.bottom + 16, "text-anchor": "middle" }, String(t)));
    }
    axes.append(node("line", { x1: M.left, x2: M.left, y1: top, y2: H - M.bottom, class: "axis" }));
    axes.append(node("line", { x1: M.left, x2: W - M.right, y1: H - M.bottom, y2: H - M.bottom, class: "axis" }));
    axes.append(node("text", { x: (M.left + W - M.right) / 2, y: H - 8, "text-anchor": "middle" }, opts.xLabel || "epoch"));
    svg.append(axes);

    for (const r of refs) {
      svg.append(node("line", { x1: M.left, x2: W - M.right, y1: py(r.y), y2: py(r.y), class: "ref",
        "data-name": r.name }));
      svg.append(node("text", { x: W - M.right - 4, y: py(r.y) - 5, "text-anchor": "end", class: "ref-label" },
        `${r.name} ${format(r.y)}`));
    }
    let drawn = 0;
    for (const s of series) {
      const pts = s.points.slice().sort((a, b) => a[0] - b[0]);
      svg.append(node("polyline", { points: pts.map((p) => `${px(p[0])},${py(p[1])}`).join(" "),
        fill: "none", stroke: s.color, "stroke-width": 2, "stroke-dasharray": s.dash || "none", class: "line",
        "data-name": s.name }));
      for (const [x, y] of pts) {
        const c = node("circle", { cx: px(x), cy: py(y), r: 3.5, fill: s.color, class: "point" });
        c.append(node("title", {}, `${s.name} · epoch ${x}: ${format(y)}`));
        svg.append(c);
        drawn++;
      }
    }
    return drawn;
  }

  return { draw };
})();
