"""The app in a real browser: headless Debian chromium driven by playwright.

Opens the page, loads an example, sends it, waits for the answer and for every figure to
render, replays a decoding step, runs Compare, and saves screenshots under
``tests/artifacts/`` (look at them). Needs ``/usr/bin/chromium`` (``apt-get install
chromium``) and the ``playwright`` package; never ``playwright install``.
"""

from __future__ import annotations

import json
import time
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
        page.examples = json.loads((examples / "examples.json").read_text())
        page.url0, page.model = blocks.local_url, model
        page.browser = browser
        yield page
        browser.close()
    blocks.close()


def _plot_rendered(page, elem_id: str, layer: str):
    """Wait until plotly drew ``layer`` (a CSS class inside the svg) in the plot ``elem_id``."""
    page.wait_for_selector(f"#{elem_id} .js-plotly-plot .main-svg .{layer}", state="attached", timeout=TIMEOUT)


def _title(page, elem_id: str) -> str:
    return page.locator(f"#{elem_id} .js-plotly-plot .gtitle").first.text_content()


def test_example_chat_renders_every_figure(page):
    page.locator("#chat-examples .gallery-item").first.click()  # load the first example into the message box
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
    page.wait_for_function(  # the end: three answers and the note under them
        "() => document.querySelectorAll('#compare-html .ec-answer').length === 3"
        " && document.querySelector('#compare-html .ec-speed-note')", timeout=TIMEOUT)
    html = page.locator("#compare-html").inner_text()
    assert "Full cache" in html and "Elastic Cache" in html and "H2O" in html and "ROUGE-L" in html
    page.screenshot(path=str(ARTIFACTS / "app_compare.png"), full_page=True)
    assert page.errors == []


def _open(page, width=1280, height=720, dark=False, max_new=24):
    other = page.browser.new_page(viewport={"width": width, "height": height},
                                  color_scheme="dark" if dark else "light")
    other.errors, other.examples = [], page.examples
    other.on("pageerror", lambda error: other.errors.append(str(error)))
    other.goto(page.url0 + ("?__theme=dark" if dark else ""))
    other.wait_for_selector("#msg textarea", timeout=TIMEOUT)
    limit = other.locator("#max-new input[type=number]")  # short answers keep the test fast
    limit.fill(str(max_new))
    limit.press("Enter")
    other.evaluate("window.scrollTo(0, 0)")  # the limit is below the fold: back to the first screen
    return other


def _send_example(page, index):
    prompt = page.examples[index]["prompt"]
    page.locator("#chat-examples .gallery-item").nth(index).click()
    page.wait_for_selector("#msg img", timeout=TIMEOUT)
    page.locator("#msg textarea").press("Enter")
    return prompt


def _answered(page):
    """Wait for the answer's summary and for the panel drawn after it (by /panel: while the
    answer streams, /live draws only the shown tab's views, so the other tabs' views and the
    explanation still hold their placeholders)."""
    page.wait_for_function("() => document.querySelector('#status')?.innerText.includes('KV entries')"
                           " && !['#heatmap', '#timeline', '#groups'].some(id => document.querySelector(id)"
                           "?.textContent.includes('figures appear'))"
                           " && !document.querySelector('#explain')?.textContent.includes('Send a message')",
                           timeout=TIMEOUT)


def test_first_screen_fits_a_projector(page):
    projector = _open(page, 1280, 720)
    for selector in ("#chat-examples", "#method", "#budget", "#msg", "#send", "#stop", "#status", "#chatbot",
                     "#heatmap"):
        box = projector.locator(selector).first.bounding_box()
        assert box and box["y"] >= 0 and box["y"] + box["height"] <= 720, f"{selector} is below the fold: {box}"
    assert "synthetic shape scenes" in projector.locator("body").inner_text()  # the model's scope is said
    projector.screenshot(path=str(ARTIFACTS / "app_1280x720.png"))
    # Compare's main loop too: the image, the question, Run and Stop.
    projector.get_by_role("tab", name="Compare").click()
    for selector in ("#compare-question", "#compare-run", "#compare-stop"):
        _inside(projector, selector, 720)
    projector.close()


def test_stop_ends_a_long_generation(page):
    tab = _open(page, 1280, 720, max_new=300)
    eos = page.model.generation_config.eos_token_id
    page.model.generation_config.eos_token_id = None  # it would run to the 160-token limit
    try:
        _send_example(tab, 1)
        tab.wait_for_function("() => (document.querySelector('#chatbot .bot:last-of-type')?.innerText || '')"
                              ".trim().split(' ').length >= 3", timeout=TIMEOUT)
        tab.locator("#stop").click()
        pressed = time.perf_counter()
        tab.wait_for_function("() => document.querySelector('#status')?.innerText.includes('Stopped after')",
                              timeout=TIMEOUT)
        assert time.perf_counter() - pressed < 5
    finally:
        page.model.generation_config.eos_token_id = eos
    assert tab.locator("#chatbot .bot").last.inner_text().strip()  # what was written stays
    tab.close()


def test_two_tabs_generating_at_once_get_their_own_answers(page):
    tabs = [_open(page), _open(page)]
    asked = [_send_example(tabs[0], 0), _send_example(tabs[1], 2)]
    # The second tab's question shows at once, while it waits for the first.
    tabs[1].wait_for_function("() => /waiting for the model|Generating/.test("
                              "document.querySelector('#status')?.innerText || '')", timeout=10_000)
    for tab, question in zip(tabs, asked):
        _answered(tab)
        users = tab.locator("#chatbot .user")
        assert question in users.last.inner_text() and users.count() == 1
        assert tab.locator("#chatbot .bot").last.inner_text().strip()
        assert tab.errors == []
        tab.close()


def test_how_it_works_states_the_clamped_fixed_point(page):
    tab = _open(page, 1280, 720)
    tab.locator("#chat-examples .gallery-item").first.click()  # it sets its own budget ...
    tab.wait_for_selector("#msg img", timeout=TIMEOUT)
    box = tab.locator("#budget input[type=number]")
    box.fill("0.1")  # ... which this one replaces
    box.press("Enter")
    tab.locator("#msg textarea").press("Enter")
    _answered(tab)
    tab.get_by_role("tab", name="How it works").click()
    # Drawn by /panel after the answer (or by /live once the tab is shown): not a placeholder.
    tab.wait_for_function("() => !document.querySelector('#explain')?.innerText.includes('Send a message')",
                          timeout=TIMEOUT)
    text = tab.locator("#explain").inner_text()
    assert "would fall inside the attention sink" in text and "clamped to 1" in text
    tab.close()


def test_dark_theme_keeps_everything_readable(page):
    tab = _open(page, 1280, 720, dark=True)
    _send_example(tab, 0)
    _answered(tab)
    _plot_rendered(tab, "heatmap", "heatmaplayer image")
    body = tab.evaluate("getComputedStyle(document.body).backgroundColor")
    rgb = [int(x) for x in body[body.index("(") + 1:body.index(")")].split(",")[:3]]
    assert sum(rgb) < 200, f"the dark theme did not apply: {body}"
    plot = tab.evaluate("getComputedStyle(document.querySelector('#heatmap .main-svg')).backgroundColor")
    # Figures carry their own white background and near-black text (no one text colour reaches
    # 4.5:1 on both themes' pages); test_browser_figures.py measures every text's contrast.
    assert plot == "rgb(255, 255, 255)", f"the figure lost its own background on the dark page: {plot}"
    tab.screenshot(path=str(ARTIFACTS / "app_dark.png"))
    assert tab.errors == []
    tab.close()


def _inside(page, selector: str, height: int) -> dict:
    box = page.locator(selector).first.bounding_box()
    assert box and box["y"] >= 0 and box["y"] + box["height"] <= height, f"{selector} is not on screen: {box}"
    return box


@pytest.mark.parametrize("width, height", [(1280, 720), (1920, 1080)])
def test_projector_the_figures_come_while_the_answer_streams(page, width, height):
    # At a classroom projector's size: the heatmap is drawn before the answer ends, Stop is
    # on screen while it streams, the chat is at least 300 px tall (issue 32, (a)-(c)).
    tab = _open(page, width, height, max_new=120)
    eos = page.model.generation_config.eos_token_id
    page.model.generation_config.eos_token_id = None  # the answer runs to 120 tokens
    try:
        tab.locator("#chat-examples .gallery-item").first.click()
        tab.wait_for_selector("#msg img", timeout=TIMEOUT)
        tab.locator("#send").click()
        tab.evaluate("window.scrollTo(0, 0)")
        _plot_rendered(tab, "heatmap", "heatmaplayer image")
        streaming = tab.evaluate("() => !document.querySelector('#status')?.innerText.includes('KV entries')")
        assert streaming, "the heatmap came only after the answer had ended"
        assert "Attention received" in _title(tab, "heatmap")
        _inside(tab, "#stop", height)
        _inside(tab, "#heatmap", height)
        assert _inside(tab, "#chatbot", height)["height"] >= 300
        # The decoding views follow: the step slider moves while the answer is written.
        first = tab.locator("#step input[type=number]").input_value()
        tab.wait_for_function(f"() => Number(document.querySelector('#step input[type=number]').value) > {first}"
                              " && !document.querySelector('#status').innerText.includes('KV entries')",
                              timeout=TIMEOUT)
        tab.screenshot(path=str(ARTIFACTS / f"app_live_{width}x{height}.png"))
        tab.locator("#stop").click()
        tab.wait_for_function("() => document.querySelector('#status')?.innerText.includes('Stopped after')",
                              timeout=TIMEOUT)
    finally:
        page.model.generation_config.eos_token_id = eos
    _answered(tab)
    tab.screenshot(path=str(ARTIFACTS / f"app_done_{width}x{height}.png"))
    assert tab.errors == []
    tab.close()


def test_compare_shows_an_answer_while_it_is_written(page):
    tab = _open(page, 1280, 720, max_new=40)
    eos = page.model.generation_config.eos_token_id
    page.model.generation_config.eos_token_id = None  # each answer runs to the limit
    try:
        tab.locator("#chat-examples .gallery-item").first.click()  # its scene, question and budget
        tab.wait_for_selector("#msg img", timeout=TIMEOUT)
        tab.get_by_role("button", name="Compare methods on this question").click()
        tab.wait_for_function("() => document.querySelector('#compare-question textarea')?.value === "
                              f"{json.dumps(tab.examples[0]['prompt'])}", timeout=TIMEOUT)
        tab.get_by_role("button", name="Run side by side").click()
        # (e): a method's partial answer on screen while later methods still wait.
        tab.wait_for_function("() => { const h = document.querySelector('#compare-html');"
                              " return h && h.innerText.includes('writing') && h.innerText.includes('waiting')"
                              " && h.querySelector('.ec-answer') && h.querySelector('.ec-answer').innerText.trim()"
                              ".length > 0; }", timeout=TIMEOUT)
        tab.evaluate("window.scrollTo(0, 0)")  # Run is below the fold; the answers are at the top
        tab.screenshot(path=str(ARTIFACTS / "app_compare_live.png"))
        head = tab.locator("#compare-html .ec-compare-head").inner_text()
        example = tab.examples[0]
        assert f"budget {example.get('budget', 0.8):g}" in head and example["image"].split("/")[-1] in head
        assert example["prompt"] in head
        tab.locator("#compare-stop").click()  # the methods that ran stay, with the note under them
        tab.wait_for_function("() => document.querySelector('#compare-html .ec-speed-note')", timeout=TIMEOUT)
    finally:
        page.model.generation_config.eos_token_id = eos
    assert tab.locator("#compare-html .ec-answer").count() >= 1
    assert "writing" not in tab.locator("#compare-html").inner_text()
    assert tab.errors == []
    tab.close()
