"""The launched demo on 127.0.0.1: one gradio_client round trip, and a real browser (Debian chromium + Playwright).

The browser test skips only when chromium or Playwright for Python is missing (.ci/run installs both):
    apt-get install -y chromium && pip install playwright
``VISATTN_UPDATE_SCREENSHOT=1`` also writes the README screenshot docs/images/demo.png;
``VISATTN_DEMO_MODEL`` picks the model (default "tiny"; "default" = the package's embedded model).
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("gradio")
pytest.importorskip("gradio_client")

from visattn.demos.app import build_app  # noqa: E402
from visattn.demos.engine import Engine  # noqa: E402
from visattn.demos.smoke import launch_local  # noqa: E402

CHROMIUM = os.environ.get("VISATTN_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "images" / "demo.png"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(url, engine, size): the app on a free 127.0.0.1 port, closed after the module."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ.setdefault("GRADIO_TEMP_DIR", str(tmp_path_factory.mktemp("gradio")))
    threads = torch.get_num_threads()
    model = os.environ.get("VISATTN_DEMO_MODEL", "tiny")
    if model == "tiny":
        torch.set_num_threads(1)  # the tiny model is fastest on one thread
    engine = Engine(model=model, device="cpu")
    engine.pipe  # load before the clock of the first request starts
    demo = build_app(engine)
    url, _ = launch_local(demo)
    try:
        yield url, engine, engine.suggested_size()
    finally:
        demo.close()
        torch.set_num_threads(threads)


def test_gradio_client_round_trip(server):
    from gradio_client import Client
    from PIL import Image

    url, engine, size = server
    client = Client(url, verbose=False)
    api = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert {"/generate", "/compare", "/pattern"} <= set(api)
    params = [p["parameter_name"] for p in api["/generate"]["parameters"]]
    assert params[:3] == ["prompt", "negative_prompt", "method"] and "seed" in params
    path, timing, stats = client.predict(prompt="a cat", method="dense", width=size, height=size, steps=2,
                                         seed=1, api_name="/generate")
    img = Image.open(path)
    assert img.size == (size, size)
    assert np.asarray(img.convert("RGB")).std() > 1.0
    assert "ms/step over 2 steps" in timing
    with pytest.raises(Exception, match=r"width=\d+ is not a multiple of \d+"):
        client.predict(prompt="a cat", width=size + 1, api_name="/generate")
    # the app keeps serving after an error
    path2, _, _ = client.predict(prompt="a cat", method="dense", width=size, height=size, steps=2, seed=1,
                                 api_name="/generate")
    assert np.array_equal(np.asarray(Image.open(path)), np.asarray(Image.open(path2)))  # same seed, same image
    pat, text, _ = client.predict(method="dense", rows=4, cols=5, query_row=1, query_col=2, api_name="/pattern")
    assert "attends 20 of 20 keys" in text and Image.open(pat).size[0] > 0
    if "/story" in api:  # only when visattn.pipelines.StoryPipeline exists
        strip, panels, info = client.predict(characters="[Bob] a red circle",
                                             panels="[Bob] on blue #one\n[Bob] on green #two", width=size,
                                             height=size, steps=1, api_name="/story")
        assert len(panels) == 2 and info.startswith("2 panels") and Image.open(strip).size[0] > 2 * size


def test_cancel_over_http_stops_a_running_generation(server):
    import time

    from gradio_client import Client

    url, engine, size = server
    client = Client(url, verbose=False)
    job = client.submit(prompt="a long one", method="dense", width=size, height=size, steps=100, seed=2,
                        api_name="/generate")
    deadline = time.time() + 60
    while not engine._run_lock.locked() and time.time() < deadline:  # wait until the generation runs
        time.sleep(0.05)
    assert engine._run_lock.locked(), "the generation never started"
    client.predict(api_name="/cancel")
    with pytest.raises(Exception, match=r"cancelled after step \d+ of 100"):
        job.result(timeout=120)
    path, timing, _ = client.predict(prompt="after cancel", method="dense", width=size, height=size, steps=1,
                                     api_name="/generate")
    assert "over 1 steps" in timing


def _playwright_or_skip():
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError:
        pytest.skip("Playwright for Python is not installed (pip install playwright); .ci/run installs it")
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)) and not shutil.which("chromium"):
        pytest.skip(f"Debian chromium not found at {CHROMIUM} (apt-get install -y chromium); .ci/run installs it")
    return sync_playwright, expect


def _image_pixels(page, selector: str) -> np.ndarray:
    """(H, W, 4) uint8 pixels of the <img> under ``selector`` as the browser decoded it."""
    data = page.locator(selector).evaluate(
        """el => { const c = document.createElement('canvas'); c.width = el.naturalWidth;
                   c.height = el.naturalHeight; const x = c.getContext('2d'); x.drawImage(el, 0, 0);
                   return [el.naturalWidth, el.naturalHeight, Array.from(x.getImageData(0, 0, c.width, c.height).data)]; }""")
    w, h, px = data
    return np.asarray(px, dtype=np.uint8).reshape(h, w, 4)


def test_browser_generate_and_invalid_size(server, tmp_path):
    sync_playwright, expect = _playwright_or_skip()
    url, engine, size = server
    exe = CHROMIUM if os.path.isfile(CHROMIUM) else shutil.which("chromium")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, headless=True, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(url, wait_until="domcontentloaded")
            page.locator("#gen-button").wait_for(state="visible", timeout=60_000)
            page.locator("#gen-prompt textarea").fill("a red circle on a blue background")
            kernel = page.locator("#gen-neighborhood-kernel_size").locator("input, textarea")
            if kernel.count() and kernel.first.is_visible():
                kernel.first.fill("7")  # small enough to be block-sparse on the test model's grid
            page.locator("#gen-width input").fill(str(size))
            page.locator("#gen-height input").fill(str(size))
            page.locator("#gen-button").click()
            img = page.locator("#gen-image img")
            img.wait_for(state="visible", timeout=120_000)
            page.wait_for_function("el => el.complete && el.naturalWidth > 0", arg=img.element_handle(),
                                   timeout=30_000)
            px = _image_pixels(page, "#gen-image img")
            assert px.shape[:2] == (size, size)
            assert px[..., :3].std() > 1.0, "the generated picture is blank"
            timing = page.locator("#gen-timing textarea")
            expect(timing).to_have_value(re.compile(r"ms/step over \d+ steps"), timeout=30_000)
            shot = tmp_path / "demo.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            if os.environ.get("VISATTN_UPDATE_SCREENSHOT") == "1":
                SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(shot, SCREENSHOT)

            # an invalid size: a readable error in the page, and the app keeps serving
            page.locator("#gen-width input").fill(str(size + 1))
            page.locator("#gen-button").click()
            err = page.get_by_text(re.compile(rf"width={size + 1} is not a multiple of \d+"))
            err.first.wait_for(state="visible", timeout=30_000)
            first_src = img.get_attribute("src")
            page.locator("#gen-width input").fill(str(size))
            page.locator("#gen-prompt textarea").fill("a blue star")
            page.locator("#gen-button").click()
            page.wait_for_function("([sel, old]) => { const el = document.querySelector(sel); "
                                   "return el && el.complete && el.naturalWidth > 0 && el.src !== old; }",
                                   arg=["#gen-image img", first_src], timeout=60_000)
            assert not np.array_equal(_image_pixels(page, "#gen-image img"), px)  # a new prompt, a new picture

            # the pattern explorer works in the page without a model call
            page.get_by_role("tab", name="Pattern explorer").click()
            page.locator("#ex-image img").wait_for(state="visible", timeout=30_000)
            ex_text = page.locator("#ex-text textarea")
            expect(ex_text).to_have_value(re.compile(r"query \(20, 12\)"), timeout=30_000)
            # click the top-left grid square: it becomes the query
            page.locator("#ex-image img").click(position={"x": 2, "y": 2})
            expect(ex_text).to_have_value(re.compile(r"query \(0, 0\)"), timeout=30_000)
        finally:
            browser.close()
