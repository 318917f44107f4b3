// The job page: polls the job and its events, draws the timeline, curves, report and download links.
"use strict";
(() => {
  const { api, el, fmt, TERMINAL, showError } = Distill;
  const jobId = document.getElementById("page").dataset.jobId;
  const base = `/v1/jobs/${encodeURIComponent(jobId)}`;
  const events = [];
  let lastSeq = null;
  let report = null;
  let manifest = null;  // the soft-label manifest: the teacher's accuracy, known before training starts
  let manifestTried = 0;
  let finished = false;

  const first = (obj, keys) => {
    for (const k of keys) if (obj && typeof obj[k] === "number") return obj[k];
    return undefined;
  };
  const LOSS = ["loss", "train_loss"];
  const VAL_ACC = ["val_acc", "val_accuracy"];
  const VAL_PPL = ["val_perplexity"];  // a causal-LM job's held-out perplexity: lower is better
  const TEACHER_ACC = ["teacher_val_acc", "teacher_accuracy", "teacher_acc"];
  // What each run of the distill stage is called on the curves, in words, and the stroke that tells its line
  // apart without colour: the distilled student solid, its fine-tuning dash-dot, the baseline dotted (the
  // teacher's reference line is dashed). Listed in legend order; a run not named here keeps its tag.
  const RUNS = {
    distill: { name: "student (KD)", color: "#2563eb", dash: "" },
    student: { name: "student (KD)", color: "#2563eb", dash: "" },
    finetune: { name: "student (KD, fine-tuned)", color: "#9333ea", dash: "9 3 2 3" },
    baseline: { name: "baseline (hard labels)", color: "#d97706", dash: "2 3" },
  };
  const LM_BASELINE = "baseline (CE only)";  // a causal-LM job's baseline trains on next-token cross-entropy

  async function loadEvents() {
    // Page through everything new; each page starts after the last sequence number seen.
    for (let i = 0; i < 50; i++) {
      const q = lastSeq === null ? "" : `?after=${lastSeq}`;
      const batch = (await api(`${base}/events${q}`)).data;
      if (!batch.length) return;
      events.push(...batch);
      lastSeq = batch[batch.length - 1].seq;
    }
  }

  // Per-epoch records; a run tag (autotune trials, baseline) keeps runs on separate lines.
  function epochSeries(lm) {
    const runs = new Map();
    for (const e of events) {
      const d = e.data || {};
      const m = d.metrics || {};
      const epoch = typeof d.epoch === "number" ? d.epoch : m.epoch;
      if (typeof epoch !== "number") continue;
      const run = String(m.run || d.run || m.phase || d.phase || "student");
      if (!runs.has(run)) runs.set(run, new Map());
      runs.get(run).set(epoch, m);
    }
    const order = Object.keys(RUNS);
    const rank = (run) => (order.includes(run) ? order.indexOf(run) : order.length);
    const tagged = [...runs].sort(([a], [b]) => rank(a) - rank(b));
    const series = (keys) => tagged.map(([run, byEpoch]) => ({
      ...runStyle(run, lm),
      points: [...byEpoch].filter(([, m]) => first(m, keys) !== undefined).map(([x, m]) => [x, first(m, keys)]),
    }));
    return { loss: series(LOSS), acc: series(VAL_ACC), ppl: series(VAL_PPL) };
  }

  function runStyle(run, lm) {
    const style = RUNS[run] || { name: run };
    return run === "baseline" && lm ? { ...style, name: LM_BASELINE } : style;
  }

  function teacherAccuracy(job) {
    if (report && report.teacher && typeof report.teacher.accuracy === "number") return report.teacher.accuracy;
    const splits = (manifest && manifest.splits) || {};
    const fromManifest = first(splits.val, ["teacher_accuracy"]) ?? first(splits.train, ["teacher_accuracy"]);
    if (fromManifest !== undefined) return fromManifest;
    let found = first(job.metrics, TEACHER_ACC);
    for (const e of events) found = first((e.data || {}).metrics, TEACHER_ACC) ?? first(e.data, TEACHER_ACC) ?? found;
    return found;
  }

  // A soft-label stage split over workers: its shards done / running / waiting, and who holds each.
  function renderShards(job) {
    const line = document.getElementById("shards");
    const s = (job.metrics || {}).shards;
    line.hidden = !s || TERMINAL.has(job.status);
    if (line.hidden) return;
    const held = Object.entries(s.held_by || {}).map(([n, w]) => `#${n} on ${w}`);
    line.textContent = `shards: ${s.done} of ${s.total} done, ${s.running} running, ${s.waiting} waiting` +
      (held.length ? ` (${held.join(", ")})` : "");
  }

  function renderJob(job) {
    const status = document.getElementById("status");
    status.textContent = job.status;
    status.className = `badge ${job.status}`;
    document.getElementById("progress-bar").style.width = `${Math.round(100 * (job.progress || 0))}%`;
    const done = TERMINAL.has(job.status);
    const bits = done ? [job.status] : [job.stage || job.status, `${Math.round(100 * (job.progress || 0))}%`];
    if (job.epoch !== null && job.epoch !== undefined) bits.push(`epoch ${job.epoch}`);
    const acc = first(job.metrics, VAL_ACC);
    if (acc !== undefined) bits.push(`val acc ${fmt.pct(acc)}`);
    document.getElementById("progress-text").textContent = bits.join(" · ");
    renderShards(job);
    document.getElementById("cancel").hidden = TERMINAL.has(job.status);
    showError("error", job.error ? `${job.error.code}: ${job.error.message}` : "");

    const ts = job.timestamps || {};
    const items = [...document.querySelectorAll("#timeline li")];
    for (const li of document.querySelectorAll("#timeline li.extra")) li.remove();
    if (job.status === "failed" || job.status === "cancelled") {
      const li = el("li", { "data-state": job.status, class: "extra" }, el("span", { class: "name", text: job.status }),
        el("span", { class: "when" }));
      document.getElementById("timeline").append(li);
      items.push(li);
    }
    items.forEach((li, i) => {
      const state = li.dataset.state;
      const at = ts[state];
      li.classList.toggle("done", Boolean(at));
      li.classList.toggle("current", state === job.status && !done);
      const next = items.slice(i + 1).map((n) => ts[n.dataset.state]).find(Boolean);
      const took = at && next ? ` (${fmt.seconds((new Date(next) - new Date(at)) / 1000)})` : "";
      li.querySelector(".when").textContent = at ? fmt.time(at) + took : "";
    });

    const { loss, acc: accSeries, ppl } = epochSeries(job.task === "causal_lm");
    Chart.draw(document.getElementById("loss-chart"), { series: loss });
    if (job.task === "causal_lm") {
      // Perplexity curves: the distilled student and its CE-only baseline per epoch, the teacher dashed.
      const splits = (manifest && manifest.splits) || {};
      const teacherPpl = first(job.metrics, ["teacher_perplexity"]) ?? first(splits.val, ["teacher_perplexity"]);
      document.getElementById("acc-caption").textContent = "Held-out perplexity per epoch (dashed: teacher)";
      document.getElementById("quality-head").textContent = "Perplexity";
      Chart.draw(document.getElementById("acc-chart"), {
        series: ppl, refs: teacherPpl !== undefined ? [{ name: "teacher", y: teacherPpl }] : [],
        yMin: 0, format: (v) => v.toFixed(1),
      });
    } else {
      const teacher = teacherAccuracy(job);
      Chart.draw(document.getElementById("acc-chart"), {
        series: accSeries, refs: teacher !== undefined ? [{ name: "teacher", y: teacher }] : [],
        yMax: 1, format: (v) => `${(100 * v).toFixed(0)}%`,
      });
    }

    const list = document.getElementById("events");
    list.replaceChildren(...events.slice(-200).map((e) =>
      el("li", {}, el("code", { text: `#${e.seq}` }), ` ${fmt.time(e.created_at)} `, el("b", { text: e.kind }),
        ` ${JSON.stringify(e.data)}`)));
  }

  function renderReport() {
    if (!report) return;
    const rows = [["teacher", report.teacher], ["student", report.student], ["baseline", report.baseline]];
    document.querySelector("#report tbody").replaceChildren(...rows.filter(([, r]) => r).map(([name, r]) =>
      el("tr", { "data-model": name }, el("th", { text: name }),
        el("td", { text: typeof r.perplexity === "number" ? r.perplexity.toFixed(2) : fmt.pct(r.accuracy) }),
        el("td", { text: fmt.pct(r.agreement) }), el("td", { text: fmt.int(r.parameters) }),
        el("td", { text: fmt.bytes(r.bytes) }),
        el("td", { text: typeof r.latency_ms === "number" ? `${r.latency_ms.toFixed(2)} ms` : "–" }))));
    const parts = [];
    if (typeof report.speedup === "number") parts.push(`speed-up ${report.speedup.toFixed(1)}×`);
    if (typeof report.compression === "number") parts.push(`${report.compression.toFixed(1)}× fewer parameters`);
    if (typeof report.kd_gain_points === "number") parts.push(`distillation vs baseline ${report.kd_gain_points >= 0 ? "+" : ""}${report.kd_gain_points.toFixed(2)} points`);
    document.getElementById("report-summary").textContent = parts.join(" · ");
  }

  async function loadArtifacts() {
    const arts = (await api(`${base}/artifacts`)).data;
    document.getElementById("artifacts").replaceChildren(...arts.map((a) =>
      el("li", {}, el("a", { href: `${base}/artifacts/${encodeURIComponent(a.name)}`, download: a.name, text: a.name }),
        ` ${fmt.bytes(a.size)} `, el("code", { title: a.sha256, text: `sha256 ${a.sha256.slice(0, 12)}…` }))));
    if (arts.some((a) => a.name === "report.json")) {
      report = await api(`${base}/artifacts/report.json`);
    }
  }

  async function loadManifest(job) {
    if (manifest || ["queued", "soft_labeling"].includes(job.status) || Date.now() - manifestTried < 5000) return;
    manifestTried = Date.now();
    const arts = (await api(`${base}/artifacts`)).data;
    if (arts.some((a) => a.name === "soft_labels_manifest.json")) {
      manifest = await api(`${base}/artifacts/soft_labels_manifest.json`);
    }
  }

  async function poll() {
    try {
      const job = await api(base);
      await loadEvents();
      await loadManifest(job);
      if (TERMINAL.has(job.status) && !finished) {
        finished = true;
        await loadArtifacts();
      }
      renderJob(job);
      renderReport();
      if (!TERMINAL.has(job.status)) setTimeout(poll, 1500);
    } catch (err) {
      showError("error", err);
      if (err.status !== 404 && err.status !== 401) setTimeout(poll, 5000);
    }
  }

  document.getElementById("cancel").addEventListener("click", async () => {
    try { await api(`${base}/cancel`, { method: "POST" }); } catch (err) { showError("error", err); }
  });
  poll();
})();
