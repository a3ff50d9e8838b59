"""The Range lab under the fingers: a slider move's time until its numbers change, in Chromium.

    .venv/bin/python bench/lab_speed.py                # ~4 min on 2 cores (Chromium included)
    .venv/bin/python bench/lab_speed.py --moves 10 --layers conv_stem,blocks.0.0.conv_dw

The app (``streamlit run app.py``) in Debian's Chromium, driven by Playwright: the default
calibration (bundled Lite0, 224 px, W8A4), then the Range lab; for each layer, the range's upper
end moved by the keyboard (PageDown / PageUp alternately, as a user can) ``--moves`` times, each
timed from the keypress to the clipping error and the model's KL both showing new numbers (the
page's own "Update: N ms" is the model's part alone). Median and worst per layer.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.app_speed import ARGS, CHROMIUM, READY, serve  # noqa: E402

LAYERS = (
    "conv_stem,blocks.0.0.conv_dw,blocks.1.0.conv_pw,blocks.3.0.conv_pw,blocks.5.0.conv_dw,"
    "conv_head"
)
METRICS = """() => Object.fromEntries(
    [...document.querySelectorAll("[data-testid='stMetric']")].map((m) => [
        m.querySelector("[data-testid='stMetricLabel']").innerText.trim(),
        m.querySelector("[data-testid='stMetricValue']").innerText.trim(),
    ]))"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--moves", type=int, default=10)
    p.add_argument("--layers", default=LAYERS)
    args = p.parse_args()
    from playwright.sync_api import sync_playwright

    rows = []
    tmp = tempfile.TemporaryDirectory()
    with tmp, serve(Path(tmp.name)) as (url, _), sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.goto(f"{url}/calibrate")
        page.wait_for_selector(READY)
        page.get_by_role("button", name="Calibrate 4 method(s)").click()
        page.get_by_text("Every layer's input range, right after init").wait_for(timeout=600_000)
        page.goto(f"{url}/lab")
        page.get_by_text("Clipping error (MSE)").wait_for(timeout=120_000)
        for layer in [x.strip() for x in args.layers.split(",") if x.strip()]:
            page.locator(".st-key-lab_layer input").click()
            page.keyboard.type(layer)
            page.get_by_role("option", name=layer, exact=True).click()
            page.wait_for_selector(READY, timeout=120_000)
            times = []
            for k in range(args.moves):
                before = page.evaluate(METRICS)
                high = page.locator(".st-key-lab_range input[type='range']").last
                high.focus()
                t0 = time.perf_counter()
                page.keyboard.press("PageDown" if k % 2 == 0 else "PageUp")
                page.wait_for_function(
                    """([js, before]) => {
                        const now = eval(js)();
                        return now["Clipping error (MSE)"] !== before["Clipping error (MSE)"]
                            && now["Model KL to float"] !== before["Model KL to float"];
                    }""",
                    arg=[METRICS, before],
                    timeout=60_000,
                    polling=20,
                )
                times.append(time.perf_counter() - t0)
                page.wait_for_selector(READY)
            rows.append((layer, statistics.median(times), max(times)))
            print(f"  {layer}: {[round(t, 2) for t in times]}", file=sys.stderr, flush=True)
        browser.close()
    print(f"{args.moves} moves per layer, default calibration (224 px, W8A4), Chromium\n")
    print("| layer | median s | worst s |\n|---|---|---|")
    for layer, med, worst in rows:
        print(f"| {layer} | {med:.2f} | {worst:.2f} |")


if __name__ == "__main__":
    main()
