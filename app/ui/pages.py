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
    body = """<h1>New job</h1>
<form id="job-form" class="card">
<label>Teacher model (TorchScript, ONNX, safetensors; several files make an ensemble)
 <input id="teacher" name="teacher" type="file" multiple required></label>
<label>Training data (npz, csv, parquet, image archive, idx) <input id="dataset" name="dataset" type="file"
 required></label>
<label>Student <input id="student" name="student" value="mlp:hidden=128" required></label>
<label>Method <select id="method" name="method"><option value="auto">auto (Hinton KD or DIST, chosen on
 validation)</option><option>hinton</option><option>soft_target</option>
 <option>mse_logits</option><option>dkd</option><option>dist</option></select></label>
<label>Epochs <input id="epochs" name="epochs" type="number" min="1" value="10" required></label>
<label>Other settings (JSON) <textarea id="config" name="config" rows="3">{}</textarea></label>
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
