"""The chat page at `/` in a real browser: the distribution's Chromium (Debian's `chromium`
package) driven by Playwright from PyPI, against the real server — nothing downloaded at run
time (`playwright install` is never used). Skipped, saying why, where no Chromium is installed
(`.ci/run` installs it).

The page picks a model from `/v1/models` (here one that loads on demand), streams an answer,
is stopped mid-answer (the server frees the slot), renders markdown with `<script>` as text,
keeps the conversation across a reload, and asks for the API key on a 401. Screenshots are
kept under the test's tmp path (answer.png, phone.png).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from test_metrics import samples
from test_server_e2e import API_KEY, running_server

CHROMIUM = next((p for p in (os.environ.get("LLORCH_CHROMIUM"), shutil.which("chromium"),
                             "/usr/bin/chromium", shutil.which("chromium-browser")) if p and Path(p).is_file()),
                None)
pytestmark = pytest.mark.slow
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SMOLLM = "smollm2-135m-instruct"
expect = None  # playwright.sync_api.expect, once the browser fixture imported it


@pytest.fixture(scope="module")
def browser() -> Iterator:
    """Chromium. Pages keep the server's Content-Security-Policy, which also forbids the
    string evaluation behind `page.evaluate` / `wait_for_function`: tests that need those open
    their page with `bypass_csp` (`open_page`), so the renderer is shown safe without it."""
    if CHROMIUM is None:
        pytest.skip("no Chromium found (apt-get install chromium, or set LLORCH_CHROMIUM): the "
                    "chat page is tested in a real browser")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the test extra)")
    global expect
    expect = sync_api.expect
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def server(tiny_model_dir, default_model_dir, tmp_path_factory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("webui-server") / "server.log"
    with running_server(f"{tiny_model_dir}=tiny", str(default_model_dir), "--max-batch", "2",
                        "--threads", "2", log_path=log) as base:
        yield base


def open_page(browser, **kw):
    return browser.new_context(bypass_csp=True, **kw).new_page()


def shot(page, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=False)
    assert path.stat().st_size > 10_000
    return path


def test_chat_streams_stops_and_frees_the_slot(browser, server, tmp_path):
    errors: list[str] = []
    page = browser.new_page(viewport={"width": 1000, "height": 760})
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.goto(server + "/")
    csp = httpx.get(server + "/").headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp

    picker = page.get_by_label("Model", exact=True)
    expect(picker.locator("option")).to_have_count(2)
    assert picker.locator("option").all_inner_texts() == ["tiny", f"{SMOLLM} (unloaded)"]
    picker.select_option(SMOLLM)  # not loaded yet: the first message loads it

    page.locator("summary", has_text="Settings").click()
    page.get_by_label("System prompt").fill("You are a helpful assistant.")
    page.get_by_label("Temperature").fill("0")
    page.get_by_label("Max tokens").fill("48")
    page.get_by_label("Message", exact=True).fill("What is the capital of France?")
    page.get_by_label("Message", exact=True).press("Enter")  # Enter sends

    answer = page.locator("article.msg.assistant").last
    send, stop = page.get_by_role("button", name="Send"), page.get_by_role("button", name="Stop")
    expect(stop).to_be_enabled()
    expect(send).to_be_enabled(timeout=180_000)
    text = answer.locator(".body").inner_text()
    assert "Paris" in text
    stats = answer.locator(".stats").inner_text()
    assert "TTFT" in stats and "tokens/s" in stats and SMOLLM in stats, stats
    shot(page, tmp_path, "answer.png")
    series = samples(httpx.get(server + "/metrics").text)
    assert series[("llorch_generation_tokens_total", (("model", SMOLLM),))] > 0

    # A long answer, stopped mid-stream: partial text stays, the server frees the slot.
    page.get_by_label("Max tokens").fill("1500")
    page.get_by_label("Message", exact=True).fill("Write a long story about a dragon who learns to bake bread.")
    send.click()
    answer = page.locator("article.msg.assistant").last
    expect(answer.locator(".body")).to_have_text(re.compile(r"\S.{40}", re.S), timeout=120_000)
    first = answer.locator(".body").inner_text()
    # streamed: the text grows while we watch
    expect(answer.locator(".body")).to_have_text(re.compile(re.escape(first.rstrip()) + r"\s*\S", re.S))
    assert stop.is_enabled()
    stop.click()
    expect(stop).to_be_disabled()
    assert "stopped" in answer.locator(".stats").inner_text()
    stopped_text = answer.locator(".body").inner_text()
    assert len(stopped_text) >= len(first)
    deadline = time.monotonic() + 10
    while httpx.get(server + "/health").json()["slots_in_use"] != 0:
        assert time.monotonic() < deadline, "the stopped request still holds its slot"
        time.sleep(0.05)
    cancelled = samples(httpx.get(server + "/metrics").text)[
        ("llorch_engine_requests_total", (("model", SMOLLM), ("outcome", "cancelled")))]
    assert cancelled == 1
    time.sleep(0.5)
    assert answer.locator(".body").inner_text() == stopped_text  # nothing more arrives

    # The conversation survives a reload (localStorage), settings too.
    page.reload()
    expect(page.locator("article.msg")).to_have_count(4)
    assert "Paris" in page.locator("article.msg.assistant").first.inner_text()
    assert page.get_by_label("Max tokens").input_value() == "1500"
    assert page.get_by_label("Model", exact=True).input_value() == SMOLLM
    assert not errors, errors
    page.close()


SCRIPTED = ("Here is **bold**, `code` and <script>window.__pwned = 1</script> plus "
            "<img src=x onerror=\"window.__pwned = 2\">.\n\n```html\n<script>alert(1)</script>\n```\n"
            "- [a link](https://example.com)\n- [bad](javascript:alert(1))")


def test_model_markdown_renders_as_text_never_html(browser, server, tmp_path):
    """The answer's text comes from the page's real SSE parser; the stream is scripted (a
    random or small model will not write HTML on request) in the server's exact chunk format."""
    page = open_page(browser, viewport={"width": 390, "height": 844})  # a phone
    chunks = [{"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "tiny",
               "choices": [{"index": 0, "delta": {"role": "assistant", "content": piece},
                            "finish_reason": None}]}
              for piece in (SCRIPTED[:40], SCRIPTED[40:90], SCRIPTED[90:])]
    body = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
    page.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=200, body=body, headers={"content-type": "text/event-stream"}))
    page.goto(server + "/")
    page.evaluate("localStorage.clear()")
    page.reload()
    expect(page.locator("#model option")).to_have_count(2)
    page.get_by_label("Message", exact=True).fill("Show me some HTML.")
    page.get_by_role("button", name="Send").click()
    expect(page.get_by_role("button", name="Stop")).to_be_disabled()
    answer = page.locator("article.msg.assistant").last
    assert page.evaluate("window.__pwned") is None
    assert answer.locator("script, img").count() == 0
    text = answer.locator(".body").inner_text()
    assert "<script>window.__pwned = 1</script>" in text and "<img src=x" in text
    assert answer.locator("strong").inner_text() == "bold"
    assert answer.locator("pre code").inner_text() == "<script>alert(1)</script>"
    assert answer.locator("a").count() == 1  # only the http(s) link is a link
    assert answer.locator("a").get_attribute("href") == "https://example.com"
    assert "[bad](javascript:alert(1))" in text
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390, f"the page is wider than a phone: {width}px"
    page.get_by_role("button", name="Copy code").focus()  # reachable by keyboard
    shot(page, tmp_path, "phone.png")
    page.close()


def test_asks_for_the_api_key_on_401(browser, tiny_model_dir, tmp_path):
    with running_server(tiny_model_dir, "--api-key", API_KEY, "--threads", "1",
                        log_path=tmp_path / "server.log") as base:
        page = open_page(browser)
        page.goto(base + "/")  # the page itself needs no key
        dialog = page.get_by_role("dialog", name="API key needed")
        dialog.wait_for()
        dialog.get_by_label("API key").fill(API_KEY)
        dialog.get_by_role("button", name="Use key").click()
        expect(page.locator("#model option")).to_have_count(1)
        assert page.evaluate("sessionStorage.getItem('llorch.apiKey')") == API_KEY
        assert page.evaluate("localStorage.getItem('llorch.chat.v1') || ''").find(API_KEY) == -1
        page.get_by_label("Message", exact=True).fill("hi")
        page.get_by_role("button", name="Send").click()
        # the default max tokens is the server's (the rest of the context: tiny has 512)
        expect(page.locator("article.msg.assistant .stats")).to_contain_text("tokens/s", timeout=60_000)
        assert page.locator("article.msg.error").count() == 0
        page.close()


def test_no_webui(tiny_model_dir, tmp_path):
    with running_server(tiny_model_dir, "--no-webui", "--threads", "1",
                        log_path=tmp_path / "server.log") as base:
        assert httpx.get(base + "/").status_code == 404
        assert httpx.get(base + "/webui/app.js").status_code == 404
