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


# The page sends no tools of its own: a test hook around fetch records each body and adds tools, as a client
# page that offers functions would, so that the answer streams tool calls for the page to show.
RECORD_FETCH = """
window.sentBodies = [];
const realFetch = window.fetch;
window.fetch = (url, init) => {
  if (init && init.body) {
    const body = JSON.parse(init.body);
    window.sentBodies.push(JSON.parse(init.body));
    delete body.response_format;  // the scripted engine answers the same either way
    if (window.addTools) Object.assign(body, window.addTools);
    init = Object.assign({}, init, {body: JSON.stringify(body)});
  }
  return realFetch(url, init);
};
"""


def _scripted(engine, texts: list[str]):
    """engine.submit answers the next of `texts` (a few characters a token) and records nothing else."""
    import asyncio

    from nbkit.engine.request import Finished, FinishReason, RequestHandle, TokenEvent

    def submit(prompt_ids, params):
        text = texts.pop(0)
        handle = RequestHandle(len(texts) + 50_000, asyncio.get_running_loop())
        pieces = [text[i:i + 4] for i in range(0, len(text), 4)]
        for i, piece in enumerate(pieces):
            handle.push(TokenEvent(5, piece, i))
        handle.push(Finished(text, [5] * len(pieces), FinishReason.EOS_TOKEN, len(prompt_ids), len(pieces),
                             len(pieces), 0.01, 0.02))
        return handle

    engine.submit = submit


def test_json_toggle_and_tool_calls_shown_readably(browser):
    from selenium.webdriver.common.by import By

    engine = tiny_engine()
    _scripted(engine, ['{"answer": 42}', '{"name": "get_weather", "arguments": {"city": "Paris"}}', "Sunny."])
    with start_server(engine, port=0) as handle:
        browser.get(handle.url + "/")
        el = lambda css: browser.find_element(By.CSS_SELECTOR, css)
        _until(lambda: el("#status").text == "ready")
        browser.execute_script(RECORD_FETCH)
        reply = lambda: browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1]

        el("#json").click()
        el("#prompt").send_keys("An object please")
        el("#send").click()
        _until(lambda: reply().get_attribute("data-state") == "done")
        assert browser.execute_script("return window.sentBodies[0].response_format") == {"type": "json_object"}

        el("#json").click()  # off again: the request asks for text
        tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
        browser.execute_script("window.addTools = arguments[0]", {"tools": [tool], "tool_choice": "required"})
        el("#prompt").send_keys("Weather in Paris?")
        el("#send").click()
        _until(lambda: reply().get_attribute("data-state") == "done")
        second = browser.execute_script("return window.sentBodies[1]")
        assert "response_format" not in second and second["messages"][-2] == {"role": "assistant",
                                                                             "content": '{"answer": 42}'}
        assert reply().find_element(By.CSS_SELECTOR, ".calls").text == '→ get_weather({\n  "city": "Paris"\n})'
        assert reply().find_element(By.CSS_SELECTOR, ".text").text == ""

        el("#prompt").send_keys("Thanks")  # the call goes back in the history, as OpenAI's clients send it
        el("#send").click()
        _until(lambda: reply().get_attribute("data-state") == "done")
        (call,) = browser.execute_script("return window.sentBodies[2]")["messages"][-2]["tool_calls"]
        assert call["id"].startswith("call_") and call["function"] == {"name": "get_weather",
                                                                        "arguments": '{"city": "Paris"}'}
