"""The HTML of each dashboard page. Pages carry no tenant data: the scripts fetch it with the user's key,
so a shell is safe to serve to anyone, and every value they show is set as text, never as markup."""

from __future__ import annotations

from html import escape

STATES = ("queued", "soft_labeling", "distilling", "evaluating", "exporting", "succeeded")


def layout(title: str, body: str, script: str, *, data: dict[str, str] | None = None) -> str:
    attrs = "".join(f' data-{escape(k)}="{escape(v)}"' for k, v in (data or {}).items())
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{escape(title)} · distill</title><link rel="icon" href="data:,">
<link rel="stylesheet" href="/ui/static/style.css"></head>
<body><header><a class="brand" href="/ui">distill</a><nav><a href="/ui">Jobs</a><a href="/ui/new">New job</a>
<a href="#" id="logout">Log out</a></nav></header>
<main id="page"{attrs}>{body}</main>
<script src="/ui/static/api.js"></script><script src="/ui/static/chart.js"></script>
<script src="/ui/static/{escape(script)}"></script></body></html>"""


def login_page() -> str:
    body = """<h1>Log in</h1>
<form id="login-form" class="card"><label>API key <input id="api-key" name="api_key" type="password"
 autocomplete="current-password" required></label><button type="submit">Log in</button>
<p class="hint">The key is kept in this browser's session cookie until you log out or close it.</p>
<p id="login-error" class="error" role="alert"></p></form>"""
    return layout("Log in", body, "login.js")


def jobs_page() -> str:
    body = """<h1>Jobs <a class="button" href="/ui/new">New job</a></h1>
<table id="jobs"><thead><tr><th>Job</th><th>Status</th><th>Stage</th><th>Progress</th><th>Student</th>
<th>Result</th><th>Created</th></tr></thead><tbody></tbody></table>
<p id="jobs-empty" class="hint" hidden>No jobs yet.</p>
<button id="more" hidden>Older jobs</button><p id="error" class="error" role="alert"></p>"""
    return layout("Jobs", body, "jobs.js")


def new_job_page() -> str:
    # new.js fills the method list and the student's and epochs' defaults from the task, and shows the hints
    # marked with that task (data-task); the spans carry both tasks' words so the page needs no templating.
    body = """<h1>New job</h1>
<form id="job-form" class="card">
<label>Task <select id="task" name="task"><option value="classification">classification</option>
 <option value="causal_lm">causal language model (token-level KD)</option></select></label>
<label>Teacher model <span class="hint" data-task="classification">(TorchScript, ONNX, safetensors;
 a text classifier: a Hugging Face sequence-classification folder as .tar.gz/.zip, or an ONNX model with its
 tokenizer.json in one archive; several files make an ensemble)</span><span class="hint" data-task="causal_lm"
 hidden>(a Hugging Face model folder as .tar.gz/.zip, or a GGUF file)</span>
 <input id="teacher" name="teacher" type="file" multiple required></label>
<label>Training data <span class="hint" data-task="classification">(npz, csv, parquet, image archive, idx;
 text: CSV, Parquet or JSONL with a text and a label column)</span><span class="hint" data-task="causal_lm"
 hidden>(JSONL, txt, CSV or Parquet; prompts alone are completed by the teacher first: see
 <code>generate</code> below)</span> <input id="dataset" name="dataset" type="file" required></label>
<label>Student <span class="hint" data-task="classification">(mlp, logreg, cnn, resnet; text:
 text_transformer:layers=2;hidden=256;heads=4, teacher_layers:keep=0,2,4, textcnn, bow:embed=64)</span><span
 class="hint" data-task="causal_lm" hidden>(causal_lm:layers=4;hidden=256;heads=4, or
 teacher_layers:keep=0,8,16,24; empty: a causal LM half the teacher's size)</span>
 <input id="student" name="student" value="mlp:hidden=128" placeholder="mlp:hidden=128"></label>
<label>Method <select id="method" name="method"></select></label>
<label>Epochs <input id="epochs" name="epochs" type="number" min="1" value="10" required></label>
<fieldset id="text-data"><legend>Text data <span class="hint" data-task="classification">(for text
 datasets)</span></legend>
<label>Text column <input id="text-column" name="text_column" maxlength="200" placeholder="text"></label>
<label>Max length (tokens) <input id="max-length" name="max_length" type="number" min="1" max="8192"
 placeholder="128"></label>
<p class="hint">Left empty, a field is not sent: the job takes its value in Other settings, or the
 default shown.</p></fieldset>
<label>Other settings (JSON) <textarea id="config" name="config" rows="3">{}</textarea></label>
<p class="hint">Any other config field, e.g. <code>{"lr": 0.01}</code><span data-task="causal_lm" hidden>, or
 for a dataset of prompts <code>{"generate": {"max_new_tokens": 128}}</code></span>. The fields above win
 over the same keys here.</p>
<label>Webhook URL (optional) <input id="webhook" name="webhook_url" type="url"></label>
<button type="submit" id="start">Start job</button><p id="form-status" class="hint"></p>
<p id="form-error" class="error" role="alert"></p></form>"""
    return layout("New job", body, "new.js")


def job_page(job_id: str) -> str:
    steps = "".join(f'<li data-state="{s}"><span class="name">{s.replace("_", " ")}</span>'
                    f'<span class="when"></span></li>' for s in STATES)
    body = f"""<h1><span id="job-id">{escape(job_id)}</span> <span id="status" class="badge"></span></h1>
<p id="error" class="error" role="alert"></p>
<div class="progress"><div id="progress-bar"></div></div><p id="progress-text" class="hint"></p>
<p id="shards" class="hint" hidden></p>
<button id="cancel" hidden>Cancel job</button>
<section><h2>Stages</h2><ol id="timeline">{steps}</ol></section>
<section class="charts"><figure><figcaption>Training loss per epoch</figcaption>
<svg id="loss-chart" viewBox="0 0 480 260" role="img" aria-label="training loss"></svg></figure>
<figure><figcaption id="acc-caption">Validation accuracy per epoch (dashed: teacher)</figcaption>
<svg id="acc-chart" viewBox="0 0 480 260" role="img" aria-label="validation accuracy"></svg>
</figure></section>
<section><h2>Evaluation</h2><table id="report"><thead><tr><th></th><th id="quality-head">Accuracy</th>
<th>Agreement</th><th>Parameters</th><th>Size</th><th>Latency</th></tr></thead><tbody></tbody></table>
<p id="report-summary" class="hint">The report appears when the job has been evaluated.</p></section>
<section><h2>Downloads</h2><ul id="artifacts"></ul></section>
<section><h2>Events</h2><ol id="events" class="events"></ol></section>"""
    return layout(job_id, body, "job.js", data={"job-id": job_id})
