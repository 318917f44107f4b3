// The new-job form: uploads the teacher file(s) and the dataset, then submits the job and opens its page.
"use strict";
(() => {
  const { api, el, idempotencyKey, showError } = Distill;
  const form = document.getElementById("job-form");
  const status = document.getElementById("form-status");
  // One key per filled-in form: pressing Start again after a network error cannot make a second job.
  let submitKey = idempotencyKey();
  form.addEventListener("input", () => { submitKey = idempotencyKey(); });

  // Per task: the methods the API takes (app/jobs/config_schema.py; "ce" is the LM baseline, not offered),
  // the defaults of the fields that have one per task, the shortest max_length it accepts, and whether
  // several teacher files (an ensemble) are allowed.
  const TASKS = {
    classification: {
      methods: [["auto", "auto (Hinton KD or DIST, chosen on validation)"], ["hinton"], ["soft_target"],
        ["mse_logits"], ["dkd"], ["dist"]],
      defaults: { student: "mlp:hidden=128", epochs: "10" },
      minLength: 1,
      ensembles: true,
    },
    causal_lm: {
      methods: [["auto", "auto (forward KL)"], ["fkl", "fkl (forward KL)"], ["rkl", "rkl (reverse KL)"],
        ["gkd", "gkd (generalized JSD)"]],
      defaults: { student: "causal_lm", epochs: "4" },
      minLength: 8,
      ensembles: false,  // a language model's teacher is one folder archive or one GGUF file
    },
  };
  const field = (id) => document.getElementById(id);
  let shown = "classification";  // the task whose defaults the page was served with

  // A default the user has not changed (or has emptied) follows the task; anything typed in stays.
  function applyTask() {
    const task = TASKS[field("task").value] ? field("task").value : "classification";
    const spec = TASKS[task];
    const method = field("method");
    const chosen = method.value;
    const options = spec.methods.map(([value, label]) => el("option", { value, text: label ?? value }));
    method.replaceChildren(...options);
    if (spec.methods.some(([value]) => value === chosen)) method.value = chosen;
    for (const [id, value] of Object.entries(spec.defaults)) {
      const input = field(id);
      if (input.value === "" || input.value === TASKS[shown].defaults[id]) input.value = value;
      input.placeholder = value;
    }
    field("max-length").min = String(spec.minLength);
    field("teacher").multiple = spec.ensembles;
    for (const node of form.querySelectorAll("[data-task]")) node.hidden = node.dataset.task !== task;
    shown = task;
  }
  field("task").addEventListener("change", applyTask);
  applyTask();

  async function upload(file, purpose) {
    status.textContent = `uploading ${file.name}…`;
    const body = new FormData();
    body.append("purpose", purpose);
    body.append("file", file, file.name);
    return api("/v1/files", { method: "POST", body });
  }

  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    showError("form-error", "");
    const button = field("start");
    let config;
    try {
      config = JSON.parse(field("config").value || "{}");
      if (typeof config !== "object" || Array.isArray(config) || config === null) throw new Error("not an object");
    } catch (err) {
      showError("form-error", `Other settings must be a JSON object (${err.message})`);
      return;
    }
    // The form's own fields win over the same keys in the JSON; an empty optional one is not sent at all.
    config.method = field("method").value;
    config.epochs = Number(field("epochs").value);
    if (field("text-column").value.trim()) config.text_column = field("text-column").value.trim();
    if (field("max-length").value) config.max_length = Number(field("max-length").value);
    button.disabled = true;
    try {
      const teachers = [];
      for (const f of field("teacher").files) teachers.push((await upload(f, "teacher")).id);
      const dataset = await upload(field("dataset").files[0], "dataset");
      status.textContent = "starting the job…";
      const job = await api("/v1/jobs", {
        method: "POST", headers: { "Idempotency-Key": submitKey },
        json: {
          task: shown, teacher_file_ids: teachers, dataset_file_id: dataset.id,
          student: field("student").value.trim() || null, config,
          webhook_url: field("webhook").value || null, metadata: { source: "dashboard" },
        },
      });
      location.href = `/ui/jobs/${encodeURIComponent(job.id)}`;
    } catch (err) {
      status.textContent = "";
      showError("form-error", err);
      button.disabled = false;
    }
  });
})();
