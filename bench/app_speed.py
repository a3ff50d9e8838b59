"""Training in the browser against the same engine headless, measured in one run.

    .venv/bin/python bench/app_speed.py             # ~5 min on 2 cores (Chromium included)
    .venv/bin/python bench/app_speed.py --steps 20

1. The app (``streamlit run app.py``) in Debian's Chromium, driven by Playwright as a user: "Run
   the default" (the bundled Lite0 at 224 px, four methods at W8A4), then the Train page's QAT of
   ``--methods`` for ``--steps`` steps; the page's own "finished in N s" is the time, with the
   live view on screen the whole while (the browser shares the machine's cores).
2. The same calibration and ``lsq.explorer.train_job`` call with the same settings in this
   process, no server and no browser: ``job.elapsed`` of the training job.

The two never run at the same time. The ratio browser / headless is the number to watch.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
]  # fmt: skip
READY = "[data-testid='stApp'][data-test-script-state='notRunning']"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def browser_seconds(steps: int, methods: list[str], runs: Path) -> float:
    """The Train page's own time for the QAT job, in Chromium against a fresh server."""
    from playwright.sync_api import sync_playwright

    port = _free_port()
    env = dict(os.environ, LSQ_RUNS_DIR=str(runs))
    server = subprocess.Popen(
        [
            sys.executable, "-m", "streamlit", "run", str(ROOT / "app.py"),
            "--server.headless", "true", "--server.port", str(port),
            "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false",
        ],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                    break
            except OSError:
                time.sleep(0.5)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url)
            page.wait_for_selector(READY)
            page.get_by_role("button", name="Run the default").click()
            page.get_by_text("Every layer's input range, right after init").wait_for(
                timeout=600_000
            )
            page.goto(f"{url}/train")
            page.wait_for_selector(READY)
            page.get_by_text("QAT steps").wait_for(timeout=60_000)
            box = page.get_by_label("QAT steps")
            box.fill(str(steps))
            box.press("Enter")  # commits the number; starts nothing
            page.wait_for_selector(READY)
            page.get_by_role("button", name="Train", exact=True).click()
            done = page.get_by_text(re.compile(r"finished in \d+ s"))
            done.wait_for(timeout=1_800_000)
            seconds = float(re.search(r"finished in (\d+) s", done.inner_text()).group(1))
            browser.close()
        return seconds
    finally:
        server.terminate()
        server.wait(30)


def headless_seconds(steps: int, methods: list[str]) -> float:
    """The same calibration and training job, in this process."""
    from lsq.explorer import Settings, calibrate_job, train_job
    from lsq.jobs import Job, JobManager
    from lsq.train import TrainConfig

    settings = Settings()
    manager = JobManager()
    calib = manager.wait(
        manager.submit(Job("calibrate", "Calibration"), lambda j: calibrate_job(j, settings)),
        1800,
    )
    comp = calib.result
    cfg = TrainConfig(steps=steps, device=settings.device)
    job = manager.wait(
        manager.submit(Job("train", "QAT"), lambda j: train_job(j, comp, methods, cfg)), 1800
    )
    if job.status != "done":
        raise SystemExit(f"headless training {job.status}: {job.message}")
    return job.elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument(
        "--methods", default="lsq+,lsq", help="the Train page's default two (what it trains)"
    )
    args = p.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["LSQ_RUNS_DIR"] = tmp
        browser = browser_seconds(args.steps, methods, Path(tmp))
        headless = headless_seconds(args.steps, methods)
    print(
        f"{os.cpu_count()} cores; QAT of {', '.join(methods)}, {args.steps} steps, W8A4, 224 px\n"
    )
    print("| where | seconds |\n|---|---|")
    print(f"| Train page in Chromium (the page's own time) | {browser:.0f} |")
    print(f"| the same train_job headless | {headless:.0f} |")
    print(f"| ratio | {browser / headless:.2f} |")


if __name__ == "__main__":
    main()
