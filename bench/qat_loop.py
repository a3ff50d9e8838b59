"""The QAT loop's step as the app and the CLI run it, against a float training step.

    .venv/bin/python bench/qat_loop.py                      # ~2 min on 2 cores
    .venv/bin/python bench/qat_loop.py --code /path/to/checkout   # another version's loop

One QAT step of ``lsq.train.train`` (the bundled EfficientNet-Lite0 quantized LSQ+ W4A4, 160 px,
batch 16, distillation, compiled quantizer kernels) includes what the loop does around the
update: drawing the batch, the NaN policy's state, the quantizer snapshot and the weight flips
read back every ``record_every`` steps. Its time per step is divided by a plain float training
step (forward, distillation loss, backward, Adam) of the same model and batch, timed in the same
process, rounds interleaved (median of per-round ratios), so the ratio can be compared between
versions of the code run one after another (``--code``). bench/speed.py times the bare
quantized step without the loop.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=10, help="QAT steps per round (default 10)")
    p.add_argument("--record-every", type=int, nargs="+", default=[1, 10])
    p.add_argument("--code", default=str(ROOT), help="the checkout whose lsq/ is timed")
    args = p.parse_args()
    sys.path.insert(0, str(Path(args.code).resolve()))

    import torch

    from lsq.calibrate import calibrate
    from lsq.config import make_config
    from lsq.convert import quantize_model
    from lsq.data import bundled_images, make_views

    try:
        from lsq.metrics import distillation_loss
    except ImportError:  # a checkout from before lsq/metrics.py held it
        from lsq.train import distillation_loss
    from lsq.models import load_model
    from lsq.train import TrainConfig, train

    torch.set_num_threads(2)
    loaded = load_model()
    teacher = loaded.model.eval()
    views = make_views(bundled_images("calibration"), 64, 160, loaded.data_config, seed=0)
    cfg = make_config("lsq+", 4, 4)
    qmodel = copy.deepcopy(teacher)
    quantize_model(qmodel, cfg)
    calibrate(qmodel, list(views.split(16)), cfg)
    eval_views = views[:1]  # the last step evaluates: keep it cheap
    with torch.no_grad():
        teacher_logits = (teacher(views), teacher(eval_views))
    fields = {f.name for f in dataclasses.fields(TrainConfig)}

    def qat(record_every: int):
        extra = {"record_every": record_every} if "record_every" in fields else {}
        tc = TrainConfig(
            steps=args.steps, batch_size=16, eval_every=args.steps, device="cpu", **extra
        )

        def run() -> float:
            model = copy.deepcopy(qmodel)
            events = train(model, teacher, views, eval_views, tc, teacher_logits=teacher_logits)
            t0 = None
            for e in events:
                if e.kind == "eval" and e.step == 0:
                    t0 = time.perf_counter()
                if e.kind == "done":
                    return (time.perf_counter() - t0) / args.steps
            raise RuntimeError("training did not finish")

        return run

    fmodel = copy.deepcopy(teacher)
    opt = torch.optim.Adam(fmodel.parameters(), lr=1e-5)
    batch, target = views[:16], teacher_logits[0][:16]

    def float_step() -> float:
        t = time.perf_counter()
        for _ in range(args.steps):
            opt.zero_grad()
            distillation_loss(fmodel(batch), target).backward()
            opt.step()
        return (time.perf_counter() - t) / args.steps

    wanted = args.record_every if "record_every" in fields else [1]
    cases = {f"record every {k}": qat(k) for k in wanted}
    cases["float"] = float_step
    for fn in cases.values():  # warm-up: the one-off compile, the allocator
        fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, fn in cases.items():
            times[name].append(fn())
    sys.path.insert(0, str(ROOT))
    from bench.tables import stamp

    print(stamp() + "\n")
    print(f"code: {args.code}, torch {torch.__version__}, {torch.get_num_threads()} threads, ")
    print(f"{os.cpu_count()} cores; {args.rounds} rounds of {args.steps} steps each\n")
    print("| QAT loop (lsq.train.train) | ms/step | float ms/step | ratio (median of rounds) |")
    print("|---|---|---|---|")
    for name in cases:
        if name == "float":
            continue
        ratio = statistics.median(a / b for a, b in zip(times[name], times["float"], strict=True))
        print(
            f"| {name} | {1e3 * statistics.median(times[name]):.0f} | "
            f"{1e3 * statistics.median(times['float']):.0f} | {ratio:.2f} |"
        )


if __name__ == "__main__":
    main()
