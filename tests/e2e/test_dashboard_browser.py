"""``jobflow dashboard`` as an operator uses it: started as a process on a real
port against PostgreSQL with a history of jobs, driven in a headless
Chromium. The screenshots are kept under test-artifacts/screenshots/."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from jobflow import JobFlow, UploadPolicy
from jobflow.errors import UploadRejected
from tests.browser import chromium, screenshot
from tests.e2e.conftest import PATIENCE, Deployment
from tests.e2e.servers import ServerProcess, running

pytestmark = [pytest.mark.postgres, pytest.mark.browser]

HOSTILE = '<script>document.title="owned"</script><img src=x onerror="alert(1)">'


@pytest.fixture
def dashboard(postgres_deployment: Deployment) -> Iterator[ServerProcess]:
    with running(postgres_deployment, "dashboard") as started:
        yield started


def queued(flow: JobFlow, owner: str = "web-app", **params: Any) -> str:
    ticket = flow.initiate_upload(owner, params, content_type="video/mp4")
    flow.objects.put(ticket.key, b"\x00\x00\x00\x18ftypmp42 video", content_type="video/mp4")
    flow.complete_upload(ticket.job_id)
    return ticket.job_id


def seed_history(deployment: Deployment) -> dict[str, Any]:
    """Jobs done, retried then failed, failed with hostile text, rejected,
    waiting and queued; each job run to its end before the next is queued."""
    flow = deployment.flow(UploadPolicy(max_attempts=2))
    done = []
    for preset in ("480p", "720p", "1080p"):
        done.append(queued(flow, preset=preset))
        [claim] = flow.claim("worker-a")
        claim = flow.heartbeat(claim, detail={"stage": "transcoding", "progress": 0.5})
        flow.succeed(claim, {"frames": 1200})
    retried = []
    for _ in range(2):
        retried.append(queued(flow, preset="4k"))
        for attempt in (1, 2):
            [claim] = flow.claim(f"worker-{attempt}")
            flow.fail(claim, f"ffmpeg exited with 1 on attempt {attempt}",
                      retry_in=timedelta(0))
    hostile = queued(flow, owner=HOSTILE, title=HOSTILE)
    [claim] = flow.claim("worker-a")
    flow.fail(claim, HOSTILE, retryable=False)
    empty = flow.initiate_upload("web-app", content_type="video/mp4")
    flow.objects.put(empty.key, b"", content_type="video/mp4")
    with pytest.raises(UploadRejected):
        flow.complete_upload(empty.job_id)
    for _ in range(2):
        flow.initiate_upload("web-app", content_type="video/mp4")
    queued(flow, preset="720p")
    return {"done": done, "retried": retried, "hostile": hostile}


def at(browser: WebDriver, path: str) -> bool:
    """Whether the browser shows ``path`` once the navigation a click or a form
    started has landed (a submitted search goes on after ``send_keys`` returns)."""
    try:
        WebDriverWait(browser, PATIENCE, poll_frequency=0.05).until(
            lambda driver: driver.current_url.endswith(path))
    except TimeoutException:
        return False
    return True


def test_an_operator_follows_a_failure_group_to_a_job_and_reads_its_timeline(
        postgres_deployment: Deployment, dashboard: ServerProcess) -> None:
    jobs = seed_history(postgres_deployment)
    with chromium() as browser:
        browser.get(dashboard.url + "/")
        counts = {state: browser.find_element(By.CSS_SELECTOR,
                                              f"#state-{state} .state-count").text
                  for state in ("awaiting_upload", "queued", "quick_running", "done", "failed")}
        assert counts == {"awaiting_upload": "2", "queued": "1", "quick_running": "0",
                          "done": "3", "failed": "4"}
        groups = {row.find_elements(By.TAG_NAME, "td")[0].text:
                  row.find_elements(By.TAG_NAME, "td")[1].text
                  for row in browser.find_elements(By.CSS_SELECTOR, "#failure-groups tr")[1:]}
        assert groups == {"handler_error": "3", "upload_rejected": "1"}
        assert len(browser.find_elements(By.CSS_SELECTOR, "#waiting-uploads tr")) == 3
        screenshot(browser, "dashboard-overview")

        browser.find_element(By.LINK_TEXT, "handler_error").click()
        assert at(browser, "/failures?code=handler_error"), browser.current_url
        listed = [link.get_attribute("title")
                  for link in browser.find_elements(By.CSS_SELECTOR, "#jobs a.id")]
        assert sorted(listed) == sorted([*jobs["retried"], jobs["hostile"]])
        screenshot(browser, "dashboard-failures")

        retried = jobs["retried"][0]
        browser.find_element(By.CSS_SELECTOR, f'#jobs a[title="{retried}"]').click()
        assert at(browser, f"/job/{retried}"), browser.current_url
        assert browser.find_element(By.ID, "job-status").text == "failed"
        steps = browser.find_elements(By.CSS_SELECTOR, "#timeline li")
        assert [step.find_element(By.CLASS_NAME, "event").text for step in steps] == [
            "created", "verify_upload", "claim", "retry", "claim", "fail"]
        assert "by worker-2" in steps[4].text and "attempt 2" in steps[4].text
        assert "ffmpeg exited with 1 on attempt 1" in steps[3].text
        assert '"preset": "4k"' in browser.find_element(By.ID, "job-params").text
        browser.set_window_size(1280, 1500)  # the whole timeline in the picture
        screenshot(browser, "dashboard-job")
        browser.set_window_size(1280, 900)

        search = browser.find_element(By.ID, "search")
        search.send_keys(jobs["done"][1][:8], Keys.ENTER)
        assert at(browser, f"/job/{jobs['done'][1]}"), browser.current_url
        assert browser.find_element(By.ID, "job-status").text == "done"
        assert "transcoding" in browser.find_element(By.ID, "timeline").text


def test_a_script_in_a_jobs_error_is_shown_as_text(postgres_deployment: Deployment,
                                                    dashboard: ServerProcess) -> None:
    jobs = seed_history(postgres_deployment)
    with chromium() as browser:
        browser.get(f"{dashboard.url}/job/{jobs['hostile']}")
        assert browser.find_element(By.ID, "job-error").text == HOSTILE
        assert json.dumps(HOSTILE) in browser.find_element(By.ID, "job-params").text
        assert "owned" not in browser.title
        assert browser.find_elements(By.TAG_NAME, "script") == []
        assert browser.find_elements(By.TAG_NAME, "img") == []
        screenshot(browser, "dashboard-escaped")
        browser.get(f"{dashboard.url}/failures?code=handler_error")
        assert browser.find_elements(By.TAG_NAME, "script") == []
        assert HOSTILE[:40] in browser.find_element(By.ID, "jobs").text
    assert dashboard.stop() == 0
