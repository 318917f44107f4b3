// The job list: newest first, refreshed every few seconds while any job on screen is still running.
"use strict";
(() => {
  const { api, el, fmt, TERMINAL, showError } = Distill;
  let cursor = null;
  let shown = [];

  function bar(pct) {
    const fill = el("div");
    fill.style.width = `${pct}%`;  // CSSOM, since the page's CSP refuses style attributes
    return el("div", { class: "progress small" }, fill);
  }

  const num = (v) => typeof v === "number" && Number.isFinite(v);
  const points = (v) => {
    const r = Math.round(10 * v) / 10;
    return `${r >= 0 ? "+" : ""}${r.toFixed(1)} pts`;  // signed, as the demo prints it; -0 reads as +0.0
  };

  // A finished job's result in one line, from the headline its report wrote into `metrics` (worker/distill
  // summary.py and lm_summary.py): accuracy, or for a causal LM held-out perplexity (lower is better).
  // A job without a headline (running, failed, or its report unreadable) shows a dash.
  function result(job) {
    const m = job.metrics || {};
    if (num(m.student_perplexity)) {
      const bits = [`perplexity: student ${m.student_perplexity.toFixed(2)}`];
      if (num(m.teacher_perplexity)) bits[0] += ` vs teacher ${m.teacher_perplexity.toFixed(2)}`;
      if (num(m.baseline_perplexity)) bits.push(`CE-only baseline ${m.baseline_perplexity.toFixed(2)}`);
      return bits.join(" · ");
    }
    if (num(m.student_accuracy)) {
      const bits = [`student ${fmt.pct(m.student_accuracy)}`];
      if (num(m.teacher_accuracy)) bits[0] += ` vs teacher ${fmt.pct(m.teacher_accuracy)}`;
      if (num(m.kd_gain_points)) bits.push(`KD ${points(m.kd_gain_points)} vs baseline`);
      return bits.join(" · ");
    }
    return "–";
  }

  function row(job) {
    const pct = Math.round(100 * (job.progress || 0));
    return el("tr", { "data-job-id": job.id },
      el("td", {}, el("a", { href: `/ui/jobs/${encodeURIComponent(job.id)}`, text: job.id })),
      el("td", {}, el("span", { class: `badge ${job.status}`, text: job.status })),
      el("td", { text: TERMINAL.has(job.status) ? "" : job.stage || "" }),
      el("td", {}, bar(pct), `${pct}%`),
      el("td", { text: (job.config && job.config.student) || "" }),
      el("td", { class: "result", text: result(job) }),
      el("td", { text: fmt.time(job.created_at) }));
  }

  function render() {
    document.querySelector("#jobs tbody").replaceChildren(...shown.map(row));
    document.getElementById("jobs-empty").hidden = shown.length > 0;
    document.getElementById("more").hidden = !cursor;
  }

  async function refresh() {
    try {
      const page = await api(`/v1/jobs?limit=25`);
      const older = shown.slice(page.data.length).filter((j) => !page.data.some((p) => p.id === j.id));
      shown = page.data.concat(older);
      if (cursor === null || !older.length) cursor = page.next_cursor;
      render();
      showError("error", "");
      if (shown.some((j) => !TERMINAL.has(j.status))) setTimeout(refresh, 3000);
    } catch (err) {
      showError("error", err);
      if (err.status !== 401) setTimeout(refresh, 6000);
    }
  }

  document.getElementById("more").addEventListener("click", async () => {
    try {
      const page = await api(`/v1/jobs?limit=25&cursor=${encodeURIComponent(cursor)}`);
      shown = shown.concat(page.data);
      cursor = page.next_cursor;
      render();
    } catch (err) { showError("error", err); }
  });
  refresh();
})();
