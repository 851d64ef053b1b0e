"""Headless Chromium for the page tests (test_browser.py, test_browser_page.py): one driver set-up and
one connect step, so both files drive the same browser the same way. A test module imports the
``chromium_browser`` fixture (registered as ``browser``) to use it.

Importing this module skips the importing test module when selenium or the chromium/chromedriver
binaries are missing (the browser tests are optional extras, marked ``browser``). The selenium names
the tests need are re-exported from here so that they are imported only after that check.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from typing import Any

import pytest

from tests.ws.conftest import ALICE

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
if CHROMIUM is None or CHROMEDRIVER is None:
    pytest.skip("no chromium/chromedriver binary (apt-get install chromium chromium-driver)", allow_module_level=True)

from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

__all__ = ["ActionChains", "By", "Select", "WebDriverWait", "chromium_browser", "connect_page", "status"]


@pytest.fixture(name="browser")
def chromium_browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # No background traffic (no network at test time) and a fresh profile per test.
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-extensions", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--window-size=1200,900",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(20)
    try:
        yield driver
    finally:
        driver.quit()


def connect_page(browser: Any, url: str, ready_select_id: str) -> WebDriverWait:
    """Open the page, connect with ALICE's token, and wait until the generate button is enabled and the
    <select> ``ready_select_id`` has been filled from the server's options (the page is then usable)."""
    wait = WebDriverWait(browser, 20)
    browser.get(url)
    browser.find_element(By.ID, "token").send_keys(ALICE)
    browser.find_element(By.ID, "connect").click()
    wait.until(lambda d: d.find_element(By.ID, "generate").is_enabled())
    wait.until(lambda d: len(Select(d.find_element(By.ID, ready_select_id)).options) > 0)
    return wait


def status(browser: Any) -> str:
    return browser.find_element(By.ID, "status").text
