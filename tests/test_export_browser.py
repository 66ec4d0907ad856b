"""The Export tab in a real browser for a visitor who has run nothing: the start-up merge is
listed and downloadable, and "Push to the Hub" answers a missing token in words."""

from __future__ import annotations

import re

import pytest

pytest.importorskip("playwright")
from playwright.sync_api import expect  # noqa: E402


def test_a_fresh_visitor_exports_the_start_up_merge_and_is_told_what_publishing_needs(
        browser, app, screenshots):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    try:
        page.goto(app.url)
        page.get_by_role("tab", name="Export").click()
        expect(page.locator("#export-info")).to_contain_text("start-up merge with the default settings",
                                                             timeout=60_000)
        page.locator("#export-patch").click()
        expect(page.locator("#export-file")).to_contain_text(re.compile(r"patch\s*\.safetensors"),
                                                             timeout=60_000)
        page.locator("#export-hub").get_by_text("Push to the Hub").first.click()
        page.locator("#export-repo textarea, #export-repo input").first.fill("me/tailored-demo")
        page.locator("#export-push").click()
        expect(page.get_by_text("publishing needs a Hugging Face token with write access")).to_be_visible()
        page.screenshot(path=screenshots / "export-hub.png", full_page=True)
    finally:
        context.close()
