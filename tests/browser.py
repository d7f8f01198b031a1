"""Headless Chromium for the browser tests, driven by selenium.

Uses Debian's ``chromium`` and ``chromium-driver`` (``scripts/ensure-test-tools``
installs them); selenium is never allowed to download a browser of its own.
Screenshots are kept under ``test-artifacts/screenshots/`` (or
``$JOBFLOW_TEST_ARTIFACTS/screenshots``) so that a failed or passed run can be
looked at afterwards.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = Path(os.environ.get("JOBFLOW_TEST_ARTIFACTS", ROOT / "test-artifacts"))

#: Flags for a browser on a machine without a screen, sandbox or open network.
CHROMIUM_FLAGS = (
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
    "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--window-size=1280,900",
)


def _program(*names: str) -> str:
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    pytest.fail(f"{' or '.join(names)} is not installed: run scripts/ensure-test-tools")


@contextmanager
def chromium() -> Iterator[webdriver.Chrome]:
    """A fresh headless Chromium with an empty profile, quit afterwards."""
    options = webdriver.ChromeOptions()
    options.binary_location = _program("chromium", "chromium-browser")
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    with tempfile.TemporaryDirectory(prefix="jobflow-chromium-") as profile:
        options.add_argument(f"--user-data-dir={profile}")
        service = Service(executable_path=_program("chromedriver"))
        driver = webdriver.Chrome(options=options, service=service)
        try:
            driver.set_page_load_timeout(30)
            yield driver
        finally:
            driver.quit()


def screenshot(driver: webdriver.Chrome, name: str) -> Path:
    """Saves the page as ``<artifacts>/screenshots/<name>.png`` and returns the path."""
    folder = ARTIFACTS / "screenshots"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    assert driver.save_screenshot(str(path)), f"could not save the screenshot {path}"
    return path
