"""The app in a real browser: streamlit run + Debian's Chromium driven by Playwright.

Runs the one-click default (bundled EfficientNet-Lite0, 224 px, four methods) exactly as a user
would, then drags a range in the range lab; saves screenshots to test-output/browser/ (each
test prints its path). Skipped only where Chromium is missing. ``UPDATE_SCREENSHOTS=1 ./test -k
browser`` also writes the README's pictures (docs/img/*.png) from what the tests see.
"""

import contextlib
import os
import re
import shutil
import time
from pathlib import Path

import pytest

from bench.app_speed import ARGS, CHARTS_DRAWN, READY, serve

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "test-output" / "browser"
DOCS_IMG = ROOT / "docs" / "img"
#: The README's pictures: at most this wide and this large (tests/test_docs.py checks the size).
SHOT_WIDTH, SHOT_BYTES = 1000, 200_000
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"

pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists() and not os.environ.get("CI"),
    reason="Debian's chromium is not installed (.ci/run installs it)",
)


@contextlib.contextmanager
def streamlit_server(tmp_path_factory, **env):
    """The app's server (``bench.app_speed.serve``) with its own runs (unless ``env`` names
    them) and data folders and a log; its URL."""
    runs = env.pop("LSQ_RUNS_DIR", None) or tmp_path_factory.mktemp("runs")
    env.setdefault("LSQ_DATA_DIR", str(tmp_path_factory.mktemp("data")))
    with (
        open(tmp_path_factory.mktemp("log") / "streamlit.log", "w") as log,
        serve(Path(runs), log=log, **env) as (url, _),
    ):
        yield url


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with streamlit_server(tmp_path_factory) as url:
        yield url


def readme_shot(target, name: str) -> None:
    """With ``UPDATE_SCREENSHOTS=1``: ``docs/img/<name>.png``, a picture of ``target`` (a page's
    viewport or one element) at most SHOT_WIDTH px wide, in at most 256 colours and SHOT_BYTES."""
    if os.environ.get("UPDATE_SCREENSHOTS") != "1":
        return
    from PIL import Image

    raw = OUT / f"{name}-raw.png"
    target.screenshot(path=str(raw))
    img = Image.open(raw).convert("RGB")
    if img.width > SHOT_WIDTH:
        img = img.resize((SHOT_WIDTH, round(img.height * SHOT_WIDTH / img.width)), Image.LANCZOS)
    DOCS_IMG.mkdir(parents=True, exist_ok=True)
    out = DOCS_IMG / f"{name}.png"
    for colours in (256, 128, 64, 32):
        img.quantize(colours).save(out, optimize=True)
        if out.stat().st_size <= SHOT_BYTES:
            print(f"README picture: {out} ({out.stat().st_size} bytes)")
            return
    raise AssertionError(f"{out} stays over {SHOT_BYTES} bytes")


def metric_values(page) -> dict[str, str]:
    """The page's st.metric numbers, by label."""
    out = {}
    for m in page.locator("[data-testid='stMetric']").all():
        label = m.locator("[data-testid='stMetricLabel']").inner_text().strip()
        out[label] = m.locator("[data-testid='stMetricValue']").inner_text().strip()
    return out


def test_default_calibration_renders_charts_in_chromium(server):
    from playwright.sync_api import sync_playwright

    OUT.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(server)
        page.wait_for_selector("[data-testid='stApp'][data-test-script-state='notRunning']")
        page.get_by_role("button", name="Run the default").click()
        start = time.time()
        # The Calibrate page draws its charts once the background job has finished (the home
        # page has a chart of its own, so wait for the Calibrate page's heading of the results).
        page.get_by_text("Every layer's input range, right after init").wait_for(timeout=300_000)
        page.wait_for_selector("[data-testid='stApp'][data-test-script-state='notRunning']")
        seconds = time.time() - start
        # Plotly draws asynchronously: wait until every chart has its SVG with traces in it.
        try:
            page.wait_for_function(
                """() => {
                    const charts = document.querySelectorAll("[data-testid='stPlotlyChart']");
                    return charts.length >= 2 && [...charts].every(
                        (c) => c.querySelector('.js-plotly-plot .main-svg .trace'));
                }""",
                timeout=60_000,
            )
        finally:  # what the page showed, also when the charts never came
            page.screenshot(path=str(OUT / "calibrate.png"), full_page=True)
        assert page.locator("[data-testid='stException']").count() == 0
        assert page.locator("[data-testid='stPlotlyChart']").count() >= 2
        assert page.locator(".js-plotly-plot .trace").count() > 0
        page.screenshot(path=str(OUT / "calibrate.png"), full_page=True)
        charts = page.locator("[data-testid='stPlotlyChart']")
        readme_shot(charts.nth(0), "calibrate-ranges")
        readme_shot(charts.nth(1), "calibrate-histograms")
        (OUT / "timing.txt").write_text(f"default calibration to charts: {seconds:.1f} s\n")
        browser.close()


def expected_lab_numbers(layer: str, bits: int, lo: float, hi: float) -> dict[str, float]:
    """The Range lab's numbers for the LSQ+ grid spanning [lo, hi] on ``layer``'s input, computed
    apart from ``lsq.lab``: the float model (no wrappers) on the app's first eval views, the
    layer's input quantized by the paper's formula in a hook, KL(float || quantized) per view."""
    import torch
    import torch.nn.functional as F

    from lsq.explorer import LAB_VIEWS, Settings
    from lsq.pipeline import prepare

    default = Settings()
    bench = prepare(default.model, default.data)
    model, views = bench.model.eval(), bench.eval[:LAB_VIEWS]
    qmax = 2**bits - 1
    s, b = (hi - lo) / qmax, lo  # the unsigned grid [0, qmax], its offset at the low end
    got = {}

    def quantize(module, inputs):
        x = inputs[0]
        v = (x - b) / s
        xq = torch.clamp(torch.round(v), 0, qmax) * s + b
        err = (xq.double() - x.double()) ** 2
        outside = (v < 0) | (v > qmax)
        got["clip"] = float(err[outside].sum() / x.numel())
        return (xq,)

    with torch.no_grad():
        reference = model(views)
        handle = dict(model.named_modules())[layer].register_forward_pre_hook(quantize)
        try:
            out = model(views)
        finally:
            handle.remove()
    p_ref = F.log_softmax(reference.double(), -1)
    kl = (p_ref.exp() * (p_ref - F.log_softmax(out.double(), -1))).sum(-1).mean()
    agree = (out.argmax(-1) == reference.argmax(-1)).double().mean()
    return {"clip": got["clip"], "kl": float(kl), "agreement": float(agree)}


def test_range_lab_moves_with_a_slider_in_chromium(server):
    """Move the lab's range several times in a row (its upper end, by keyboard, without waiting
    between keys, as a user can): the page ends on the last range, showing that range's own
    numbers (against an independent computation), not a stale one's."""
    from playwright.sync_api import sync_playwright

    from lsq.explorer import Settings

    OUT.mkdir(parents=True, exist_ok=True)
    shot = OUT / "range-lab.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.goto(f"{server}/lab")
        page.wait_for_selector(READY)
        if page.get_by_text("Calibrate first").count():  # run alone: calibrate the default
            page.goto(server)
            page.wait_for_selector(READY)
            page.get_by_role("button", name="Run the default").click()
            page.get_by_text("Every layer's input range, right after init").wait_for(
                timeout=300_000
            )
            page.goto(f"{server}/lab")
        page.get_by_text("Clipping error (MSE)").wait_for(timeout=120_000)
        page.wait_for_selector(READY)
        page.wait_for_function(CHARTS_DRAWN, timeout=60_000)
        before = metric_values(page)
        ends = page.locator(".st-key-lab_range input[type='range']")
        start = [float(v) for v in ends.evaluate_all("(es) => es.map((e) => e.value)")]
        ends.last.focus()
        for _ in range(4):  # four tenths of the slider down, key after key: the top is clipped
            page.keyboard.press("PageDown")
            page.wait_for_timeout(60)
        lo, hi = (float(v) for v in ends.evaluate_all("(es) => es.map((e) => e.value)"))
        assert lo == start[0] and hi < start[1] - 0.3 * (start[1] - start[0])
        # Settled: no run left, and the caption names the range the slider ends on.
        page.wait_for_function(
            """(hi) => {
                const app = document.querySelector("[data-testid='stApp']");
                const text = [...document.querySelectorAll("[data-testid='stCaptionContainer']")]
                    .map((e) => e.innerText).join(" ");
                const m = text.match(/Range \\[([-0-9.e+]+), ([-0-9.e+]+)\\]/);
                return app.dataset.testScriptState === "notRunning" && m
                    && Math.abs(parseFloat(m[2]) - hi) <= 1e-3 * Math.abs(hi);
            }""",
            arg=hi,
            timeout=60_000,
        )
        page.wait_for_function(CHARTS_DRAWN, timeout=60_000)
        page.screenshot(path=str(shot), full_page=True)
        print(f"range lab screenshot: {shot}")
        readme_shot(page, "range-lab")
        after = metric_values(page)
        assert page.locator("[data-testid='stException']").count() == 0
        layer = page.locator(".st-key-lab_layer input").input_value()
        browser.close()
    want = expected_lab_numbers(layer, Settings().a_bits, lo, hi)
    assert float(after["Clipping error (MSE)"]) > float(before["Clipping error (MSE)"])
    assert float(after["Clipping error (MSE)"]) == pytest.approx(want["clip"], rel=6e-3)
    assert float(after["Model KL to float"]) == pytest.approx(want["kl"], abs=1.2e-4)
    assert after["Top-1 agreement"] == f"{want['agreement']:.0%}"


def test_repair_link_opens_the_train_page_on_the_recipe_it_names(server):
    """At W4A4 (set through the page's address, as a shared link does) every method collapses
    right after init; the Calibrate page's link names a recipe, and the Train page opens on it."""
    from playwright.sync_api import sync_playwright

    from lsq.explorer import RECIPES

    OUT.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(f"{server}/calibrate?w_bits=4&a_bits=4&res=64&views=32")
        page.wait_for_selector(READY)
        page.get_by_role("button", name=re.compile(r"^Calibrate \d method")).click()
        link = page.get_by_role("link", name=re.compile("^Repair it on the Train page"))
        link.wait_for(timeout=300_000)
        named = link.inner_text().split(": ", 1)[1].strip()
        (recipe,) = [label for label in RECIPES.values() if label.lower() == named]
        link.click()
        page.get_by_text("Recipe").first.wait_for(timeout=60_000)
        page.wait_for_selector(READY)
        page.screenshot(path=str(OUT / "train-after-repair.png"), full_page=True)
        readme_shot(page, "train")
        assert page.get_by_role("radio", name=recipe).is_checked()
        assert page.locator("[data-testid='stException']").count() == 0
        browser.close()


SITECUSTOMIZE = """
import os, sys
layer, amount = os.environ["LSQ_TEST_PLANT_BIAS"].rsplit("=", 1)
sys.path[:0] = [{root!r}, {tests!r}]
import pytest
from helpers import plant_bias_error
plant_bias_error(pytest.MonkeyPatch(), layer, float(amount))
"""


def test_an_export_below_the_parity_bar_warns_in_chromium(tmp_path_factory):
    """The Runs page's ONNX export of a run whose exporter is wrong at one layer says so, and
    names that layer, in the browser."""
    from playwright.sync_api import sync_playwright

    from lsq.cli import main

    runs = tmp_path_factory.mktemp("faulty-runs")
    argv = ["--runs-dir", str(runs), "run", "--resolution", "64", "--calib", "8"]
    assert main([*argv, "--eval-views", "8", "--steps", "0", "--eager"]) == 0
    plant = tmp_path_factory.mktemp("plant")
    (plant / "sitecustomize.py").write_text(
        SITECUSTOMIZE.format(root=str(ROOT), tests=str(ROOT / "tests"))
    )
    OUT.mkdir(parents=True, exist_ok=True)
    with (
        streamlit_server(
            tmp_path_factory,
            LSQ_RUNS_DIR=str(runs),
            PYTHONPATH=str(plant),
            LSQ_TEST_PLANT_BIAS="blocks.3.1.conv_dw=0.5",
        ) as url,
        sync_playwright() as p,
    ):
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(f"{url}/runs")
        page.wait_for_selector(READY)
        page.get_by_role("button", name="Export ONNX").click()
        warning = page.locator("[data-testid='stAlert']", has_text="parity bar")
        try:
            warning.wait_for(timeout=300_000)
        finally:  # what the page showed, also when the warning never came
            page.screenshot(path=str(OUT / "export-warning.png"), full_page=True)
        assert "First diverging layer: blocks.3.1.conv_dw" in warning.inner_text()
        assert page.get_by_role("button", name="Download model.onnx").count() == 1
        assert page.locator("[data-testid='stException']").count() == 0
        browser.close()
