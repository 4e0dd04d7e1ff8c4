"""Render what a user opens: `dvc plots show`'s HTML page, offline, in Debian's headless Chromium.

DVC's own page loads Vega from a CDN, which neither CI nor an offline GPU box can reach, so the
page is made with `dvc plots show --html-template` and a template that inlines the Vega / Vega-Lite
/ Vega-Embed bundle vl-convert ships (the same libraries, no network). The template also makes
vegaEmbed draw SVG, so the titles and axis labels of the drawn charts appear in the page's DOM,
which Chromium dumps after rendering. Where Chromium is missing, :func:`render_specs` draws each
spec with vl-convert's own Vega runtime instead (same specs, no browser).
"""

from __future__ import annotations

import io
import re
import shutil
import subprocess
from pathlib import Path

# vegaEmbed is the function DVC's plot divs call; force the SVG renderer so text lands in the DOM.
_SVG_EMBED = """
<script>
  const realEmbed = window.vegaEmbed;
  window.vegaEmbed = (el, spec, opts) => realEmbed(el, spec, Object.assign({}, opts || {}, {renderer: "svg"}));
</script>
"""


def offline_template(path: Path) -> Path:
    """An HTML template for `dvc plots show --html-template` with every script inlined."""
    import vl_convert

    bundle = vl_convert.javascript_bundle()
    path.write_text(
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>ltta plots</title>\n"
        f"<script>{bundle}</script>{_SVG_EMBED}</head>\n<body>\n{{plot_divs}}\n</body></html>\n"
    )
    return path


def chromium() -> str | None:
    """Debian's Chromium (package ``chromium``), if installed."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _browser(html: Path, *args: str) -> subprocess.CompletedProcess[str]:
    browser = chromium()
    assert browser is not None
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--virtual-time-budget=15000", "--hide-scrollbars", *args, html.resolve().as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


def screenshot(html: Path, png: Path, size: tuple[int, int] = (1300, 2600)) -> Path:
    """A PNG of the page as Chromium draws it."""
    proc = _browser(html, f"--screenshot={png}", f"--window-size={size[0]},{size[1]}")
    assert png.exists(), f"chromium made no screenshot (exit {proc.returncode}): {proc.stderr[-2000:]}"
    return png


def rendered_dom(html: Path) -> str:
    """The page's DOM after its scripts ran (Vega's SVG included)."""
    proc = _browser(html, "--dump-dom")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def svg_texts(markup: str) -> list[str]:
    """The text of every SVG ``<text>`` element (titles, axis labels, legend entries, ticks)."""
    return [re.sub(r"<[^>]+>", "", t).strip() for t in re.findall(r"<text\b[^>]*>(.*?)</text>", markup, flags=re.S)]


def render_specs(specs: dict[str, dict]) -> dict[str, tuple[str, bytes]]:
    """Each Vega-Lite spec drawn by vl-convert: (SVG markup, PNG bytes)."""
    import vl_convert

    return {name: (vl_convert.vegalite_to_svg(spec), vl_convert.vegalite_to_png(spec)) for name, spec in specs.items()}


def ink_fraction(png: bytes) -> float:
    """Share of pixels that are not the background colour: 0 for a blank image."""
    import numpy as np
    from PIL import Image

    img = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).reshape(-1, 3)
    background = np.median(img, axis=0)
    return float((np.abs(img.astype(int) - background).sum(axis=1) > 30).mean())
