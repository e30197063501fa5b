"""A page as a person would open it: headless Chromium (Debian's ``chromium`` package, driven by Playwright with
that system browser, so nothing is downloaded) loads a file and reports each image's rendered width, the console
errors, and every URL the page asked for."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="headless Chromium is not installed (Debian: apt-get install chromium; `make test` tries)")


def open_page(path: str | Path) -> dict:
    """Load ``path`` in headless Chromium: ``images`` as (alt, naturalWidth) pairs, ``errors`` (console errors and
    uncaught exceptions) and ``requests`` (every URL fetched, the page's own included)."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (pip install -e .[dev])")
    errors: list[str] = []
    requests: list[str] = []
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.on("request", lambda request: requests.append(request.url))
            page.goto(Path(path).resolve().as_uri(), wait_until="load")
            images = page.evaluate("Array.from(document.images, image => [image.alt, image.naturalWidth])")
        finally:
            browser.close()
    return {"images": [tuple(image) for image in images], "errors": errors, "requests": requests}
