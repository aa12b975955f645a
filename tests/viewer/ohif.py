"""Driving OHIF Viewer 3.13.2 the way a radiologist does, through Playwright.

The selectors are OHIF's own `data-cy` attributes of that pinned version; a new OHIF version
may rename them (scripts/fetch_ohif.sh pins it). Everything waits on what the page shows,
never on fixed sleeps alone, so that a slow machine is slower, not flaky.
"""

from __future__ import annotations

import io
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from playwright.sync_api import Locator, Page

VIEWPORT = '[data-cy="viewport-pane"]'
# OHIF's own error screen when a display set crashes a route ("Something went wrong")
ERROR_TEXTS = ("Something went wrong", "Error Boundary")


@dataclass
class PageLog:
    """What the page said while a test drove it: uncaught errors and error-level console."""

    page_errors: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)

    def attach(self, page: Page) -> PageLog:
        page.on("pageerror", lambda exc: self.page_errors.append(str(exc)))
        page.on("console", self._console)
        return self

    def _console(self, message) -> None:
        text = message.text
        if message.type == "error" or any(t in text for t in ERROR_TEXTS):
            self.console_errors.append(f"{message.type}: {text[:500]}")

    def crashes(self) -> list[str]:
        """Page errors and OHIF error boundaries: what leaves the radiologist a broken app."""
        boundary = [m for m in self.console_errors if any(t in m for t in ERROR_TEXTS)]
        return self.page_errors + boundary


def open_study(page: Page, base_url: str, study_uid: str) -> None:
    """The viewer route for one study (not the study list: patient IDs with URL-escaped
    characters are the study list's problem, issue 11 item 7, not the results')."""
    page.goto(f"{base_url}/viewer?StudyInstanceUIDs={study_uid}")
    page.wait_for_selector(f"{VIEWPORT} canvas", timeout=90_000)
    wait_until_rendered(page)


def viewport_pixels(page: Page) -> np.ndarray:
    """The first viewport as an RGB array, as the radiologist sees it."""
    png = page.locator(VIEWPORT).first.screenshot()
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def wait_until_rendered(page: Page, timeout_s: float = 60.0, interval_s: float = 0.7) -> np.ndarray:
    """Screenshots of the viewport until two in a row agree: loading spinners, progressive
    rendering and overlays have settled."""
    deadline = time.monotonic() + timeout_s
    previous = viewport_pixels(page)
    while time.monotonic() < deadline:
        page.wait_for_timeout(interval_s * 1000)
        current = viewport_pixels(page)
        if current.shape == previous.shape and np.array_equal(current, previous):
            return current
        previous = current
    raise AssertionError(f"viewport still changing after {timeout_s:.0f} s")


def displayed_slice(page: Page) -> int:
    """The image number the viewport shows, from OHIF's "I:56 (1/30)" corner text."""
    text = page.locator('[data-cy="viewport-overlay-bottom-right"]').first.inner_text()
    match = re.search(r"\((\d+)/\d+\)", text)
    if match is None:
        raise AssertionError(f"no image number in the viewport's corner text: {text!r}")
    return int(match.group(1))


def go_to_slice(page: Page, number: int, max_steps: int = 1000) -> None:
    """Back to image `number` with OHIF's previous/next image keys (up/down arrows): OHIF
    jumps to the first slice of a segment when it loads a SEG."""
    for _ in range(max_steps):
        current = displayed_slice(page)
        if current == number:
            return
        page.keyboard.press("ArrowUp" if current > number else "ArrowDown")
        page.wait_for_timeout(150)
    raise AssertionError(f"could not go back to image {number}")


def series_thumbnail(page: Page, modality: str, description: str | None = None) -> Locator:
    """Series in the study browser, by modality badge and, when given, series description."""
    thumbnails = page.locator('[data-cy^="study-browser-thumbnail"]', has=page.locator(
        '[data-cy="series-modality-label"]', has_text=modality))
    if description is not None:
        thumbnails = thumbnails.filter(has=page.locator(
            '[data-cy="series-description-label"]', has_text=description))
    return thumbnails


def open_series(page: Page, modality: str, description: str | None = None) -> None:
    """Double-click a series into the active viewport, as a radiologist does."""
    series_thumbnail(page, modality, description).first.dblclick()


def answer_prompt(page: Page, button: str = "Yes", timeout_s: float = 30.0) -> bool:
    """OHIF asks before it loads a SEG or tracks SR measurements; returns whether it asked."""
    locator = page.get_by_role("button", name=button, exact=True)
    try:
        locator.first.wait_for(state="visible", timeout=timeout_s * 1000)
    except Exception:  # noqa: BLE001 (Playwright's TimeoutError: no prompt was shown)
        return False
    locator.first.click()
    return True


def open_panel(page: Page, name: str) -> Locator:
    """A right-hand panel: 'panelSegmentation' or 'trackedMeasurements'."""
    page.locator(f'[data-cy="{name}-btn"]').click()
    return page.locator('[data-cy="side-panel-header-right"]').locator("..")


def row_titles(page: Page) -> list[str]:
    """Titles of the rows in the open panel (segments, or measurements)."""
    return [t.strip() for t in page.locator('[data-cy="data-row-title"]').all_inner_texts()]


def wait_for_rows(page: Page, minimum: int = 1, timeout_s: float = 30.0) -> list[str]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        titles = row_titles(page)
        if len(titles) >= minimum:
            return titles
        page.wait_for_timeout(500)
    return row_titles(page)


def save_screenshot(page: Page, folder: Path | None, name: str) -> None:
    """A README picture of the whole page, scaled to 3/4 and quantised to 128 colours so
    that it stays small in git. Nothing is written unless a folder is given."""
    if folder is None:
        return
    image = Image.open(io.BytesIO(page.screenshot())).convert("RGB")
    image = image.resize((image.width * 3 // 4, image.height * 3 // 4), Image.LANCZOS)
    image.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(
        folder / f"{name}.png", optimize=True)


def svg_layer(page: Page) -> dict:
    """What the first viewport's annotation layer (SVG) draws, in viewport pixels: each
    polyline's points and each text box's lines. Read from the page, not the screenshot, so
    that outlines and their labels can be told apart."""
    return page.evaluate(
        """(selector) => {
            const pane = document.querySelector(selector);
            const origin = pane.getBoundingClientRect();
            const shift = (element) => {
                const box = element.ownerSVGElement.getBoundingClientRect();
                return [box.x - origin.x, box.y - origin.y];
            };
            return {
                polylines: Array.from(pane.querySelectorAll('svg polyline')).map(p => ({
                    shift: shift(p), points: p.getAttribute('points') || ''})),
                texts: Array.from(pane.querySelectorAll('svg text')).map(t =>
                    Array.from(t.querySelectorAll('tspan')).map(s => s.textContent)),
                boxes: Array.from(pane.querySelectorAll('svg text')).map(t => {
                    const box = t.getBoundingClientRect();
                    return [box.left - origin.x, box.top - origin.y, box.right - origin.x,
                            box.bottom - origin.y];
                }),
                size: [origin.width, origin.height],
            };
        }""",
        VIEWPORT,
    )


def drawn_polylines(page: Page, minimum_points: int = 8) -> list[np.ndarray]:
    """The outlines the viewport draws, as (n, 2) arrays of viewport pixels (x, y)."""
    found = []
    for line in svg_layer(page)["polylines"]:
        values = [float(v) for v in re.findall(r"-?\d+(?:\.\d+)?(?:e-?\d+)?", line["points"])]
        points = np.array(values).reshape(-1, 2) + np.array(line["shift"])
        if len(points) >= minimum_points:
            found.append(points)
    return found


def drawn_labels(page: Page) -> list[list[str]]:
    """The text boxes the viewport draws next to annotations, each as its lines."""
    return [lines for lines in svg_layer(page)["texts"] if lines]


def label_box(page: Page, first_line: str) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) in viewport pixels of the text box whose first line starts
    with `first_line`."""
    layer = svg_layer(page)
    for lines, box in zip(layer["texts"], layer["boxes"], strict=True):
        if lines and lines[0].startswith(first_line):
            return tuple(box)
    raise AssertionError(f"no text box starts with {first_line!r}")


def viewport_size(page: Page) -> tuple[float, float]:
    return tuple(svg_layer(page)["size"])


def film_box(pixels: np.ndarray) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a displayed greyscale image in a viewport screenshot: the
    rows and columns that are mostly grey, not the viewport's black background nor its
    coloured frame (corner texts are too small to count)."""
    top_value, low_value = pixels.max(axis=2).astype(int), pixels.min(axis=2).astype(int)
    lit = (top_value > 4) & (top_value - low_value < 30)
    columns = np.flatnonzero(lit.mean(axis=0) > 0.5)
    rows = np.flatnonzero(lit.mean(axis=1) > 0.5)
    return int(columns[0]), int(rows[0]), int(columns[-1]) + 1, int(rows[-1]) + 1


def wait_for_annotations(page: Page, timeout_s: float = 30.0) -> None:
    """Until the viewport draws an SR's annotations (text boxes) and they have settled: OHIF
    draws them some time after the image, which may already look rendered."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not drawn_labels(page):
        page.wait_for_timeout(500)
    wait_until_rendered(page)
