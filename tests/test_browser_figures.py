"""Every plotly figure the app shows reads from the back of a room, measured in the browser.

Issue 32, "Done when" (d): in headless Debian chromium at 1280x720, on the light and the
dark theme, every text of every rendered plotly figure is at least 14 px and has at least
4.5:1 contrast (WCAG AA) against what is painted behind it, read from the DOM's computed
styles of the SVG text (not from the figure's JSON: this is what the person sees); the
hover label too; and plotly's toolbar, shown on hover, covers no title. Explore's figures
after an answer and Compare's after a run on the same question. Uses the shipped
model and app (``app.build``, ``app.serve``, ``app.MODEL``) and only the page's UI.
Needs ``/usr/bin/chromium`` and the ``playwright`` package; never ``playwright install``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import app
import elastic

pytestmark = pytest.mark.slow

from test_browser import ARTIFACTS, CHROMIUM, FLAGS, TIMEOUT  # one chromium set-up for both browser tests

# For every visible plotly text: its size, its colour and what is painted behind it, from the
# computed styles. Behind a text is its own box (an annotation's or the hover label's), drawn
# over the figure's paper, drawn over the page: the first opaque CSS background up the tree.
MEASURE = """(root) => {
  const page = (el) => {
    for (let e = el; e; e = e.parentElement) {
      const c = getComputedStyle(e).backgroundColor;
      if (c && c !== 'rgba(0, 0, 0, 0)' && c !== 'transparent') return c;
    }
    return 'rgb(255, 255, 255)';
  };
  const boxOf = (t) => {
    const note = t.closest('g.annotation');
    if (note) return note.querySelector('rect.bg');
    const hover = t.closest('g.hovertext');
    if (hover) return hover.querySelector('path');
    return null;
  };
  const out = [];
  const plots = root.matches('.js-plotly-plot') ? [root] : root.querySelectorAll('.js-plotly-plot');
  for (const plot of plots) {
    const r = plot.getBoundingClientRect();
    if (r.width < 2 || r.height < 2) continue;  // a plot in a hidden tab
    const paper = plot.querySelector('svg.main-svg');
    for (const t of plot.querySelectorAll('svg text, svg tspan')) {
      const own = [...t.childNodes].some((n) => n.nodeType === 3 && n.textContent.trim());
      if (!own) continue;
      const box = t.getBoundingClientRect();
      const style = getComputedStyle(t);
      if (box.width < 1 || style.visibility === 'hidden' || style.display === 'none') continue;
      let hidden = false;
      for (let e = t; e && e !== plot; e = e.parentElement) {
        const s = getComputedStyle(e);
        if (s.display === 'none' || parseFloat(s.opacity) === 0) { hidden = true; break; }
      }
      if (hidden) continue;
      const b = boxOf(t);
      const bs = b ? getComputedStyle(b) : null;
      out.push({
        plot: plot.closest('[id]')?.id || '?', kind: t.closest('g.hovertext') ? 'hover' : 'figure', text: t.textContent.trim().slice(0, 40),
        size: parseFloat(style.fontSize), fill: style.fill, fillOpacity: parseFloat(style.fillOpacity),
        box: bs ? bs.fill : null, boxOpacity: bs ? parseFloat(bs.fillOpacity) * parseFloat(bs.opacity) : 0,
        paper: getComputedStyle(paper).backgroundColor, page: page(plot.parentElement),
      });
    }
  }
  return out;
}"""


def rgba(css: str) -> tuple[float, float, float, float]:
    """``rgb(r, g, b)`` / ``rgba(r, g, b, a)`` as the browser computes them."""
    if css in ("none", "transparent"):
        return 0.0, 0.0, 0.0, 0.0
    parts = [float(v) for v in css[css.index("(") + 1:css.index(")")].replace("/", ",").split(",")]
    return parts[0], parts[1], parts[2], parts[3] if len(parts) == 4 else 1.0


def over(top: tuple, bottom: tuple, alpha: float = 1.0) -> tuple:
    a = top[3] * alpha
    return tuple(t * a + b * (1 - a) for t, b in zip(top[:3], bottom[:3])) + (1.0,)


def contrast(fg: tuple, bg: tuple) -> float:
    """WCAG 2.x contrast ratio of two opaque colours."""
    def lum(c):
        chans = [v / 255 for v in c[:3]]
        chans = [v / 12.92 if v <= 0.04045 else ((v + 0.055) / 1.055) ** 2.4 for v in chans]
        return 0.2126 * chans[0] + 0.7152 * chans[1] + 0.0722 * chans[2]
    hi, lo = sorted((lum(fg), lum(bg)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


def check(found: list[dict], where: str) -> None:
    assert found, f"{where}: no figure text measured"
    for t in found:
        label = f"{where}, #{t['plot']} {t['text']!r}"
        assert t["size"] >= 14, f"{label} is {t['size']} px"
        behind = over(rgba(t["paper"]), rgba(t["page"]))
        if t["box"]:
            behind = over(rgba(t["box"]), behind, t["boxOpacity"])
        ratio = contrast(over(rgba(t["fill"]), behind, t["fillOpacity"]), behind)
        assert ratio >= 4.5, f"{label}: {t['fill']} on {behind} has contrast {ratio:.2f}"


def overlaps(a: dict, b: dict) -> bool:
    return a["x"] < b["x"] + b["width"] and b["x"] < a["x"] + a["width"] and \
        a["y"] < b["y"] + b["height"] and b["y"] < a["y"] + a["height"]


@pytest.fixture(scope="module")
def served():
    playwright = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():  # ./run.sh installs it with apt when it can
        pytest.skip("no /usr/bin/chromium: apt-get install -y chromium")
    if not (app.EXAMPLES_DIR / "examples.json").exists():
        pytest.skip("the shipped examples are not there")
    model, processor = elastic.load_model(device="cpu")  # the shipped model, as the app serves it
    app.MODEL.set(model, processor)
    blocks = app.build(app.EXAMPLES_DIR)
    app.serve(blocks, prevent_thread_lock=True, quiet=True, allowed_paths=[str(app.EXAMPLES_DIR)])
    ARTIFACTS.mkdir(exist_ok=True)
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield browser, blocks.local_url
        browser.close()
    blocks.close()


def _answer_first_example(browser, url, dark: bool):
    page = browser.new_page(viewport={"width": 1280, "height": 720}, color_scheme="dark" if dark else "light")
    page.goto(url + ("?__theme=dark" if dark else ""))
    page.wait_for_selector("#msg textarea", timeout=TIMEOUT)
    limit = page.locator("#max-new input[type=number]")
    if limit.count():  # a short answer keeps the test fast
        limit.fill("16")
        limit.press("Enter")
    page.locator("#chat-examples .gallery-item").first.click()
    page.wait_for_selector("#msg img", timeout=TIMEOUT)
    page.locator("#msg textarea").press("Enter")
    page.wait_for_function("() => document.querySelector('#status')?.innerText.includes('KV entries')",
                           timeout=TIMEOUT)
    page.wait_for_selector("#heatmap .js-plotly-plot .heatmaplayer image", state="attached", timeout=TIMEOUT)
    return page


def _measure_every_tab(page, theme: str) -> None:
    """Open every tab of the page in turn and check every figure shown, its hover label, and
    that the toolbar covers no title."""
    tabs = page.get_by_role("tab")
    names = [tabs.nth(i).inner_text().strip() for i in range(tabs.count())]
    seen, hovered, titles = set(), set(), set()
    for name in names:
        tab = page.get_by_role("tab", name=name, exact=True)
        if not tab.is_visible():  # a tab of the Explore panel while another page tab is open
            page.get_by_role("tab").first.click()
            page.wait_for_timeout(300)
        if not tab.is_visible():
            continue
        tab.click()
        page.wait_for_timeout(800)  # a figure refits its column when its tab is shown
        found = page.evaluate(MEASURE, page.locator("body").element_handle())
        if not found:
            continue
        check(found, f"{theme} theme, tab {name!r}")
        seen |= {t["plot"] for t in found}
        # Hover the middle of every visible plot: its hover label reads, and the toolbar that
        # plotly shows on hover stands clear of the title.
        for plot in page.locator(".js-plotly-plot").all():
            if not plot.is_visible():
                continue
            areas = [d.bounding_box() for d in plot.locator(".nsewdrag").all()]
            areas = [a for a in areas if a]
            if not areas:
                continue
            box = max(areas, key=lambda a: a["width"] * a["height"])  # the main plot of a figure
            page.mouse.move(box["x"] + 5, box["y"] + 5)
            page.mouse.move(box["x"] + box["width"] * 0.5, box["y"] + box["height"] * 0.5, steps=4)
            page.wait_for_timeout(400)
            hover = [t for t in page.evaluate(MEASURE, plot.element_handle()) if t["box"] and "hover" in t["kind"]]
            if hover:  # not every plot has a point under its middle
                check(hover, f"{theme} theme, tab {name!r}, hover")
                hovered |= {t["plot"] for t in hover}
            bar = plot.locator(".modebar").first
            if bar.count() and bar.is_visible():
                toolbar = bar.bounding_box()
                for title in plot.locator(".gtitle, .gtitle-subtitle").all():
                    area = title.bounding_box()
                    assert not (area and toolbar and overlaps(area, toolbar)), \
                        f"{theme} theme, tab {name!r}: the toolbar {toolbar} covers the title {area}"
        titles |= {t["text"] for t in found}
    assert "heatmap" in seen and len(seen) >= 3, f"too few figures measured: {seen}"
    assert "heatmap" in hovered, f"no hover label measured on the heatmap ({hovered})"
    assert "KV entries per layer while decoding" in titles, "Compare's chart was not measured"
    page.get_by_role("tab").first.click()
    page.screenshot(path=str(ARTIFACTS / f"figures_{theme}.png"))


def test_every_rendered_figure_is_legible(served):
    browser, url = served
    page = _answer_first_example(browser, url, dark=False)
    # Compare's figures too: the same question, three methods, a few tokens each.
    page.get_by_role("button", name="Compare methods on this question").click()
    page.wait_for_selector("#compare-question textarea", timeout=TIMEOUT)
    limit = page.locator("#compare-max-new input[type=number]")
    if limit.count():
        limit.fill("8")
        limit.press("Enter")
    page.get_by_role("button", name="Run side by side").click()
    page.wait_for_function("() => document.querySelectorAll('#compare-html .ec-answer').length === 3"
                           " && document.querySelector('#compare-budgets .js-plotly-plot .barlayer')",
                           timeout=TIMEOUT)
    page.wait_for_timeout(1500)
    _measure_every_tab(page, "light")
    # The dark theme through gradio's own path: with no ?__theme it follows the system's
    # colour scheme and switches when that changes (no second answer to wait for).
    page.emulate_media(color_scheme="dark")
    page.wait_for_timeout(500)
    body = rgba(page.evaluate("() => getComputedStyle(document.body).backgroundColor"))
    assert sum(body[:3]) < 200, f"the dark theme did not apply: {body}"
    _measure_every_tab(page, "dark")
    page.close()
