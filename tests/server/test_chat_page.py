"""The chat page in headless Chromium: it asks for the API key, streams a reply, and Stop frees the slot.

Needs Debian's chromium and chromium-driver: `scripts/install_chromium.sh` (run by `make test`; run
here too when they are missing and we may install packages).
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest
from helpers.server import TINY_MODEL, reference_text, tiny_engine

from nbkit.server.launch import start_server

KEY = "page-key-5f1c2b-0a9e"
INSTALL = Path(__file__).resolve().parents[2] / "scripts" / "install_chromium.sh"


def _browser_paths() -> tuple[str, str]:
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        done = subprocess.run(["bash", str(INSTALL)], check=False, capture_output=True, text=True,
                              timeout=900)
        if done.returncode != 0:
            pytest.skip(f"chromium is not installed and {INSTALL.name} failed: {done.stderr[-500:]}")
    return shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, chromedriver = _browser_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1000,800"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)
    yield driver
    driver.quit()


def _until(condition, timeout: float = 20.0, every: float = 0.03):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError("timed out waiting for the page")


def test_chat_page_asks_for_key_and_streams_a_reply(browser):
    from selenium.webdriver.common.by import By

    engine = tiny_engine()
    engine.runner.fault = lambda slot: time.sleep(0.03)  # slow enough to watch the reply grow
    with start_server(engine, port=0, api_key=KEY) as handle:
        browser.get(handle.url + "/")
        el = lambda css: browser.find_element(By.CSS_SELECTOR, css)
        # Without the key the page's API call is refused, so it asks for one.
        _until(lambda: el("#keybox").is_displayed())
        el("#key").send_keys(KEY)
        el("#key-save").click()
        _until(lambda: el("#status").text == "ready")
        assert el("#model").text == TINY_MODEL and not el("#keybox").is_displayed()

        max_tokens = el("#max-tokens")
        max_tokens.clear()
        max_tokens.send_keys("40")
        el("#prompt").send_keys("Hello page")
        el("#send").click()
        reply = lambda: browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1]
        seen = set()

        def finished():
            r = reply()
            seen.add(r.find_element(By.CSS_SELECTOR, ".text").text)
            return r.get_attribute("data-state") == "done"

        _until(finished)
        ids = engine.tokenizer.apply_chat_template([{"role": "user", "content": "Hello page"}],
                                                   add_generation_prompt=True, tokenize=True, return_dict=False)
        expected = reference_text(ids, 40)
        final = reply().find_element(By.CSS_SELECTOR, ".text").text
        assert final == expected.strip()  # the DOM's .text trims surrounding spaces
        partial = [t for t in seen if t and t != final]
        assert partial and all(final.startswith(t) for t in partial), "the reply did not stream"
        assert el(".msg.user .text").text == "Hello page"
        stats = reply().find_element(By.CSS_SELECTOR, ".stats").text  # as the notebook panel shows them
        assert "tokens" in stats and "tok/s" in stats and "tokens/step" in stats, stats

        # Stop mid-reply: the browser aborts the fetch, the server cancels the request and frees the slot.
        cancelled = engine.snapshot()["cancelled"]
        max_tokens.clear()
        max_tokens.send_keys("800")
        el("#prompt").send_keys("Go on")
        el("#send").click()
        _until(lambda: reply().find_element(By.CSS_SELECTOR, ".text").text and engine.snapshot()["running"] == 1)
        el("#stop").click()
        _until(lambda: reply().get_attribute("data-state") == "stopped")
        _until(lambda: engine.snapshot()["cancelled"] == cancelled + 1 and engine.snapshot()["running"] == 0,
               timeout=5)
