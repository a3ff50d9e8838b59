"""Training in the browser against the same engine headless, measured in one run.

    .venv/bin/python bench/app_speed.py             # ~5 min on 2 cores (Chromium included)
    .venv/bin/python bench/app_speed.py --recipe reconstruct --resolution 160 --methods lsq+

1. The app (``streamlit run app.py``) in Debian's Chromium, driven by Playwright as a user: the
   Calibrate page at ``--resolution`` (four methods at W8A4, the sidebar's settings through the
   page's address), then the Train page's QAT (``--steps``) or block-wise reconstruction
   (``--iters`` per block) of ``--methods``; the page's own "finished in N s" is the time, with
   the live view on screen the whole while (the browser shares the machine's cores).
2. The same calibration and ``lsq.explorer.train_job`` call with the same settings in this
   process, no server and no browser: ``job.elapsed`` of the training job.

The two never run at the same time. The ratio browser / headless is the number to watch; the
CPU seconds say where the browser's time went (the server's process, training included;
Chromium; anything else; the cores' idle time).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
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

from bench.tables import stamp  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
]  # fmt: skip
READY = "[data-testid='stApp'][data-test-script-state='notRunning']"
#: Every plotly chart on the page has drawn its SVG with traces in it (plotly draws after React).
CHARTS_DRAWN = """() => {
    const charts = document.querySelectorAll("[data-testid='stPlotlyChart']");
    return charts.length >= 1 && [...charts].every(
        (c) => c.querySelector('.js-plotly-plot .main-svg .trace'));
}"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process so far (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _chromium_pids() -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if "chromium" in (d / "cmdline").read_bytes().split(b"\0")[0].decode():
                    pids.append(int(d.name))
            except (OSError, UnicodeDecodeError):
                pass
    return pids


def _machine() -> tuple[float, float]:
    """The machine's busy and idle CPU seconds so far (all cores, /proc/stat)."""
    ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    idle = ticks[3] + ticks[4]
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK"), idle / os.sysconf("SC_CLK_TCK")


def _cpu(server: int) -> dict[str, float]:
    busy, idle = _machine()
    return {
        "server": _cpu_seconds(server),
        "chromium": sum(_cpu_seconds(p) for p in _chromium_pids()),
        "busy": busy,
        "idle": idle,
    }


@contextlib.contextmanager
def serve(runs: Path, log=subprocess.DEVNULL, **env):
    """``streamlit run app.py`` on a free port with ``runs`` as its runs folder and ``env`` added
    to its environment, its output to ``log``: its URL and process. Raises when it does not
    answer within 60 s (the benchmarks and the browser tests both start it here)."""
    port = _free_port()
    server = subprocess.Popen(
        [
            sys.executable, "-m", "streamlit", "run", str(ROOT / "app.py"),
            "--server.headless", "true", "--server.port", str(port),
            "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false",
        ],
        cwd=ROOT, env=dict(os.environ, LSQ_RUNS_DIR=str(runs), **env),
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                    break
            except OSError:
                pass
            if time.time() > deadline:
                raise RuntimeError("streamlit did not answer /_stcore/health within 60 s")
            time.sleep(0.5)
        yield url, server
    finally:
        server.terminate()
        server.wait(30)


def browser_seconds(args, methods: list[str], runs: Path) -> tuple[float, dict[str, float]]:
    """The Train page's own time for the job, in Chromium against a fresh server, and the CPU
    seconds the server (training included) and Chromium spent while it ran."""
    from playwright.sync_api import sync_playwright

    from lsq.explorer import RECIPES

    with serve(runs) as (url, server):
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{url}/calibrate?res={args.resolution}")  # the sidebar's settings
            page.wait_for_selector(READY)
            page.get_by_role("button", name=re.compile(r"^Calibrate \d method")).click()
            page.get_by_text("Every layer's input range, right after init").wait_for(
                timeout=600_000
            )
            page.goto(f"{url}/train")
            page.wait_for_selector(READY)
            page.get_by_text("Methods to train").wait_for(timeout=60_000)
            if len(methods) == 1:  # the page chooses two: drop the second
                page.locator(".st-key-train_methods input").press("Backspace")
                page.wait_for_selector(READY)
            if args.recipe == "reconstruct":
                page.get_by_text(RECIPES["reconstruct"], exact=True).click()
                page.wait_for_selector(READY)
                field, value = "Reconstruction iterations per block", args.iters
            else:
                field, value = "QAT steps", args.steps
            page.get_by_text(field).wait_for(timeout=60_000)
            box = page.get_by_label(field)
            box.fill(str(value))
            box.press("Enter")  # commits the number; starts nothing
            page.wait_for_selector(READY)
            chosen = page.locator(".st-key-train_methods").inner_text()
            if any(m not in chosen.split() for m in methods):
                raise SystemExit(f"the page trains {chosen!r}, not {methods}")
            before = _cpu(server.pid)
            page.get_by_role("button", name="Train", exact=True).click()
            done = page.get_by_text(re.compile(r"finished in \d+ s"))
            done.wait_for(timeout=1_800_000)
            after = _cpu(server.pid)
            seconds = float(re.search(r"finished in (\d+) s", done.inner_text()).group(1))
            browser.close()
        return seconds, {k: after[k] - before[k] for k in after}


def headless_seconds(args, methods: list[str]) -> tuple[float, float]:
    """The same calibration and training job, in this process: its time and the CPU seconds the
    process spent on it."""
    from lsq.explorer import Settings, calibrate_job, train_job
    from lsq.jobs import Job, JobManager
    from lsq.reconstruct import ReconstructConfig
    from lsq.train import TrainConfig

    settings = Settings(data=dataclasses.replace(Settings().data, resolution=args.resolution))
    manager = JobManager()
    calib = manager.wait(
        manager.submit(Job("calibrate", "Calibration"), lambda j: calibrate_job(j, settings)),
        1800,
    )
    comp = calib.result
    cfg = recon = None
    if args.recipe == "reconstruct":
        recon = ReconstructConfig(iters=args.iters, device=settings.device)
    else:
        cfg = TrainConfig(steps=args.steps, device=settings.device)
    cpu = _cpu_seconds(os.getpid())
    job = manager.wait(
        manager.submit(
            Job("train", args.recipe), lambda j: train_job(j, comp, methods, cfg, recon_cfg=recon)
        ),
        1800,
    )
    if job.status != "done":
        raise SystemExit(f"headless training {job.status}: {job.message}")
    return job.elapsed, _cpu_seconds(os.getpid()) - cpu


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", choices=("qat", "reconstruct"), default="qat")
    p.add_argument("--steps", type=int, default=20, help="QAT steps (--recipe qat)")
    p.add_argument(
        "--iters", type=int, default=60, help="iterations per block (--recipe reconstruct)"
    )
    p.add_argument("--resolution", type=int, default=224)
    p.add_argument(
        "--methods",
        default="lsq+,lsq",
        help="the Train page's default two, or the first of them alone",
    )
    args = p.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["LSQ_RUNS_DIR"] = tmp
        browser, cpu = browser_seconds(args, methods, Path(tmp))
        headless, headless_cpu = headless_seconds(args, methods)
    work = f"QAT, {args.steps} steps" if args.recipe == "qat" else "block-wise reconstruction, "
    work += f"{args.iters} iterations per block" if args.recipe != "qat" else ""
    print(stamp() + "\n")
    print(f"{os.cpu_count()} cores; {work} of {', '.join(methods)}, W8A4, {args.resolution} px\n")
    print("| where | seconds | CPU seconds meanwhile |\n|---|---|---|")
    print(
        f"| Train page in Chromium (the page's own time) | {browser:.0f} | server "
        f"{cpu['server']:.0f}, Chromium {cpu['chromium']:.0f}, anything else "
        f"{cpu['busy'] - cpu['server'] - cpu['chromium']:.0f}, idle {cpu['idle']:.0f} |"
    )
    print(f"| the same train_job headless | {headless:.0f} | {headless_cpu:.0f} |")
    print(f"| ratio | {browser / headless:.2f} | |")


if __name__ == "__main__":
    main()
