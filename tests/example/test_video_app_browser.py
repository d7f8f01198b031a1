"""A real browser does the upload: headless Chromium opens the example's page,
which creates a session, initiates the upload, PUTs the file to the presigned
URL on moto's S3 server (a cross-origin request the bucket's CORS rules must
allow), completes it and polls the job that a ``jobflow worker`` subprocess
runs. Screenshots of what the user saw are kept under test-artifacts/."""

from __future__ import annotations

from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from tests.browser import chromium, screenshot
from tests.example.conftest import CLIP, LONG_CLIP, PATIENCE, VideoApp

pytestmark = [pytest.mark.browser, pytest.mark.postgres]


def upload_in_the_page(driver: webdriver.Chrome, app: VideoApp, video: Path) -> str:
    """Choose ``video`` in the page's file input, press the button, and return
    the status the page settles on."""
    driver.get(f"{app.base_url}/?token=coach-1-token")
    driver.find_element(By.ID, "file").send_keys(str(video))
    driver.find_element(By.ID, "upload").click()

    def settled(driver: webdriver.Chrome) -> str | None:
        text = str(driver.find_element(By.ID, "status").text)
        return text if text.startswith(("done", "failed", "rejected", "error")) else None

    status: str = WebDriverWait(driver, PATIENCE, poll_frequency=0.1).until(settled)
    return status


def test_a_browser_uploads_a_video_and_sees_it_done_or_rejected(video_app: VideoApp,
                                                                tmp_path: Path) -> None:
    clip, long_clip = tmp_path / "session.mp4", tmp_path / "long-session.mp4"
    clip.write_bytes(CLIP)
    long_clip.write_bytes(LONG_CLIP)
    video_app.start_worker()

    with chromium() as driver:
        done = upload_in_the_page(driver, video_app, clip)
        screenshot(driver, "video-app-done")
        assert done == "done", driver.find_element(By.ID, "details").text
        assert '"frames_sampled": 35' in driver.find_element(By.ID, "details").text

        rejected = upload_in_the_page(driver, video_app, long_clip)
        screenshot(driver, "video-app-rejected")
        assert rejected.startswith("rejected: ") and "above the limit" in rejected, rejected

    counts = {status.value: n for status, n in video_app.flow().counts().items() if n}
    assert counts == {"done": 1, "failed": 1}
