"""The playground page in a real headless Chromium (Debian's), driven by Playwright: with API
keys on, it asks for a key, runs a comparison with live progress and shows the images and
numbers side by side. Saves a screenshot (to $T2I_SCREENSHOT when set)."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import expect, sync_playwright

from tests.service.conftest import WorkerProcess, make_settings, serving

CHROMIUM = "/usr/bin/chromium"
MODELS = ("dit-digits", "t2i-digits")
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
]


@pytest.fixture(scope="module")
def served(redis_url, registry_file):
    settings = make_settings(redis_url, registry_file, api_keys=["page-key"])
    workers = [WorkerProcess(settings, m, v) for m in MODELS for v in ("fp32", "w8a8")]
    with serving(settings, workers) as server:
        yield server


def _chromium_or_fail() -> None:
    if not Path(CHROMIUM).exists() and shutil.which("chromium") is None:
        pytest.fail("chromium is missing (Debian package chromium; make setup installs it)")


def test_playground_compares_variants_end_to_end(served, tmp_path):
    _chromium_or_fail()
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
        page.fill("#previews", "0")
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


def _png_file(path: Path) -> Path:
    pixels = np.zeros((32, 32, 3), np.uint8)
    pixels[6:26, 13:19] = (230, 40, 40)  # a red bar: something like a one
    Image.fromarray(pixels).save(path)
    return path


def test_playground_edits_with_every_control_and_shows_previews_and_parameters(served, tmp_path):
    """An image to edit, strength, negative prompt, scheduler and previews, on both variants
    of t2i-digits; each card shows previews while its job runs, then the image and the
    parameters it carries."""
    _chromium_or_fail()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        previews = []
        page.on("request", lambda r: "/previews/" in r.url and previews.append(r.url))
        page.goto(served.url + "/")
        page.fill("#api-key", "page-key")
        page.locator("#api-key").blur()
        expect(page.locator("#model option")).to_have_count(2)
        page.select_option("#model", "dit-digits")
        expect(page.locator("#negative-label")).to_be_hidden()  # DiT takes no negative prompt
        expect(page.locator("#scheduler option")).to_have_count(3)  # its own, dpm++-2m, ddim
        page.select_option("#model", "t2i-digits")
        expect(page.locator("#negative-label")).to_be_visible()
        page.uncheck('#variants input[value="strict"]')
        page.fill("#prompt", "a green one on a black background")
        page.fill("#negative-prompt", "blue")
        page.select_option("#scheduler", "ddim")
        page.fill("#previews", "2")
        page.fill("#steps", "20")
        page.set_input_files("#image", str(_png_file(tmp_path / "one.png")))
        page.fill("#strength", "0.6")
        page.click("#run")
        expect(page.locator("#results")).to_have_attribute(
            "data-status", "completed", timeout=60_000
        )
        cards = page.locator("#results .card")
        expect(cards).to_have_count(2)
        for variant in ("fp32", "w8a8"):
            card = page.locator(f'.card[data-variant="{variant}"]')
            expect(card.locator("img")).to_have_attribute("src", re.compile("^data:image/png"))
            shown = {
                key: card.locator(f'dd[data-parameter="{key}"]').text_content()
                for key in ("scheduler", "strength", "negative_prompt", "variant", "seed")
            }
            assert shown["scheduler"] == "ddim" and shown["strength"] == "0.6", shown
            assert shown["negative_prompt"] == "blue" and shown["variant"] == variant, shown
        expect(page.locator("#error")).to_be_hidden()
        browser.close()
    # two previews per variant were fetched while the jobs ran (12 of 20 steps: at 4 and 8)
    assert len(previews) == 4 and {u.rsplit("/", 1)[1] for u in previews} == {"0", "1"}
