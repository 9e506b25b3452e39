"""The operator page (``/dashboard``) in a real headless browser against a real worker.

The browser is Debian's Chromium (``/usr/bin/chromium``, packages ``chromium`` and
``chromium-driver``), driven by Playwright; no browser is ever downloaded (no ``playwright
install``). Without it, the browser test is skipped."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from enricher.sandbox import SandboxServer
from enricher.services import find_free_port
from enricher.web import dashboard_html

from .harness import Stack

CHROMIUM = Path("/usr/bin/chromium")
HAVE_CHROMIUM = CHROMIUM.exists()
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def page_view(i: int) -> dict[str, Any]:
    return {"type": "page_view", "user": f"u{i % 7}", "seq": i, "client": {"ip": f"10.8.0.{i}"}}


async def http_get(url: str) -> tuple[int, str, str]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, response.headers.get("Content-Type", ""), await response.text()


def test_page_is_self_contained() -> None:
    html = dashboard_html().decode()
    assert "<script" in html and "dashboard.json" in html
    for external in ("http://", "https://", "//cdn", "<link", " src="):
        assert external not in html, external


@pytest.mark.integration
async def test_dashboard_in_a_browser_shows_what_happened(
    stack: Stack, sandbox: SandboxServer, tmp_path: Path
) -> None:
    if not HAVE_CHROMIUM:
        pytest.skip(
            f"{CHROMIUM} is missing: install Debian's chromium and chromium-driver to run the "
            "dashboard browser test"
        )
    playwright_api = pytest.importorskip(
        "playwright.async_api", reason="playwright (the dev extra) is not installed"
    )

    port = find_free_port()
    config = stack.write_config(stack.config(quotas=["100000/day"]))
    stack.start_worker(config, ["--web-port", str(port)])
    n = 30
    events: list[tuple[str | None, Any]] = [(f"u{i % 7}", page_view(i)) for i in range(n)]
    events += [("bad", b"{not json"), ("bad", b"[1, 2]"), ("u2", {"type": "page_view"})]
    await stack.produce(events)
    got = await stack.collect(expected=len(events))
    assert len(got.outputs) == n and len(got.dead_letters) == 3
    calls = sandbox.stats()["calls"]
    assert calls == n

    base = f"http://127.0.0.1:{port}"
    status, content_type, body = await http_get(f"{base}/dashboard")
    assert status == 200 and content_type.startswith("text/html") and "<script" in body
    status, content_type, body = await http_get(f"{base}/dashboard.json")
    assert status == 200 and content_type.startswith("application/json")
    assert json.loads(body)["app_id"] == stack.app_id

    async with playwright_api.async_playwright() as pw:
        context = await pw.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),  # a fresh, empty profile
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_FLAGS,
        )
        try:
            page = context.pages[0] if context.pages else await context.new_page()
            requested: list[str] = []
            page.on("request", lambda request: requested.append(request.url))
            await page.goto(f"{base}/dashboard")
            await page.wait_for_selector('body[data-loaded="1"]', timeout=30_000)

            async def text(selector: str) -> str:
                return (await page.locator(selector).first.text_content() or "").strip()

            events_sel = '[data-section="events"]'
            geo = 'section[data-api="geo"]'
            day = '[data-api="geo"][data-period="day"]'

            async def figures() -> dict[str, str]:
                return {
                    "outputs": await text(f'{events_sel} [data-field="outputs"]'),
                    "dead_letters": await text(f'{events_sel} [data-field="dead_letters"]'),
                    "invalid": await text('[data-dead-kind="invalid_event"] [data-field="count"]'),
                    "calls": await text(f'{geo} [data-field="calls_total"]'),
                    "attempts": await text(f'{geo} [data-field="attempts_total"]'),
                    "retries": await text(f'{geo} [data-field="retries"]'),
                    "429s": await text(f'{geo} [data-field="status_429"]'),
                    "rate_limit": await text(f'{geo} [data-field="rate_limit"]'),
                    "used": await text(f'{day} [data-field="used"]'),
                    "limit": await text(f'{day} [data-field="limit"]'),
                    "remaining": await text(f'{day} [data-field="remaining"]'),
                    "resets_at": await text(f'{day} [data-field="resets_at"]'),
                    "lag": await text("#lag-total"),
                    "alive": await text("#workers-alive"),
                }

            expected = {
                "outputs": str(n),
                "dead_letters": "3",
                "invalid": "3",
                "calls": str(calls),
                "attempts": str(calls),
                "retries": "0",
                "429s": "0",
                "used": str(n),
                "limit": "100000",
                "remaining": str(100000 - n),
                "lag": "0",
                "alive": "1",
            }
            # Heartbeats come every 2 s and the page redraws every second: wait for it to settle.
            deadline = time.monotonic() + 30
            shown = await figures()
            while any(shown.get(k) != v for k, v in expected.items()):
                assert time.monotonic() < deadline, f"the page never showed {expected}: {shown}"
                await asyncio.sleep(0.5)
                shown = await figures()
            assert shown["rate_limit"] not in ("", "-") and shown["resets_at"] not in ("", "-")

            # the page's partition rows: every input partition owned and caught up
            rows = page.locator(f'#partitions tr[data-topic="{stack.topics["input"]}"]')
            assert await rows.count() == 4
            for i in range(4):
                assert await rows.nth(i).locator('[data-field="lag"]').text_content() == "0"
            assert await text("#replays tr td") == "none"
            assert await text("#status") == "live"

            # it keeps refreshing in place (no reload), and asked nothing of another host
            before = int(await page.get_attribute("body", "data-refreshes") or 0)
            await page.wait_for_function(
                f"Number(document.body.dataset.refreshes) >= {before + 2}", timeout=10_000
            )
            assert requested and all(url.startswith(base) for url in requested), requested
            assert sum(url.endswith("/dashboard.json") for url in requested) >= 3
        finally:
            await context.close()
