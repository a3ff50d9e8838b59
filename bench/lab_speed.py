"""The Range lab under the fingers: a slider move's time until its numbers change, in Chromium.

    .venv/bin/python bench/lab_speed.py                # ~4 min on 2 cores (Chromium included)
    .venv/bin/python bench/lab_speed.py --moves 10 --layers conv_stem,blocks.0.0.conv_dw
    .venv/bin/python bench/lab_speed.py --headless     # ~1 min: RangeLab alone, no browser

The app (``streamlit run app.py``) in Debian's Chromium, driven by Playwright: the default
calibration (bundled Lite0, 224 px, W8A4), then the Range lab; for each layer, the range's upper
end moved by the keyboard (PageDown / PageUp alternately, as a user can) ``--moves`` times, each
timed from the keypress to the layer's clipping error showing a new number, and to the model's KL
showing one (the page draws the layer's numbers first). Median and worst per layer.

``--headless``: the same layers and views without the app: ``RangeLab`` opened on the default
model, then its two parts for LSQ+'s MSE setting at the default activation bits, timed ``--moves``
times each (median): ``local`` (the layer's own numbers) and ``model_answer`` (KL, agreement).
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

from bench.app_speed import ARGS, CHARTS_DRAWN, CHROMIUM, READY, serve  # noqa: E402
from bench.tables import stamp  # noqa: E402

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
    p.add_argument("--headless", action="store_true", help="time RangeLab alone, no browser")
    args = p.parse_args()
    layers = [x.strip() for x in args.layers.split(",") if x.strip()]
    if args.headless:
        headless(layers, args.moves)
        return
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
        for layer in layers:
            page.locator(".st-key-lab_layer input").click()
            page.keyboard.type(layer)
            page.get_by_role("option", name=layer, exact=True).click()
            page.wait_for_selector(READY, timeout=120_000)
            page.wait_for_function(CHARTS_DRAWN, timeout=60_000)  # the layer seen, then moved
            local, model = [], []
            for k in range(args.moves):
                before = page.evaluate(METRICS)
                high = page.locator(".st-key-lab_range input[type='range']").last
                high.focus()
                t0 = time.perf_counter()
                page.keyboard.press("PageDown" if k % 2 == 0 else "PageUp")
                for label, times in (("Clipping error (MSE)", local), ("Model KL to float", model)):
                    page.wait_for_function(
                        """([js, before, label]) => eval(js)()[label] !== before[label]""",
                        arg=[METRICS, before, label],
                        timeout=60_000,
                        polling=10,
                    )
                    times.append(time.perf_counter() - t0)
                page.wait_for_selector(READY)
            rows.append((layer, local, model))
            rounded = [[round(t, 2) for t in ts] for ts in (local, model)]
            print(
                f"  {layer}: layer {rounded[0]} model {rounded[1]}",
                file=sys.stderr,
                flush=True,
            )
        browser.close()
    print(stamp() + "\n")
    print(f"{args.moves} moves per layer, default calibration (224 px, W8A4), Chromium\n")
    print("| layer | layer's numbers: median s | worst s | model's KL: median s | worst s |")
    print("|---|---|---|---|---|")
    for layer, local, model in rows:
        print(
            f"| {layer} | {statistics.median(local):.2f} | {max(local):.2f} "
            f"| {statistics.median(model):.2f} | {max(model):.2f} |"
        )


def headless(layers: list[str], moves: int) -> None:
    import torch

    from lsq.convert import quantize_model
    from lsq.explorer import LAB_VIEWS, Settings
    from lsq.lab import RangeLab
    from lsq.pipeline import prepare

    torch.set_num_threads(2)
    default = Settings()
    bench = prepare(default.model, default.data)
    quantize_model(bench.model, default.config("lsq+"))  # the lab turns every quantizer off
    views = bench.eval[:LAB_VIEWS]
    print(stamp() + "\n")
    print(f"RangeLab alone, {len(views)} views at {views.shape[-1]} px, median of {moves}\n")
    print("| layer | units rerun | open ms | layer's numbers ms | model's answer ms | both ms |")
    print("|---|---|---|---|---|---|")
    for layer in layers:
        t0 = time.perf_counter()
        lab = RangeLab(bench.model, layer, views)
        opened = time.perf_counter() - t0
        setting = lab.snap("mse", default.a_bits, "asymmetric")
        lab.evaluate(setting)  # a warm-up
        local = [lab.local(setting).seconds for _ in range(moves)]
        model = [lab.model_answer(setting).seconds for _ in range(moves)]
        both = [lab.evaluate(setting).seconds for _ in range(moves)]
        ms = [1000 * statistics.median(x) for x in (local, model, both)]
        print(
            f"| {layer} | {lab.units_run or 'all'} | {1000 * opened:.0f} | {ms[0]:.0f} "
            f"| {ms[1]:.0f} | {ms[2]:.0f} |"
        )


if __name__ == "__main__":
    main()
