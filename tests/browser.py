"""A real headless Chromium for the console tests (Debian's ``chromium`` and ``chromium-driver``,
driven by Selenium; nothing is downloaded). Where none is installed the tests that need it are
skipped with a line that says how to get it; ``.ci/run`` installs it when missing."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
REPO = Path(__file__).resolve().parents[1]
# ONCOFED_DOCS_SCREENSHOTS=1 writes the screenshots into the docs (docs/images/console/); else a temporary folder
DOCS_SHOTS = REPO / "docs" / "images" / "console"


def missing() -> str | None:
    for path in (CHROMIUM, CHROMEDRIVER):
        if not Path(path).exists():
            return (f"no {path}: the browser tests need Debian's chromium and chromium-driver "
                    "(apt-get install chromium chromium-driver; .ci/run installs them)")
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    return None


def chromium() -> Iterator[Any]:
    """A headless Chromium session with its browser log, closed afterwards."""
    if (why := missing()) is not None:
        pytest.skip(why)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="oncofed-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,900",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-quic", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    os.environ.setdefault("SE_OFFLINE", "true")
    os.environ.setdefault("SE_AVOID_STATS", "true")
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def shots_dir(tmp: Path) -> Path:
    folder = DOCS_SHOTS if os.environ.get("ONCOFED_DOCS_SCREENSHOTS") else tmp
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def csp_violations(driver: Any) -> list[str]:
    """Content security policy violations in the browser's log since the last call."""
    return [e["message"] for e in driver.get_log("browser")
            if "Content Security Policy" in e["message"] or "Refused to" in e["message"]]


def element(driver: Any, element_id: str, timeout: float = 30) -> Any:
    """The element with ``element_id`` once the page that holds it has loaded (after a click)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(expected_conditions.presence_of_element_located((By.ID, element_id)))
