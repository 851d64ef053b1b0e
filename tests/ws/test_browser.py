"""The page at ``/`` in headless Chromium (Debian's ``chromium`` + ``chromium-driver``, via selenium),
driving a real uvicorn: token, prompt, progress bar, live preview, final images with seeds, cancel,
seed validation, warnings, the expansion style only when installed, and the page's CSP.

Runs on the FakeRunner always, and on the demo model once ``engine.sdxl.pipeline`` exists. The demo-model
checks share one test (one runtime, one browser) because a demo job at the smallest SDXL size costs
~20 s on a CPU.
"""

from __future__ import annotations

import urllib.request
from pathlib import Path
from typing import Any

import pytest

from engine.core.constants import MAX_SEED
from engine.core.testing import FakeRunner
from tests.ws.browser import By, Select, WebDriverWait, chromium_browser, connect_page, status  # noqa: F401 (fixture)
from tests.ws.conftest import ALICE, make_runtime

pytestmark = pytest.mark.browser


def preview_cleared(browser: Any) -> bool:
    """No live preview on show: hidden, and no src (an <img> without one draws a broken-image icon)."""
    preview = browser.find_element(By.ID, "preview")
    return not preview.is_displayed() and not preview.get_attribute("src")


def preview_showing(browser: Any) -> bool:
    preview = browser.find_element(By.ID, "preview")
    return preview.is_displayed() and (preview.get_attribute("src") or "").startswith("blob:")


def test_page_generates_with_progress_preview_and_seeds(browser, tmp_path, live_factory):
    live = live_factory(make_runtime(tmp_path, FakeRunner(step_delay_s=0.03)))
    wait = connect_page(browser, live.http_url + "/", "performance")
    assert "alice" in browser.find_element(By.ID, "who").text
    browser.find_element(By.ID, "prompt").send_keys("a red fox in snow")
    browser.find_element(By.ID, "seed").send_keys("9007199254740993")  # 2^53 + 1: must stay exact
    browser.find_element(By.ID, "count").clear()
    browser.find_element(By.ID, "count").send_keys("2")
    browser.find_element(By.ID, "generate").click()
    wait.until(preview_showing)
    wait.until(lambda d: status(d).startswith("done"))
    assert preview_cleared(browser)  # the live preview belongs to the running job
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
    wait = connect_page(browser, live.http_url + "/", "performance")
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
        import engine.sdxl.pipeline  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _demo_available(), reason="engine.sdxl.pipeline (the demo model) is not available yet")
def test_page_on_the_demo_model(browser, tmp_path, live_factory):
    from engine.core.runtime import create_runtime
    from engine.core.settings import Settings

    # The server's default styles ask for the expansion, which the demo data dir does not have: every
    # job then gets the engine's own 'assets_missing' warning event, which the page must show.
    settings = Settings(data_dir=Path(tmp_path), shutdown_grace_s=1.0, default_styles=("Fooocus V2",))
    runtime = create_runtime(settings, model="demo")
    live = live_factory(runtime)
    engine = live.runtime.engine
    wait = WebDriverWait(browser, 20)
    browser.get(live.http_url + "/")

    # A stale error: a wrong token first, then the right one twice (the second connect replaces a
    # live socket whose late close must not report "disconnected" over the new connection).
    browser.find_element(By.ID, "token").send_keys("wrong-token-wrong-token")
    browser.find_element(By.ID, "connect").click()
    wait.until(lambda d: "disconnected" in status(d) or "HTTP 401" in status(d))
    for _ in range(2):
        browser.find_element(By.ID, "token").clear()
        browser.find_element(By.ID, "token").send_keys(ALICE)
        browser.find_element(By.ID, "connect").click()
        wait.until(lambda d: "alice" in d.find_element(By.ID, "who").text and status(d) == "")
    wait.until(lambda d: len(Select(d.find_element(By.ID, "performance")).options) > 0)
    assert browser.find_element(By.ID, "status").get_attribute("class") != "error"
    assert browser.find_element(By.ID, "generate").is_enabled()

    # Before any job: no broken-image icon.
    assert preview_cleared(browser)

    # 'Fooocus V2' is a legal style name, but this server cannot run it: the page leaves it out.
    options = runtime.engine.runner.options()
    assert "Fooocus V2" in options["styles"] and options["expansion_available"] is False
    offered = [o.text for o in Select(browser.find_element(By.ID, "styles")).options]
    assert offered and "Fooocus V2" not in offered

    # Seeds that are not a whole number in [0, MAX_SEED]: an inline error, and nothing is sent.
    seed_field = browser.find_element(By.ID, "seed")
    for bad in ("abc", "-1", "1.5", "1e3", " 7 7", str(MAX_SEED + 1)):
        seed_field.clear()
        seed_field.send_keys(bad)
        browser.find_element(By.ID, "generate").click()
        error = browser.find_element(By.ID, "seed-error")
        assert error.is_displayed() and str(MAX_SEED) in error.text, bad
        assert seed_field.get_attribute("aria-invalid") == "true"
    seed_field.clear()
    seed_field.send_keys("7")
    assert not browser.find_element(By.ID, "seed-error").is_displayed()  # typing clears the error

    Select(browser.find_element(By.ID, "performance")).select_by_visible_text("Lightning")
    Select(browser.find_element(By.ID, "aspect")).select_by_index(0)
    browser.find_element(By.ID, "prompt").send_keys("a lighthouse")
    browser.find_element(By.ID, "generate").click()
    long_wait = WebDriverWait(browser, 300)
    long_wait.until(lambda d: preview_showing(d) or status(d).startswith(("done", "failed")))
    assert preview_showing(browser), status(browser)
    long_wait.until(lambda d: status(d).startswith(("done", "failed")))
    assert status(browser).startswith("done"), status(browser)
    # Messages on one socket arrive in order, so had any refused seed been sent, its job would be here.
    assert [job.request.seed for job in engine.jobs()] == [7]
    assert browser.find_element(By.CSS_SELECTOR, "#results figure").get_attribute("data-seed") == "7"
    assert browser.find_element(By.ID, "seeds").text == "seed 7"
    assert preview_cleared(browser)
    warnings = browser.find_elements(By.CSS_SELECTOR, "#warnings li")
    texts = [w.text for w in warnings if w.is_displayed()]
    assert len(texts) == len(warnings) and any(t.startswith("assets_missing:") and "Fooocus V2" in t for t in texts), texts

    # A cancelled job with a random seed: its resolved seed stays on the page.
    seed_field.clear()
    Select(browser.find_element(By.ID, "performance")).select_by_visible_text("Quality")
    browser.find_element(By.ID, "generate").click()
    # 'started' carries the resolved seeds; cancelling right then keeps this part short.
    long_wait.until(lambda d: d.find_element(By.ID, "seeds").text.startswith("seed "))
    browser.find_element(By.ID, "cancel").click()
    long_wait.until(lambda d: status(d).startswith(("cancelled", "done", "failed")))
    assert status(browser).startswith("cancelled"), status(browser)
    job = engine.jobs()[-1]
    assert job.state.value == "cancelled" and job.request.seed is None and len(job.seeds) == 1
    assert browser.find_element(By.ID, "seeds").text == f"seed {job.seeds[0]}"
    assert status(browser).endswith(f"seed {job.seeds[0]}")
    assert preview_cleared(browser)
    assert not browser.find_elements(By.CSS_SELECTOR, "#results figure")  # the last job's images are gone


def test_page_csp_lets_the_page_connect_only_to_its_own_origin(browser, tmp_path, live_factory):
    live = live_factory(make_runtime(tmp_path))
    with urllib.request.urlopen(live.http_url + "/", timeout=10) as response:
        csp = response.headers["Content-Security-Policy"]
    directives = {part.split()[0]: part.split()[1:] for part in csp.split(";") if part.strip()}
    assert directives["connect-src"] == ["'self'"]  # not 'ws:'/'wss:', which allow any host
    connect_page(browser, live.http_url + "/", "performance")  # the page's own ws://127.0.0.1:port is same-origin
    # The same server under another name is another origin: the browser must refuse to open it,
    # while the same socket under the page's own origin opens (the control).
    outcomes = {url: browser.execute_async_script(_OPEN_WS_SCRIPT, url, ALICE)
                for url in (f"ws://localhost:{live.port}/v1/ws", f"ws://127.0.0.1:{live.port}/v1/ws")}
    assert outcomes == {f"ws://localhost:{live.port}/v1/ws": "blocked by connect-src",
                        f"ws://127.0.0.1:{live.port}/v1/ws": "open"}


# Opens a websocket from the page and reports the first of: open, a CSP violation, an error.
_OPEN_WS_SCRIPT = """
    const url = arguments[0], token = arguments[1], done = arguments[arguments.length - 1];
    document.addEventListener("securitypolicyviolation",
        (ev) => { if (ev.blockedURI.startsWith(url.split("/v1")[0])) done("blocked by " + ev.effectiveDirective); });
    const ws = new WebSocket(url, ["hooocus.v1", "hooocus.token." + token]);
    ws.onopen = () => { done("open"); ws.close(); };
    ws.onerror = () => setTimeout(() => done("error"), 200);  // let a violation event report first
"""
