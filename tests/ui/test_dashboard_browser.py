"""The dashboard in headless Chromium against `distill serve`: log in with the API key, start a job from
the form, watch it reach `succeeded`, check the curves drew their points and the download link returns the
student, and save a screenshot (also to $DISTILL_SCREENSHOT_DIR when set)."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.api import FAST_CONFIG
from tests.support.data import gaussian_problem
from tests.support.services import Served, served

pytestmark = pytest.mark.e2e
CHROMIUM, CHROMEDRIVER = shutil.which("chromium") or "/usr/bin/chromium", shutil.which("chromedriver")
webdriver = pytest.importorskip("selenium.webdriver")
if not (Path(CHROMIUM).exists() and CHROMEDRIVER):
    pytest.skip("Debian's chromium and chromium-driver are not installed", allow_module_level=True)

from selenium.webdriver.chrome.service import Service as DriverService  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

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
    browser.get(f"{service.url}/ui/")
    wait.until(lambda d: "/ui/login" in d.current_url)
    browser.find_element(By.ID, "api-key").send_keys(service.api_key)
    browser.find_element(By.CSS_SELECTOR, "#login-form button").click()
    wait.until(lambda d: d.current_url.rstrip("/").endswith("/ui"))

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
    logs = browser.get_log("browser")
    assert not [e for e in logs if e["level"] == "SEVERE" and e["source"] != "network"], logs
