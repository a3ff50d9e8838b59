"""Run the benchmarks and rewrite docs/RESULTS.md, and the README's headline table from it.

    .venv/bin/python bench/results.py                      # every section, one after another
    .venv/bin/python bench/results.py --only headline,cv   # these sections; the rest kept
    .venv/bin/python bench/results.py --quick              # smoke sizes, to test-output/ only
    .venv/bin/python bench/results.py --list               # the sections and their commands

Each section of docs/RESULTS.md is the output of its commands, run one at a time (never two
timings at once) with 2 threads, between ``<!-- results: KEY -->`` markers. Every benchmark prints
its own stamp line above its tables (``bench.tables.stamp``: the commit, the date, the machine,
torch, the command), so a table says where it comes from. A section whose command fails, or
cannot run here (Chromium or CUDA missing), keeps what the file had. The README's block between
``<!-- headline -->`` markers is copied from the ``headline`` section (tests/test_docs.py checks
that they agree and that every table carries a stamp).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "RESULTS.md"
README = ROOT / "README.md"
SECTION = re.compile(
    r"<!-- results: (?P<key>[\w-]+) -->\n(?P<body>.*?)<!-- /results: (?P=key) -->", re.DOTALL
)
HEADLINE = re.compile(r"(<!-- headline[^>]*-->\n)(.*?)(<!-- /headline -->)", re.DOTALL)
TABLE_OR_STAMP = re.compile(r"^(\*Measured at .*\*|\|.*\|)$")


@dataclasses.dataclass(frozen=True)
class Section:
    key: str
    title: str
    about: str  # what the tables measure, in words (no number here: numbers come from a run)
    runs: tuple[tuple[str, ...], ...]  # each: a script under bench/ and its arguments
    quick: tuple[tuple[str, ...], ...]  # the same at a smoke size
    needs: str = ""  # "chromium" or "cuda": skipped where missing


METHODS4 = "lsq+,lsq,lsq-signed,minmax"
SECTIONS = (
    Section(
        "headline",
        "Headline: LSQ+ beside LSQ, signed LSQ and min/max",
        "W8A4 right after init (the app's default demo), and W4A4 after the low-bit recipe "
        "(block-wise reconstruction, no QAT), at 160 px. Agreement is top-1 agreement with the "
        "float model, KL is KL(float || quantized), on held-out views of photos the ranges never "
        "saw and, in the `calib` columns, on the calibration views the ranges were fitted to (a "
        "method much better there has fitted those photos).",
        (
            (
                "lowbit.py",
                "--bits",
                "8/4",
                "--resolution",
                "160",
                "--iters",
                "0",
                "--steps",
                "0",
                "--methods",
                METHODS4,
            ),
            (
                "lowbit.py",
                "--bits",
                "4/4",
                "--resolution",
                "160",
                "--steps",
                "0",
                "--methods",
                METHODS4,
            ),
        ),
        (
            ("lowbit.py", "--quick", "--iters", "0", "--steps", "0", "--methods", "lsq+,minmax"),
            ("lowbit.py", "--quick", "--steps", "0", "--methods", "lsq+,minmax"),
        ),
    ),
    Section(
        "cv",
        "Cross-validated by scene",
        "The low-bit recipe on every fold of the 17 bundled photos (16 scenes; the stereo pair "
        "is one), each fold held out in turn while the others calibrate and reconstruct: the "
        "mean and spread of the held-out agreement and KL, beside the same recipe on the standard "
        "split. This is the protocol that chooses the recipe's defaults.",
        (
            (
                "lowbit.py",
                "--skip-main",
                "--folds",
                "4",
                "--bits",
                "4/4,3/3",
                "--resolution",
                "160",
                "--steps",
                "0",
                "--methods",
                "lsq+,lsq,minmax",
            ),
        ),
        (
            (
                "lowbit.py",
                "--skip-main",
                "--quick",
                "--folds",
                "2",
                "--steps",
                "0",
                "--methods",
                "lsq+",
            ),
        ),
    ),
    Section(
        "speed",
        "Speed of the quantizer",
        "Ratios are medians of per-round ratios, competitors timed interleaved in one process, "
        "once with the default allocator and once with freed memory reused. `native` is "
        "PyTorch's learnable fake-quant op (a speed reference: its zero point is rounded), "
        "`clone` the memory-traffic floor; `compiled` kernels are the same arithmetic fused by "
        "`torch.compile` (tested equal to eager).",
        (("speed.py", "--rounds", "9"),),
        (("speed.py", "--rounds", "1"),),
    ),
    Section(
        "qat-loop",
        "The QAT loop around the step",
        "One step of `lsq.train.train` as the app runs it (LSQ+ W4A4, 160 px, batch 16, compiled "
        "kernels), with what the loop does around the update, against a plain float training "
        "step timed in the same process.",
        (("qat_loop.py",),),
        (("qat_loop.py", "--rounds", "1", "--steps", "2"),),
    ),
    Section(
        "app-speed",
        "Training in the browser",
        "The Train page's QAT in Chromium on the same cores, by the page's own time, against the "
        "same calibration and training job headless in one process afterwards (never both at "
        "once), with the CPU seconds spent meanwhile.",
        (("app_speed.py",),),
        (("app_speed.py", "--steps", "2", "--resolution", "64", "--methods", "lsq+"),),
        needs="chromium",
    ),
    Section(
        "lab-speed",
        "The Range lab under the fingers",
        "The default calibration in Chromium, then the Range lab: for each layer, its range moved "
        "by the keyboard, each move timed from the keypress until the layer's own numbers change "
        "and until the model's KL does; then the lab alone, without the browser.",
        (("lab_speed.py",), ("lab_speed.py", "--headless")),
        (("lab_speed.py", "--headless", "--moves", "2"),),
        needs="chromium",
    ),
    Section(
        "eta",
        "The time left",
        "The Train page's time left during reconstruction then QAT, read every half second: how "
        "far the predicted length of the whole job moves after its first tenth, counted by cost "
        "(what the page shows) and by steps.",
        (("eta.py",),),
        (("eta.py", "--iters", "2", "--steps", "2", "--resolution", "64"),),
    ),
    Section(
        "export",
        "Export parity and latency",
        "The ONNX Runtime model against the project's fake-quant model (agreement, KL, logit SQNR) "
        "for each offset route, and its CPU latency; then every method and bit-width the app "
        "offers through the user's own export path.",
        (("export.py",), ("export_parity.py",)),
        (("export.py", "--quick"), ("export_parity.py", "--quick")),
    ),
    Section(
        "quality",
        "The paper's claims",
        "Methods x bit-widths right after init and after a short QAT; LSQ+ with MSE against "
        "min/max activation init across training seeds; the MSE each activation init reaches.",
        (("quality.py",),),
        (
            (
                "quality.py",
                "--steps",
                "0",
                "--calib",
                "8",
                "--eval-views",
                "8",
                "--resolution",
                "64",
                "--bits",
                "4",
                "--seeds",
                "2",
                "--variance-bits",
                "4",
            ),
        ),  # fmt: skip
    ),
)


def available(need: str) -> bool:
    if need == "chromium":
        return shutil.which("chromium") is not None
    if need == "cuda":
        import torch

        return torch.cuda.is_available()
    return True


def demote(text: str) -> str:
    """A benchmark's own headings below the section's (``###`` at the highest)."""
    return re.sub(r"^#{1,2} ", "### ", text, flags=re.MULTILINE)


def run_section(section: Section, quick: bool) -> str:
    """The section's body: its words, then each command's output. Raises on a failed command."""
    parts = [f"## {section.title}\n\n{section.about}\n"]
    env = dict(os.environ, OMP_NUM_THREADS="2", MKL_NUM_THREADS="2", PYTHONUNBUFFERED="1")
    for script, *args in section.quick if quick else section.runs:
        cmd = [sys.executable, str(ROOT / "bench" / script), *args]
        print(f"[{section.key}] {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{script} exited {done.returncode}: {done.stderr[-2000:]}")
        minutes = (time.perf_counter() - t0) / 60
        print(f"[{section.key}] done in {minutes:.1f} min", file=sys.stderr, flush=True)
        parts.append(demote(done.stdout.strip()) + "\n")
    return "\n".join(parts)


def placeholder(section: Section) -> str:
    command = f"`.venv/bin/python bench/results.py --only {section.key}`"
    return f"## {section.title}\n\n{section.about}\n\nNot measured yet: {command}.\n"


def sections_of(text: str) -> dict[str, str]:
    return {m["key"]: m["body"] for m in SECTION.finditer(text)}


def document(bodies: dict[str, str]) -> str:
    head = (
        "# Results\n\n"
        "Every table below is a benchmark's own output, with the stamp it printed: the commit, "
        "the date, the machine and the command. `.venv/bin/python bench/results.py` reruns them "
        "and rewrites this page (`--only KEY` for one section); nothing here is typed by hand. "
        "On a GPU: [GPU.md](GPU.md).\n"
    )
    blocks = [
        f"<!-- results: {s.key} -->\n{bodies[s.key].strip()}\n<!-- /results: {s.key} -->"
        for s in SECTIONS
    ]
    return head + "\n" + "\n\n".join(blocks) + "\n"


def headline_tables(body: str) -> str:
    """What the README shows of the headline section: each stamp and table, in order."""
    lines = body.splitlines()
    keep = [line for line in lines if TABLE_OR_STAMP.match(line)]
    out: list[str] = []
    for line in keep:  # a blank line between a table and the next stamp
        if line.startswith("*Measured") and out:
            out.append("")
        out.append(line)
        if line.startswith("*Measured"):
            out.append("")
    return "\n".join(out) + "\n"


def copy_headline(results: str, readme: str) -> str:
    body = sections_of(results).get("headline", "")
    if HEADLINE.search(readme) is None:
        raise SystemExit("README has no <!-- headline --> ... <!-- /headline --> block")
    return HEADLINE.sub(lambda m: m[1] + headline_tables(body) + m[3], readme)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default="", help="comma-separated section keys (default: all)")
    p.add_argument("--quick", action="store_true", help="smoke sizes; writes --out only")
    p.add_argument("--out", type=Path, default=None, help="the results file to write")
    p.add_argument(
        "--readme",
        type=Path,
        default=None,
        help="the README to copy the headline into (default: README.md, except with --quick)",
    )
    p.add_argument("--list", action="store_true", help="print the sections and stop")
    args = p.parse_args(argv)
    keys = {s.key for s in SECTIONS}
    only = [k.strip() for k in args.only.split(",") if k.strip()] or [s.key for s in SECTIONS]
    unknown = sorted(set(only) - keys)
    if unknown:
        p.error(f"unknown section(s) {', '.join(unknown)}: choose from {', '.join(sorted(keys))}")
    if args.list:
        for s in SECTIONS:
            for script, *rest in s.runs:
                print(f"{s.key:10} bench/{script} {' '.join(rest)}")
        return 0
    out = args.out or (ROOT / "test-output" / "RESULTS-quick.md" if args.quick else RESULTS)
    old = sections_of(out.read_text()) if out.exists() else {}
    bodies = {s.key: old.get(s.key) or placeholder(s) for s in SECTIONS}
    failed = []
    t0 = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    for section in SECTIONS:
        if section.key not in only:
            continue
        if not available(section.needs):
            print(f"[{section.key}] skipped: no {section.needs} here", file=sys.stderr)
            continue
        try:
            bodies[section.key] = run_section(section, args.quick)
        except RuntimeError as e:  # the old body stays; say which and go on
            print(f"[{section.key}] FAILED: {e}", file=sys.stderr)
            failed.append(section.key)
            continue
        out.write_text(document(bodies))  # after each section: a crash keeps what was measured
    out.write_text(document(bodies))  # also when no section ran: placeholders for new ones
    readme = args.readme or (None if args.quick else README)
    if readme is not None:
        readme.write_text(copy_headline(out.read_text(), readme.read_text()))
    print(f"wrote {out} in {(time.perf_counter() - t0) / 60:.1f} min", file=sys.stderr)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
