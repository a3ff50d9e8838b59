"""How steady the time left is: a training job's own estimate, sampled while it runs.

    .venv/bin/python bench/eta.py              # ~6 min on 2 cores
    .venv/bin/python bench/eta.py --iters 20 --steps 20 --resolution 160

The Train page's recipe "block-wise reconstruction, then QAT" of two methods at W4A4, headless
(``lsq.explorer.train_job``), with the job's progress read every half second. Each reading gives
a predicted length of the whole job, elapsed + time left, two ways:
- **by cost** (what the page shows, ``Job.remaining``): the work left in seconds as estimated
  up front (each reconstruction unit's iteration timed once, a QAT step priced as an iteration
  of every unit, each method's work around them in forward passes), scaled by the pace
  measured since the first progress as it comes in;
- **by steps** (what the page showed before): elapsed / the share of iterations and steps done,
  each counting the same.
After the first 10 % of the job, the largest prediction over the smallest is the number to
watch (a steady estimate: near 1; the target: at most 2), with the worst reading's time.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.tables import stamp  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--resolution", type=int, default=160)
    p.add_argument("--iters", type=int, default=20, help="reconstruction iterations per block")
    p.add_argument("--steps", type=int, default=20, help="QAT steps")
    p.add_argument("--methods", default="lsq+,lsq")
    args = p.parse_args()

    from lsq.explorer import Settings, calibrate_job, train_job
    from lsq.jobs import Job, JobManager
    from lsq.pipeline import DataConfig
    from lsq.reconstruct import ReconstructConfig
    from lsq.train import TrainConfig

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    data = DataConfig(resolution=args.resolution, calib_views=32, eval_views=32)
    settings = Settings(data=data, w_bits=4, a_bits=4, methods=tuple(methods))
    manager = JobManager()
    calib = manager.submit(Job("calibrate", "c"), lambda j: calibrate_job(j, settings))
    comp = manager.wait(calib, 1800).result
    cfg = TrainConfig(steps=args.steps, device=settings.device)
    recon = ReconstructConfig(iters=args.iters, device=settings.device)
    job = manager.submit(
        Job("train", "t"), lambda j: train_job(j, comp, methods, cfg, recon_cfg=recon)
    )
    readings = []  # (elapsed, predicted by cost, predicted by steps)
    while job.active:
        time.sleep(0.5)
        left, by_steps = job.remaining, (job.done / job.total if job.total else 0.0)
        if left is not None and by_steps > 0:
            readings.append((job.elapsed, job.elapsed + left, job.elapsed / by_steps))
    if job.status != "done":
        raise SystemExit(f"training {job.status}: {job.message}")
    length = job.elapsed
    late = [r for r in readings if r[0] >= 0.1 * length]
    print(stamp() + "\n")
    print(
        f"{os.cpu_count()} cores; {', '.join(methods)} at W4A4, {args.resolution} px: "
        f"reconstruction {args.iters} iterations per block, then {args.steps} QAT steps; "
        f"the job took {length:.0f} s; {len(late)} readings after its first 10 %\n"
    )
    print("| counted | predicted length: lowest | highest | highest / lowest |")
    print("|---|---|---|---|")
    for name, col in (("by cost (the page)", 1), ("by steps (before)", 2)):
        low = min(late, key=lambda r: r[col])
        high = max(late, key=lambda r: r[col])
        print(
            f"| {name} | {low[col]:.0f} s (at {low[0]:.0f} s) | {high[col]:.0f} s "
            f"(at {high[0]:.0f} s) | {high[col] / low[col]:.2f} |"
        )


if __name__ == "__main__":
    main()
