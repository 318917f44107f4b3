// The new-job form: uploads the teacher file(s) and the dataset, then submits the job and opens its page.
"use strict";
(() => {
  const { api, idempotencyKey, showError } = Distill;
  const form = document.getElementById("job-form");
  const status = document.getElementById("form-status");
  // One key per filled-in form: pressing Start again after a network error cannot make a second job.
  let submitKey = idempotencyKey();
  form.addEventListener("input", () => { submitKey = idempotencyKey(); });

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
    const button = document.getElementById("start");
    let config;
    try {
      config = JSON.parse(document.getElementById("config").value || "{}");
      if (typeof config !== "object" || Array.isArray(config) || config === null) throw new Error("not an object");
    } catch (err) {
      showError("form-error", `Other settings must be a JSON object (${err.message})`);
      return;
    }
    config.method = document.getElementById("method").value;
    config.epochs = Number(document.getElementById("epochs").value);
    button.disabled = true;
    try {
      const teachers = [];
      for (const f of document.getElementById("teacher").files) teachers.push((await upload(f, "teacher")).id);
      const dataset = await upload(document.getElementById("dataset").files[0], "dataset");
      status.textContent = "starting the job…";
      const job = await api("/v1/jobs", {
        method: "POST", headers: { "Idempotency-Key": submitKey },
        json: {
          teacher_file_ids: teachers, dataset_file_id: dataset.id,
          student: document.getElementById("student").value, config,
          webhook_url: document.getElementById("webhook").value || null, metadata: { source: "dashboard" },
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
