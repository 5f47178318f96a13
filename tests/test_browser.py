"""The app in a real browser: headless Debian chromium driven by playwright.

Opens the page, loads an example, sends it, waits for the answer and for every figure to
render, replays a decoding step, runs Compare, and saves screenshots under
``tests/artifacts/`` (look at them). Needs ``/usr/bin/chromium`` (``apt-get install
chromium``) and the ``playwright`` package; never ``playwright install``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import app
import elastic

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
TIMEOUT = 180_000  # ms; the machine may be busy


def _model():
    return elastic.load_model(device="cpu")  # the default model, as the app serves it


def _examples(tmp_path) -> Path:
    """The shipped examples, or two rendered scenes when they are not there yet."""
    shipped = app.EXAMPLES_DIR
    if (shipped / "examples.json").exists():
        return shipped
    from elastic.tiny.data import DESCRIBE_PROMPT, make_scene, render

    folder = tmp_path / "examples"
    folder.mkdir()
    examples = []
    for i, prompt in enumerate([DESCRIBE_PROMPT, "What is in the top right?"]):
        render(make_scene(2_000_000 + i), 288).save(folder / f"scene_{i}.png")
        examples.append({"image": f"scene_{i}.png", "prompt": prompt})
    (folder / "examples.json").write_text(json.dumps(examples))
    return folder


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    playwright = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():  # ./run.sh installs it with apt when it can
        pytest.skip("no /usr/bin/chromium: apt-get install -y chromium")
    model, processor = _model()
    app.MODEL.set(model, processor)
    examples = _examples(tmp_path_factory.mktemp("browser"))
    blocks = app.build(examples)
    app.serve(blocks, prevent_thread_lock=True, quiet=True, allowed_paths=[str(examples)])
    ARTIFACTS.mkdir(exist_ok=True)
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1500, "height": 1000})
        page.errors = []
        page.on("pageerror", lambda error: page.errors.append(str(error)))
        page.goto(blocks.local_url)
        page.wait_for_selector("#msg textarea", timeout=TIMEOUT)
        page.prompt = json.loads((examples / "examples.json").read_text())[0]["prompt"]
        yield page
        browser.close()
    blocks.close()


def _plot_rendered(page, elem_id: str, layer: str):
    """Wait until plotly drew ``layer`` (a CSS class inside the svg) in the plot ``elem_id``."""
    page.wait_for_selector(f"#{elem_id} .js-plotly-plot .main-svg .{layer}", state="attached", timeout=TIMEOUT)


def _title(page, elem_id: str) -> str:
    return page.locator(f"#{elem_id} .js-plotly-plot .gtitle").first.text_content()


def test_example_chat_renders_every_figure(page):
    page.locator("#chat-examples").get_by_text(page.prompt).first.click()  # load the first example into the message box
    page.wait_for_selector("#msg img", timeout=TIMEOUT)
    page.locator("#msg textarea").press("Enter")
    page.wait_for_function(
        "() => document.querySelector('#status')?.innerText.includes('KV entries')", timeout=TIMEOUT)
    answer = page.locator("#chatbot .bot").last.inner_text()
    assert answer.strip(), "the assistant answered nothing"

    _plot_rendered(page, "heatmap", "heatmaplayer image")
    assert "Attention received" in _title(page, "heatmap")
    page.screenshot(path=str(ARTIFACTS / "app.png"), full_page=True)

    page.get_by_role("tab", name="Anchors & groups").click()
    _plot_rendered(page, "groups", "barlayer .point")
    page.get_by_role("tab", name="Image").click()
    _plot_rendered(page, "overlay", "heatmaplayer image")
    _plot_rendered(page, "overlay", "imagelayer image")  # the input picture under the cells
    page.screenshot(path=str(ARTIFACTS / "app_image.png"), full_page=True)
    page.get_by_role("tab", name="Cache over time").click()
    _plot_rendered(page, "timeline", "scatterlayer .trace")
    page.screenshot(path=str(ARTIFACTS / "app_timeline.png"), full_page=True)
    page.get_by_role("tab", name="How it works").click()
    page.wait_for_function("() => document.querySelector('#explain')?.innerText.includes('Fixed-point')",
                           timeout=TIMEOUT)
    page.screenshot(path=str(ARTIFACTS / "app_how_it_works.png"), full_page=True)
    assert page.errors == []


def test_step_slider_replays_the_cache(page):
    page.get_by_role("tab", name="Anchors & groups").click()
    box = page.locator("#step input[type=number]")
    box.fill("2")
    box.press("Enter")
    page.wait_for_function(
        "() => document.querySelector('#groups .gtitle')?.textContent.includes('step 2:')", timeout=TIMEOUT)
    page.screenshot(path=str(ARTIFACTS / "app_step.png"), full_page=True)
    assert page.errors == []


def test_compare_tab_shows_three_answers(page):
    # The chat's image and question are copied over, and the Compare tab opens.
    page.get_by_role("button", name="Compare methods on this question").click()
    page.wait_for_function(
        f"() => document.querySelector('#compare-question textarea')?.value === {json.dumps(page.prompt)}",
        timeout=TIMEOUT)
    page.get_by_role("button", name="Run side by side").click()
    page.wait_for_function(
        "() => document.querySelectorAll('#compare-html .ec-answer').length === 3", timeout=TIMEOUT)
    html = page.locator("#compare-html").inner_text()
    assert "Full cache" in html and "Elastic Cache" in html and "H2O" in html and "ROUGE-L" in html
    page.screenshot(path=str(ARTIFACTS / "app_compare.png"), full_page=True)
    assert page.errors == []
