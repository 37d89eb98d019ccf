"""What every console page must do in the browser: fit its width without sideways scroll."""

from __future__ import annotations

from pathlib import Path

from playwright.async_api import Page

__all__ = ["WIDTHS", "assert_fits"]

WIDTHS = (1280, 390)  # a desktop window, a phone
_WIDE = (
    "[...document.querySelectorAll('body *')].filter(e => !e.parentElement.closest('.scroll')"
    " && e.getBoundingClientRect().right > document.documentElement.clientWidth)"
    ".slice(0, 12).map(e => e.tagName + '#' + e.id"
    " + '.' + e.className + ' ' + Math.round(e.getBoundingClientRect().right))"
)


async def assert_fits(page: Page, width: int, shots: Path, name: str) -> None:
    """At ``width`` px the page does not scroll sideways (wide tables scroll in their box);
    a full-page screenshot goes to ``shots/name-width.png``."""
    await page.set_viewport_size({"width": width, "height": 900})
    overflow = await page.evaluate(
        "document.documentElement.scrollWidth - document.documentElement.clientWidth"
    )
    assert overflow <= 0, f"{name} scrolls sideways at {width} px: {await page.evaluate(_WIDE)}"
    await page.screenshot(path=str(shots / f"{name}-{width}.png"), full_page=True)
