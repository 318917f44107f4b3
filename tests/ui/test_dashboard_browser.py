"""The dashboard in headless Chromium against `distill serve`: log in with the API key, start a job from
the form, watch it reach `succeeded`, check the curves drew their points and the download link returns the
student, and save a screenshot (also to $DISTILL_SCREENSHOT_DIR when set). Then, against the API alone with
jobs walked through their states by hand: each curve named in words beside a stroke sample, and each job's
result in the list. Last, the form's task switch and what it posts for each task."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from app.jobs import lifecycle
from app.jobs.config_schema import LM_METHODS, METHODS
from tests.support.api import FAST_CONFIG, bearer
from tests.support.data import gaussian_problem
from tests.support.processes import free_port, wait_until
from tests.support.services import Local, Served, local_app, served

pytestmark = pytest.mark.e2e
CHROMIUM, CHROMEDRIVER = shutil.which("chromium") or "/usr/bin/chromium", shutil.which("chromedriver")
webdriver = pytest.importorskip("selenium.webdriver")
if not (Path(CHROMIUM).exists() and CHROMEDRIVER):
    pytest.skip("Debian's chromium and chromium-driver are not installed", allow_module_level=True)

from selenium.common.exceptions import StaleElementReferenceException, TimeoutException  # noqa: E402
from selenium.webdriver.chrome.service import Service as DriverService  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

STATES = ["queued", "soft_labeling", "distilling", "evaluating", "exporting", "succeeded"]


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with served(tmp_path_factory.mktemp("serve")) as s:
        yield s


@pytest.fixture
def browser() -> Iterator[Any]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-dev-shm-usage", "--window-size=1280,1700"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=DriverService(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def log_in(driver: Any, url: str, key: str) -> None:
    """Open the dashboard at `url`, which sends us to the login form; enter `key`; land on the job list."""
    wait = WebDriverWait(driver, 30)
    driver.get(f"{url}/ui/")
    wait.until(lambda d: "/ui/login" in d.current_url)
    driver.find_element(By.ID, "api-key").send_keys(key)
    driver.find_element(By.CSS_SELECTOR, "#login-form button").click()
    wait.until(lambda d: d.current_url.rstrip("/").endswith("/ui"))


def legend(driver: Any, chart: str) -> list[tuple[str, str]]:
    """(name, stroke-dasharray of its sample) of each legend entry of the chart with id `chart`."""
    entries = driver.find_elements(By.CSS_SELECTOR, f"#{chart} g.legend-entry")
    return [
        (e.find_element(By.CSS_SELECTOR, "text").text, e.find_element(By.CSS_SELECTOR, "line.sample")
         .get_attribute("stroke-dasharray"))
        for e in entries
    ]  # fmt: skip


def fetch_in_page(driver: Any, url: str) -> list[Any]:
    """What clicking the link fetches, with the browser's own cookies: [status, bytes, sha256 hex]."""
    return driver.execute_async_script("""
        const done = arguments[arguments.length - 1];
        fetch(arguments[0], {credentials: "same-origin"}).then(async (r) => {
          const buf = await r.arrayBuffer();
          const hash = await crypto.subtle.digest("SHA-256", buf);
          const hex = [...new Uint8Array(hash)].map(b => b.toString(16).padStart(2, "0")).join("");
          done([r.status, buf.byteLength, hex]);
        }).catch((e) => done([0, 0, String(e)]));""", url)


def test_start_a_job_from_the_form_and_watch_it_succeed(service: Served, browser: Any,
                                                       tmp_path: Path) -> None:
    problem = gaussian_problem(tmp_path / "problem")
    wait = WebDriverWait(browser, 30)
    log_in(browser, service.url, service.api_key)

    browser.find_element(By.LINK_TEXT, "New job").click()
    wait.until(lambda d: d.current_url.endswith("/ui/new"))
    browser.find_element(By.ID, "teacher").send_keys(str(problem.teacher))
    browser.find_element(By.ID, "dataset").send_keys(str(problem.dataset))
    for field, value in (("student", "mlp:hidden=16"), ("epochs", str(FAST_CONFIG["epochs"])),
                         ("config", json.dumps({k: v for k, v in FAST_CONFIG.items() if k != "epochs"}))):
        browser.find_element(By.ID, field).clear()
        browser.find_element(By.ID, field).send_keys(value)
    browser.find_element(By.ID, "start").click()
    wait.until(lambda d: "/ui/jobs/job_" in d.current_url)
    job_id = browser.current_url.rsplit("/", 1)[1]

    WebDriverWait(browser, 240, poll_frequency=1).until(
        lambda d: d.find_element(By.ID, "status").text in ("succeeded", "failed", "cancelled"))
    status = browser.find_element(By.ID, "status").text
    assert status == "succeeded", browser.find_element(By.ID, "error").text
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#report tbody tr[data-model=student]"))

    stages = browser.find_elements(By.CSS_SELECTOR, "#timeline li.done")
    done = [li.get_attribute("data-state") for li in stages]
    assert done == STATES
    loss_points = browser.find_elements(By.CSS_SELECTOR, "#loss-chart circle.point")
    acc_points = browser.find_elements(By.CSS_SELECTOR, "#acc-chart circle.point")
    assert len(loss_points) >= FAST_CONFIG["epochs"] and len(acc_points) >= FAST_CONFIG["epochs"]
    assert browser.find_elements(By.CSS_SELECTOR, "#acc-chart line.ref"), "no teacher reference line"
    assert [name for name, _ in legend(browser, "acc-chart")] == ["student (KD)", "teacher"]

    expected = {a["name"]: a for a in httpx.get(f"{service.url}/v1/jobs/{job_id}/artifacts", headers={
        "Authorization": f"Bearer {service.api_key}"}).json()["data"]}["student.pt"]
    link = browser.find_element(By.CSS_SELECTOR, "#artifacts a[download='student.pt']")
    assert fetch_in_page(browser, link.get_attribute("href")) == [200, expected["size"], expected["sha256"]]

    shot = tmp_path / "dashboard-job.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    if os.environ.get("DISTILL_SCREENSHOT_DIR"):
        Path(os.environ["DISTILL_SCREENSHOT_DIR"]).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(os.environ["DISTILL_SCREENSHOT_DIR"]) / shot.name)

    browser.get(f"{service.url}/ui/")
    row = f"#jobs tr[data-job-id='{job_id}'] .badge.succeeded"
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, row))
    # The worker's real headline reaches the list: this job trained no baseline, so no KD gain either.
    result = browser.find_element(By.CSS_SELECTOR, f"#jobs tr[data-job-id='{job_id}'] td.result").text
    assert re.fullmatch(r"student \d+\.\d% vs teacher \d+\.\d%", result), result
    logs = browser.get_log("browser")
    assert not [e for e in logs if e["level"] == "SEVERE" and e["source"] != "network"], logs


@contextlib.contextmanager
def serving_in_thread(local: Local) -> Iterator[str]:
    """`local`'s app (its lifespan already entered by its TestClient) behind uvicorn on a free port, so a
    browser can reach it; its URL."""
    port = free_port()
    config = uvicorn.Config(local.app, host="127.0.0.1", port=port, lifespan="off", log_level="warning")
    config.timeout_graceful_shutdown = 1  # the browser's keep-alive connections need not hold the test up
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started, 20, "uvicorn to start")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(20)


def finish(
    local: Local, job_id: str, epochs: dict[str, list[dict[str, float]]], headline: dict[str, Any]
) -> None:
    """Walk the job through its stages as the worker does: each phase's epochs (the distilled student's, then
    the baseline's, each from epoch 1), then success with `headline` as the job's metrics."""
    previous = "queued"
    for state in ("soft_labeling", "distilling", "evaluating", "exporting"):
        local.step(lifecycle.claim_stage, job_id, previous, state, "test-worker")
        if state == "distilling":
            for phase, records in epochs.items():
                for epoch, metrics in enumerate(records, 1):
                    local.step(lifecycle.record_progress, job_id, 0.5, epoch, {"phase": phase, **metrics})
        previous = state
    local.step(lifecycle.finish_job, job_id, headline)


# Page boxes of the accuracy chart's legend entries, and the top edge of its highest point.
LEGEND_BOXES = """
    const svg = document.getElementById("acc-chart");
    const box = (n) => { const r = n.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; };
    const tops = [...svg.querySelectorAll("circle.point")].map((c) => box(c)[1]);
    return {entries: [...svg.querySelectorAll("g.legend-entry")].map(box), top: Math.min(...tops)};"""


def check_curves(driver: Any, url: str, job_id: str, names: list[str]) -> None:
    """The job page's accuracy (or perplexity) chart: its legend names the two runs and the teacher, in that
    order, each beside a stroke no other line has, drawn as its line is; the loss chart names the runs."""
    driver.get(f"{url}/ui/jobs/{job_id}")
    WebDriverWait(driver, 30).until(
        lambda d: len(d.find_elements(By.CSS_SELECTOR, "#acc-chart circle.point")) == 4
    )
    entries = legend(driver, "acc-chart")
    assert [name for name, _ in entries] == names
    assert len({dash for _, dash in entries}) == 3, entries  # solid, dotted, dashed
    lines = driver.find_elements(By.CSS_SELECTOR, "#acc-chart polyline.line")
    assert [(n.get_attribute("data-name"), n.get_attribute("stroke-dasharray")) for n in lines] == entries[:2]
    ref = driver.find_element(By.CSS_SELECTOR, "#acc-chart line.ref")
    assert ref.get_attribute("data-name") == "teacher" and entries[2][1] == "6 4"
    assert [name for name, _ in legend(driver, "loss-chart")] == names[:2]
    # The legend sits above the plot: no entry overlaps another, or the highest point.
    boxes = driver.execute_script(LEGEND_BOXES)
    for i, a in enumerate(boxes["entries"]):
        assert a[3] <= boxes["top"], boxes
        for b in boxes["entries"][i + 1 :]:
            assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], boxes


def test_curves_name_every_line_in_words_and_the_list_shows_each_jobs_result(
    browser: Any, tmp_path: Path
) -> None:
    with local_app(tmp_path) as local:
        key = local.key("acme")
        classifier = local.submit(key)["id"]
        finish(local, classifier, {
            "distill": [{"loss": 1.2, "val_acc": 0.80}, {"loss": 0.7, "val_acc": 0.912}],
            "baseline": [{"loss": 0.9, "val_acc": 0.78}, {"loss": 0.5, "val_acc": 0.904}],
        }, {
            "student_accuracy": 0.912, "teacher_accuracy": 0.93, "baseline_accuracy": 0.904,
            "kd_gain_points": 0.7801, "agreement": 0.95, "method": "hinton",
        })  # fmt: skip
        lm = local.submit(key, task="causal_lm")["id"]
        finish(local, lm, {
            "distill": [{"loss": 3.4, "val_perplexity": 31.0}, {"loss": 3.1, "val_perplexity": 24.131}],
            "baseline": [{"loss": 3.5, "val_perplexity": 33.0}, {"loss": 3.3, "val_perplexity": 26.006}],
        }, {
            "teacher_perplexity": 18.3, "student_perplexity": 24.131, "baseline_perplexity": 26.006,
            "agreement": 0.41, "kl": 0.8, "method": "fkl",
        })  # fmt: skip
        waiting = local.submit(key)["id"]

        with serving_in_thread(local) as url:
            log_in(browser, url, key)
            WebDriverWait(browser, 30).until(
                lambda d: len(d.find_elements(By.CSS_SELECTOR, "#jobs td.result")) == 3
            )
            assert "Result" in [th.text for th in browser.find_elements(By.CSS_SELECTOR, "#jobs thead th")]
            cell = "#jobs tr[data-job-id='{}'] td.result"
            results = {job: browser.find_element(By.CSS_SELECTOR, cell.format(job)).text for job in (
                classifier, lm, waiting)}  # fmt: skip
            assert results == {
                classifier: "student 91.2% vs teacher 93.0% · KD +0.8 pts vs baseline",
                lm: "perplexity: student 24.13 vs teacher 18.30 · CE-only baseline 26.01",
                waiting: "–",
            }
            check_curves(browser, url, classifier, ["student (KD)", "baseline (hard labels)", "teacher"])
            check_curves(browser, url, lm, ["student (KD)", "baseline (CE only)", "teacher"])
            logs = browser.get_log("browser")
            assert not [e for e in logs if e["level"] == "SEVERE" and e["source"] != "network"], logs


def submit_form(driver: Any, teacher: Path, dataset: Path, fields: dict[str, str]) -> str:
    """Fill the new-job form (which is open) with the two files and `fields` (id: text typed over the
    field's value), press Start; the id of the job the form opens."""
    driver.find_element(By.ID, "teacher").send_keys(str(teacher))
    driver.find_element(By.ID, "dataset").send_keys(str(dataset))
    for name, value in fields.items():
        driver.find_element(By.ID, name).clear()
        driver.find_element(By.ID, name).send_keys(value)
    driver.find_element(By.ID, "start").click()
    # The page navigates away on success: an element read mid-navigation is stale, so try again.
    WebDriverWait(driver, 30, ignored_exceptions=(StaleElementReferenceException,)).until(
        lambda d: "/ui/jobs/job_" in d.current_url or d.find_element(By.ID, "form-error").text
    )
    assert "/ui/jobs/job_" in driver.current_url, driver.find_element(By.ID, "form-error").text
    return str(driver.current_url.rsplit("/", 1)[1])


def test_the_form_follows_the_task_and_posts_its_text_settings(browser: Any, tmp_path: Path) -> None:
    # The worker checks the files' contents, not the API: junk bytes under the right names make a job.
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    teacher, lm_data, text_data = (inputs / f for f in ("teacher.gguf", "lm.jsonl", "reviews.csv"))
    teacher.write_bytes(b"GGUF junk")
    lm_data.write_text('{"text": "hello"}\n')
    text_data.write_text("review,label\ngood,1\n")
    with local_app(tmp_path) as local:
        key = local.key("acme")
        with serving_in_thread(local) as url:
            log_in(browser, url, key)
            browser.get(f"{url}/ui/new")
            wait = WebDriverWait(browser, 30)
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#method option"))
            task, method = Select(browser.find_element(By.ID, "task")), browser.find_element(By.ID, "method")

            def form() -> dict[str, Any]:
                """The methods offered, the student and epochs fields, and the text group's heading."""
                return {
                    "methods": [o.get_attribute("value") for o in method.find_elements(By.CSS_SELECTOR, "*")],
                    "student": browser.find_element(By.ID, "student").get_attribute("value"),
                    "placeholder": browser.find_element(By.ID, "student").get_attribute("placeholder"),
                    "epochs": browser.find_element(By.ID, "epochs").get_attribute("value"),
                    "text data": browser.find_element(By.CSS_SELECTOR, "#text-data legend").text,
                }

            def settled(expected: dict[str, Any]) -> dict[str, Any]:
                """The form once it shows `expected` (or after 10 s): changing the task re-renders the method
                options, and an option read mid-render is stale. The form as last read, for the assert."""
                seen: dict[str, Any] = {}

                def shows(_: Any) -> bool:
                    nonlocal seen
                    try:
                        seen = form()
                    except StaleElementReferenceException:
                        return False
                    return seen == expected

                with contextlib.suppress(TimeoutException):
                    WebDriverWait(browser, 10).until(shows)
                return seen

            classification = {"methods": ["auto", "hinton", "soft_target", "mse_logits", "dkd", "dist"],
                              "student": "mlp:hidden=128", "placeholder": "mlp:hidden=128", "epochs": "10",
                              "text data": "Text data (for text datasets)"}  # fmt: skip
            assert settled(classification) == classification
            assert set(classification["methods"]) == {"auto", *METHODS}
            task.select_by_value("causal_lm")
            language_model = {"methods": ["auto", "fkl", "rkl", "gkd"], "student": "causal_lm",
                              "placeholder": "causal_lm", "epochs": "4", "text data": "Text data"}
            assert settled(language_model) == language_model  # "ce" is the baseline's loss, not a KD method
            assert set(language_model["methods"]) == {"auto", *LM_METHODS} - {"ce"}
            teacher_input = browser.find_element(By.ID, "teacher")
            assert "GGUF" in teacher_input.find_element(By.XPATH, "..").text
            assert teacher_input.get_attribute("multiple") is None  # one teacher: no ensembles of LMs
            Select(method).select_by_value("gkd")
            task.select_by_value("classification")  # gkd is no classification method: back to auto
            assert settled(classification) == classification and method.get_attribute("value") == "auto"
            # A student typed in stays when the task changes; epochs left at the default follow it.
            browser.find_element(By.ID, "student").clear()
            browser.find_element(By.ID, "student").send_keys("textcnn")
            task.select_by_value("causal_lm")
            assert form()["student"] == "textcnn" and form()["epochs"] == "4"

            Select(method).select_by_value("gkd")
            lm_job = submit_form(browser, teacher, lm_data, {
                "student": "causal_lm:layers=2;hidden=64;heads=2", "text-column": "body", "max-length": "256",
                "config": json.dumps({"max_length": 64, "generate": {"max_new_tokens": 16}}),
            })  # fmt: skip
            # Classification, the text fields left empty: they are not sent, so Other settings' value holds.
            browser.get(f"{url}/ui/new")
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#method option"))
            text_job = submit_form(browser, teacher, text_data, {
                "student": "bow:embed=8", "config": json.dumps({"text_column": "review"})})
            logs = browser.get_log("browser")
            assert not [e for e in logs if e["level"] == "SEVERE" and e["source"] != "network"], logs

        lm, text = (local.http.get(f"/v1/jobs/{j}", headers=bearer(key)).json() for j in (lm_job, text_job))
    shown = ("student", "method", "epochs", "text_column", "max_length")
    assert lm["task"] == "causal_lm" and {k: lm["config"][k] for k in shown} == {
        "student": "causal_lm:layers=2;hidden=64;heads=2", "method": "gkd", "epochs": 4,
        "text_column": "body", "max_length": 256,  # the form's field beat the JSON's 64
    }  # fmt: skip
    assert lm["config"]["generate"]["max_new_tokens"] == 16 and lm["metadata"] == {"source": "dashboard"}
    assert text["task"] == "classification" and {k: text["config"][k] for k in shown} == {
        "student": "bow:embed=8", "method": "auto", "epochs": 10, "text_column": "review", "max_length": 128,
    }  # fmt: skip


def test_a_split_soft_label_stage_shows_its_shards_and_who_holds_them(browser: Any, tmp_path: Path) -> None:
    with local_app(tmp_path) as local:
        key = local.key("acme")
        job = local.submit(key)["id"]
        local.step(lifecycle.claim_stage, job, "queued", "soft_labeling", "worker-a")
        ranges = [("train", 0, 100), ("train", 100, 200), ("val", 0, 50)]
        assert local.step(lifecycle.plan_shards, job, "worker-a", ranges)
        local.step(lifecycle.claim_shard, job, 0, "worker-a")
        local.step(lifecycle.finish_shard, job, 0, "worker-a")
        local.step(lifecycle.claim_shard, job, 1, "worker-b")
        with serving_in_thread(local) as url:
            log_in(browser, url, key)
            browser.get(f"{url}/ui/jobs/{job}")
            line = WebDriverWait(browser, 30).until(
                lambda d: d.find_element(By.ID, "shards").text or None
            )
            assert line == "shards: 1 of 3 done, 1 running, 1 waiting (#1 on worker-b)"
