"""The playground page in a real headless Chromium (Debian's), driven by Playwright: with API
keys on, it asks for a key, runs a comparison with live progress and shows the images and
numbers side by side. Saves a screenshot (to $T2I_SCREENSHOT when set)."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
from playwright.sync_api import expect, sync_playwright

from tests.service.conftest import WorkerProcess, make_settings, serving

CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
]


@pytest.fixture(scope="module")
def served(redis_url, registry_file):
    settings = make_settings(redis_url, registry_file, api_keys=["page-key"])
    workers = [WorkerProcess(settings, "dit-digits", v) for v in ("fp32", "w8a8")]
    with serving(settings, workers) as server:
        yield server


def test_playground_compares_variants_end_to_end(served, tmp_path):
    if not Path(CHROMIUM).exists() and shutil.which("chromium") is None:
        pytest.fail("chromium is missing (Debian package chromium; make setup installs it)")
    screenshot = Path(os.environ.get("T2I_SCREENSHOT", tmp_path / "playground.png"))
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        page = browser.new_page(viewport={"width": 1100, "height": 760})
        requests = []
        page.on("request", lambda r: requests.append(r.url))
        page.goto(served.url + "/")
        expect(page.locator("#error")).to_contain_text("401")  # keys are on
        page.fill("#api-key", "page-key")
        page.locator("#api-key").blur()  # a change event: the page lists the models again
        expect(page.locator("#model option")).to_have_count(2)
        page.select_option("#model", "dit-digits")
        page.uncheck('#variants input[value="spare"]')  # nobody serves it in the tests
        page.fill("#prompt", "seven")
        page.fill("#seed", "3")
        page.fill("#steps", "30")
        page.click("#run")
        expect(page.locator("#results progress")).to_have_count(2)
        expect(page.locator("#results")).to_have_attribute(
            "data-status", "completed", timeout=60_000
        )
        cards = page.locator("#results .card")
        expect(cards).to_have_count(2)
        for i in range(2):
            src = cards.nth(i).locator("img").get_attribute("src")
            assert src.startswith("data:image/png;base64,")
            assert cards.nth(i).locator("progress").get_attribute("value") == "100"
        quantized = page.locator('.card[data-variant="w8a8"]')
        psnr = quantized.locator('dd[data-metric="psnr_db"]').inner_text()
        assert re.fullmatch(r"\d+\.\d\d dB", psnr), psnr
        for metric in ("latency_s", "peak_memory_bytes", "denoiser_weight_bytes", "sqnr_latent_db"):
            expect(quantized.locator(f'dd[data-metric="{metric}"]')).to_have_count(1)
        expect(page.locator('.card[data-variant="fp32"] dd[data-metric="psnr_db"]')).to_have_count(
            0
        )
        expect(page.locator("#error")).to_be_hidden()
        page.screenshot(path=str(screenshot), full_page=True)
        browser.close()
    assert all(url.startswith(served.url) for url in requests), "every asset is served locally"
    assert screenshot.stat().st_size > 10_000
