"""The page at ``/`` in headless Chromium (Debian's ``chromium`` + ``chromium-driver``, via selenium),
driving a real uvicorn: token, prompt, progress bar, live preview, final images with seeds, cancel.

Runs on the FakeRunner always, and on the demo model once ``engine.pipeline`` exists.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from engine.testing import FakeRunner
from tests.ws.conftest import ALICE, make_runtime

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
if CHROMIUM is None or CHROMEDRIVER is None:
    pytest.skip("no chromium/chromedriver binary (apt-get install chromium chromium-driver)", allow_module_level=True)

from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402


@pytest.fixture
def browser() -> Any:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--no-first-run", "--disable-extensions", "--window-size=1200,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(20)
    try:
        yield driver
    finally:
        driver.quit()


def connect_page(browser: Any, url: str) -> WebDriverWait:
    wait = WebDriverWait(browser, 20)
    browser.get(url)
    browser.find_element(By.ID, "token").send_keys(ALICE)
    browser.find_element(By.ID, "connect").click()
    wait.until(lambda d: d.find_element(By.ID, "generate").is_enabled())
    wait.until(lambda d: len(Select(d.find_element(By.ID, "performance")).options) > 0)
    return wait


def status(browser: Any) -> str:
    return browser.find_element(By.ID, "status").text


def test_page_generates_with_progress_preview_and_seeds(browser, tmp_path, live_factory):
    live = live_factory(make_runtime(tmp_path, FakeRunner(step_delay_s=0.03)))
    wait = connect_page(browser, live.http_url + "/")
    assert "alice" in browser.find_element(By.ID, "who").text
    browser.find_element(By.ID, "prompt").send_keys("a red fox in snow")
    browser.find_element(By.ID, "seed").send_keys("9007199254740993")  # 2^53 + 1: must stay exact
    browser.find_element(By.ID, "count").clear()
    browser.find_element(By.ID, "count").send_keys("2")
    browser.find_element(By.ID, "generate").click()
    wait.until(lambda d: (d.find_element(By.ID, "preview").get_attribute("src") or "").startswith("blob:"))
    wait.until(lambda d: status(d).startswith("done"))
    figures = browser.find_elements(By.CSS_SELECTOR, "#results figure")
    assert [f.get_attribute("data-seed") for f in figures] == ["9007199254740993", "9007199254740994"]
    assert "seed 9007199254740993" in figures[0].text
    assert float(browser.find_element(By.ID, "progress").get_attribute("value")) == 1.0
    images = browser.find_elements(By.CSS_SELECTOR, "#results img")
    assert images and all(img.get_attribute("naturalWidth") != "0" for img in images)  # the PNGs decoded
    job = live.runtime.engine.jobs()[-1]
    assert job.request.prompt == "a red fox in snow" and job.request.image_number == 2


def test_page_cancel_button(browser, tmp_path, live_factory):
    live = live_factory(make_runtime(tmp_path, FakeRunner(step_delay_s=0.05)))
    wait = connect_page(browser, live.http_url + "/")
    Select(browser.find_element(By.ID, "performance")).select_by_visible_text("Quality")  # 60 fake steps
    browser.find_element(By.ID, "generate").click()
    wait.until(lambda d: "step" in status(d))
    browser.find_element(By.ID, "cancel").click()
    wait.until(lambda d: status(d).startswith("cancelled"))
    assert live.runtime.engine.jobs()[-1].state.value == "cancelled"


def test_page_with_a_wrong_token_says_so(browser, tmp_path, live_factory):
    live = live_factory(make_runtime(tmp_path))
    browser.get(live.http_url + "/")
    browser.find_element(By.ID, "token").send_keys("wrong-token-wrong-token")
    browser.find_element(By.ID, "connect").click()
    WebDriverWait(browser, 20).until(lambda d: "disconnected" in status(d) or "HTTP 401" in status(d))
    assert not browser.find_element(By.ID, "generate").is_enabled()


def _demo_available() -> bool:
    try:
        import engine.pipeline  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _demo_available(), reason="engine.pipeline (the demo model) is not available yet")
def test_page_on_the_demo_model(browser, tmp_path, live_factory):
    from engine.runtime import create_runtime
    from engine.settings import Settings

    runtime = create_runtime(Settings(data_dir=Path(tmp_path), shutdown_grace_s=1.0), model="demo")
    live = live_factory(runtime)
    wait = connect_page(browser, live.http_url + "/")
    Select(browser.find_element(By.ID, "performance")).select_by_visible_text("Lightning")
    Select(browser.find_element(By.ID, "aspect")).select_by_index(0)
    browser.find_element(By.ID, "prompt").send_keys("a lighthouse")
    browser.find_element(By.ID, "seed").send_keys("7")
    browser.find_element(By.ID, "generate").click()
    WebDriverWait(browser, 300).until(lambda d: status(d).startswith(("done", "failed")))
    assert status(browser).startswith("done"), status(browser)
    assert browser.find_element(By.CSS_SELECTOR, "#results figure").get_attribute("data-seed") == "7"
    assert wait is not None
