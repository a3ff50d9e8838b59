"""``python -m lsq doctor``: every path a user runs, checked on this machine, in one table.

    python -m lsq doctor                 # one GPU: the paths at their real size
    python -m lsq doctor --tiny          # any machine: the same paths at a tiny size

The paths, in order, each one row of the table (path, ok or the error's first line, seconds,
notes):

1. **default flow**: what the app's "Run the default" does: the bundled EfficientNet-Lite0 and
   its views (224 px, 32 calibration and 32 evaluation views), lsq+, lsq, lsq-signed and minmax
   at W8A4 with the app's weight init, each initialised, evaluated and saved as a run.
2. **low-bit recipe**: LSQ+ W4A4, block-wise reconstruction then QAT, bf16 autocast. QAT reads
   its numbers on the host only at its last step (``record_every``) and, on CUDA, runs every
   step between under ``torch.cuda.set_sync_debug_mode("error")`` (``sync_check``), so a step
   that waits on the host fails this path instead of silently slowing every step.
3. **export**: that result saved as a run and exported to ONNX (QDQ), with the parity of ONNX
   Runtime against the fake-quant model.
4. **torchrun train + resume**: ``lsq train`` under torchrun with one process on a folder made
   of the bundled photos, killed (SIGKILL) right after its first checkpoint as a crash or a job
   limit would, then the same command with ``--resume``, which must reach the last step.
5. **QAT step vs float step**: one training step at batch 128, 224 px, bf16 autocast, of the
   float model and of the model quantized LSQ+ W4A4 with compiled quantizer kernels; ms per step
   of each and the peak GPU memory.

On the CPU (and with ``tiny``) every path runs at a tiny size (64 px, a few views, iterations
and steps, eager quantizer kernels), so CI keeps this command working; the numbers then say
nothing about a GPU. Each path runs on its own: a failure is its row (the exception's first
line) and never stops the others; the exit status is 0 when every row is ok, else 1. Nothing is
downloaded (the bundled model; timm's ``test_efficientnet`` with random weights) and nothing is
written outside a temporary folder.
"""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from lsq.device import resolve_device
from lsq.errors import LSQError
from lsq.pipeline import DataConfig, MethodResult, ModelSpec, Workbench
from lsq.status import Status
from lsq.train import make_optimizer, param_groups, step_loss, update

#: The paths the doctor checks, in the order of its table.
PATHS = (
    "default flow",
    "low-bit recipe",
    "export",
    "torchrun train + resume",
    "QAT step vs float step",
)
#: The app's "Run the default": its methods and bits (``lsq.explorer.Settings``' defaults).
DEFAULT_METHODS = ("lsq+", "lsq", "lsq-signed", "minmax")
DEFAULT_BITS = (8, 4)
#: The low-bit recipe's bits.
LOW_BITS = (4, 4)
#: QAT throughput as a share of float training's that a GPU should reach (issue 13).
QAT_TARGET = 0.8
#: The project's root (the folder holding ``lsq/``), for the torchrun subprocesses.
ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Size:
    """How big each path's work is: ``FULL`` on a GPU, ``TINY`` on the CPU and in CI."""

    name: str
    data: DataConfig
    recon_iters: int
    qat_steps: int
    #: torch.compile'd quantizer kernels (the default of every command; ~15 s to compile once).
    compile: bool
    parity_views: int
    #: ``lsq train``'s model options, and its run.
    train_model: tuple[str, ...]
    train_resolution: int
    train_steps: int
    ckpt_every: int
    train_batch: int
    train_calib: int
    train_workers: int
    #: Images per class (two classes) of the training folder, and their side in pixels.
    folder_images: int
    folder_pixels: int
    #: The step-time comparison: model ("bundled" or a timm name built with random weights).
    step_model: str
    step_batch: int
    step_resolution: int
    step_warmup: int
    step_steps: int
    #: Wall-clock limit of each torchrun command, in seconds.
    timeout_s: int


#: One GPU: the sizes a user runs (the app's views, batch 128 at 224 px); a few minutes.
FULL = Size(
    name="full",
    data=DataConfig(resolution=224, calib_views=32, eval_views=32),
    recon_iters=60,  # the recipe's default (ReconstructConfig.iters)
    qat_steps=20,
    compile=True,
    parity_views=32,
    train_model=("--model", "bundled", "--new-head"),
    train_resolution=224,
    train_steps=20,
    ckpt_every=10,
    train_batch=32,
    train_calib=32,
    train_workers=2,
    folder_images=64,
    folder_pixels=160,
    step_model="bundled",
    step_batch=128,
    step_resolution=224,
    step_warmup=5,
    step_steps=20,
    timeout_s=240,
)
#: The CPU and CI: every path at a tiny size, only to show that it works.
TINY = Size(
    name="tiny",
    data=DataConfig(resolution=64, calib_views=8, eval_views=8, recon_views=8, batch_size=8),
    recon_iters=2,
    qat_steps=2,
    compile=False,
    parity_views=8,
    train_model=("--model", "test_efficientnet", "--random-weights", "--new-head"),
    train_resolution=64,
    train_steps=4,
    ckpt_every=2,
    train_batch=4,
    train_calib=8,
    train_workers=0,
    folder_images=4,
    folder_pixels=72,
    step_model="test_efficientnet",
    step_batch=4,
    step_resolution=64,
    step_warmup=1,
    step_steps=2,
    timeout_s=180,
)


@dataclass
class Row:
    """One path's outcome: ok or the error's first line, its wall time and what it measured."""

    path: str
    ok: bool
    seconds: float
    notes: str = ""
    error: str = ""

    @property
    def status(self) -> str:
        return "ok" if self.ok else f"failed: {self.error}"


@dataclass
class Report:
    """The doctor's findings: the device line, one row per path, the step-time lines."""

    device: str
    size: str
    rows: list[Row] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return bool(self.rows) and all(r.ok for r in self.rows)

    def table(self) -> str:
        """The rows as a markdown table: path | status | seconds | notes."""
        body = [[r.path, r.status, f"{r.seconds:.1f}", r.notes] for r in self.rows]
        return markdown_table(["path", "status", "seconds", "notes"], body)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-flavoured markdown table (``|`` inside a cell escaped); no tabulate needed."""

    def cell(v: object) -> str:
        return " ".join(str(v).split()).replace("|", "\\|")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |"]
    lines.append("|" + "|".join("---" for _ in header) + "|")
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def first_line(e: BaseException) -> str:
    """An error in one line: an ``LSQError``'s own words, else its type and first line."""
    lines = str(e).strip().splitlines()
    text = lines[0].strip() if lines else ""
    if not isinstance(e, LSQError):
        text = f"{type(e).__name__}: {text}" if text else type(e).__name__
    return text[:300]


def device_line(device: torch.device) -> str:
    """The device in words: the GPU's name, or the CPU with its thread count."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (cuda)"
    n = torch.get_num_threads()
    return f"cpu, {n} thread{'s' if n != 1 else ''}"


# --------------------------------------------------------------------------- one training step
def step_time(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    device: torch.device,
    bf16: bool,
    warmup: int,
    steps: int,
) -> tuple[float, float]:
    """Seconds per training step (median of ``steps`` after ``warmup``) and peak GiB (nan on
    the CPU). A step is QAT's own (``lsq.train.step_loss`` with cross-entropy, bf16 autocast on
    CUDA when ``bf16``, then ``update``: backward, Adam, the scale projection), on inputs already
    on the device, so the time is the model's and not a data loader's. ``bench/gpu_scale.py``
    uses it too."""
    groups = param_groups([model], 1e-5, 1e-5, 3e-4)
    opt = make_optimizer(groups, "adam")
    cuda = device.type == "cuda"

    def one() -> None:
        update(opt, step_loss(model, x, y, "ce", bf16), model)

    for _ in range(warmup):
        one()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        one()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    return sorted(times)[len(times) // 2], peak


# --------------------------------------------------------------------------- the checks
#: Run as ``python crash.py <lsq arguments>`` under torchrun: ``lsq`` whose process kills itself
#: (SIGKILL, no clean-up) right after writing its first checkpoint, as a crash would.
CRASH_AFTER_CHECKPOINT = """
import os, signal, sys
import lsq.distributed as engine
save = engine.save_checkpoint
def save_then_die(run_path, state, keep):
    path = save(run_path, state, keep)
    os.kill(os.getpid(), signal.SIGKILL)
    return path
engine.save_checkpoint = save_then_die
from lsq.cli import main
sys.exit(main(sys.argv[1:]))
"""


def write_folder(root: Path, per_class: int, pixels: int, start: int = 0) -> Path:
    """``root/<class>/<i>.png`` for two classes: ``per_class`` copies of the bundled photos each,
    ``pixels`` on a side (an ImageNet-style folder for ``lsq train``)."""
    from lsq.data import bundled_images

    photos = bundled_images("calibration") + bundled_images("evaluation")
    k = start
    for name in ("class_a", "class_b"):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            photos[k % len(photos)].resize((pixels, pixels)).save(root / name / f"{i}.png")
            k += 1
    return root


def _command_error(proc: subprocess.CompletedProcess, what: str) -> str:
    """Why a command failed, in one line: lsq's own ``error:`` line, else the last exception
    line of its output (not torchrun's wrapper), else its exit status."""
    lines = [ln.strip() for ln in (proc.stdout + "\n" + proc.stderr).splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith("error: "):
            return f"{what}: {ln.removeprefix('error: ')}"
    for ln in reversed(lines):
        head = ln.split(":", 1)[0]
        if head.endswith(("Error", "Exception")) and "ChildFailedError" not in head:
            return f"{what}: {ln}"
    return f"{what} exited with status {proc.returncode}"


class Checks:
    """The paths, one method each (in ``PATHS``' order); each returns its row's notes or raises.

    Shared work is kept: the workbench (model and views) of the default flow serves the low-bit
    recipe, whose result the export saves. A path whose input failed makes its own.
    """

    def __init__(self, device: torch.device, size: Size, workdir: Path) -> None:
        self.device, self.size, self.workdir = device, size, workdir
        self.cuda = device.type == "cuda"
        self._bench: Workbench | None = None
        self._bench_error: str | None = None
        self.lowbit: MethodResult | None = None
        self.lines: list[str] = []
        self.runs = workdir / "runs"

    def bench(self) -> Workbench:
        """The bundled Lite0 and its views at this size, made once (its failure, once)."""
        from lsq.pipeline import prepare

        if self._bench is None:
            if self._bench_error is not None:
                raise LSQError(f"the model and views could not be prepared: {self._bench_error}")
            try:
                self._bench = prepare(ModelSpec(), self.size.data, device=self.device.type)
            except Exception as e:
                self._bench_error = first_line(e)
                raise
        return self._bench

    def default_flow(self) -> str:
        """The app's "Run the default": four methods at W8A4, each initialised and saved."""
        from lsq.config import make_config
        from lsq.pipeline import init_method, save_result

        bench = self.bench()
        w, a = DEFAULT_BITS
        notes = []
        for method in DEFAULT_METHODS:
            config = make_config(method, w, a, weight_init="auto")
            result = save_result(bench, init_method(bench, config), root=self.runs / "default")
            notes.append(f"{method} {result.metrics_init['agreement']:.2f}")
        return f"W{w}A{a} agreement: " + ", ".join(notes) + f" ({len(bench.eval)} views)"

    def lowbit_recipe(self) -> str:
        """LSQ+ W4A4: reconstruction, then QAT reading numbers once, host syncs an error."""
        from lsq.config import make_config
        from lsq.pipeline import init_method, reconstruct_method, train_method
        from lsq.reconstruct import ReconstructConfig
        from lsq.train import TrainConfig

        bench, size, dev = self.bench(), self.size, self.device.type
        w, a = LOW_BITS
        result = init_method(bench, make_config("lsq+", w, a))
        recon = ReconstructConfig(
            iters=size.recon_iters,
            batch_size=min(ReconstructConfig.batch_size, size.data.recon_views),
            device=dev,
            bf16=True,
            compile=size.compile,
        )
        result = reconstruct_method(bench, result, recon)
        if result.status != Status.COMPLETE:
            raise LSQError(f"reconstruction {result.status}: {result.message}")
        after = result.metrics_final
        train = TrainConfig(
            steps=size.qat_steps,
            bf16=True,
            record_every=size.qat_steps,
            sync_check=True,
            device=dev,
            compile=size.compile,
        )
        result = train_method(bench, result, train)
        if result.status != Status.COMPLETE:
            raise LSQError(f"training {result.status}: {result.message}")
        self.lowbit = result
        m = result.metrics_final
        return (
            f"reconstruction ({recon.iters} it/unit): agreement {after['agreement']:.2f}, "
            f"KL {after['kl']:.3f}; + {train.steps} QAT steps: agreement {m['agreement']:.2f}, "
            f"KL {m['kl']:.3f}"
        )

    def export(self) -> str:
        """The low-bit result saved as a run, exported to ONNX, parity against fake-quant."""
        from lsq.config import make_config
        from lsq.export import export_run
        from lsq.pipeline import init_method, save_result

        bench = self.bench()
        result, what = self.lowbit, "the low-bit result"
        if result is None:  # the recipe failed: export the initialised model instead
            result, what = init_method(bench, make_config("lsq+", *LOW_BITS)), "initialised"
        saved = save_result(bench, result, root=self.runs / "export")
        report = export_run(saved.run_path, "onnx", parity_views=self.size.parity_views)
        p = report.parity
        note = (
            f"{what}, ONNX Runtime vs fake-quant on {int(p['views'])} views: agreement "
            f"{p['agreement']:.3f}, KL {p['kl']:.1e}, logit SQNR {p['logit_sqnr_db']:.1f} dB"
        )
        if report.parity_warning:
            note += f"; warning: {report.parity_warning}"
        return note

    def torchrun_resume(self) -> str:
        """``lsq train`` under torchrun, killed after its first checkpoint, then resumed."""
        from lsq.runs import list_runs, load_run

        size = self.size
        folder = self.workdir / "folder"
        write_folder(folder / "train", size.folder_images, size.folder_pixels)
        write_folder(folder / "val", 4, size.folder_pixels, start=2 * size.folder_images)
        runs = self.workdir / "train-runs"
        args = ["--runs-dir", str(runs), "train", "--data", str(folder / "train")]
        args += ["--val", str(folder / "val"), *size.train_model]
        args += ["--resolution", str(size.train_resolution), "--steps", str(size.train_steps)]
        args += ["--ckpt-every", str(size.ckpt_every), "--batch", str(size.train_batch)]
        args += ["--calib", str(size.train_calib), "--workers", str(size.train_workers)]
        args += ["--device", self.device.type, *([] if size.compile else ["--eager"])]
        crash = self.workdir / "crash_after_checkpoint.py"
        crash.write_text(CRASH_AFTER_CHECKPOINT)
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        torchrun += ["--nproc_per_node", "1"]
        paths = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
        if not self.cuda:
            env["OMP_NUM_THREADS"] = "1"

        def command(argv: list[str], what: str) -> subprocess.CompletedProcess:
            proc = subprocess.Popen(
                [*torchrun, *argv],
                env=env,
                cwd=self.workdir,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            try:
                stdout, stderr = proc.communicate(timeout=size.timeout_s)
            except subprocess.TimeoutExpired:
                # SIGTERM: torchrun stops its worker (in a session of its own) before it exits.
                proc.terminate()
                try:
                    proc.communicate(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.communicate()
                raise LSQError(f"{what} did not end within {size.timeout_s} s") from None
            return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)

        killed = f"lsq train (to be killed after its step-{size.ckpt_every} checkpoint)"
        first = command([str(crash), *args], killed)
        infos = list_runs(runs)
        if len(infos) != 1 or infos[0].status != Status.INCOMPLETE:
            if first.returncode != 0:
                raise LSQError(_command_error(first, killed))
            found = ", ".join(f"{i.name} {i.status}" for i in infos) or "no run"
            raise LSQError(f"{killed} exited 0 and left {found}")
        second = command(["-m", "lsq", *args, "--resume"], "lsq train --resume")
        if second.returncode != 0:
            raise LSQError(_command_error(second, "lsq train --resume"))
        (info,) = list_runs(runs)
        run = load_run(info.path)
        last = int(run.tables["metrics"]["step"].max())
        resumes = [r.get("step") for r in info.meta.get("resumes") or []]
        if info.status != Status.COMPLETE or last != size.train_steps:
            raise LSQError(
                f"the resumed run is {info.status} at step {last} of {size.train_steps}: "
                f"{info.message}"
            )
        if resumes != [size.ckpt_every]:
            raise LSQError(f"the run resumed at steps {resumes}, not at {size.ckpt_every}")
        speed = info.meta.get("images_per_second")
        top1 = info.meta.get("val_top1")
        return (
            f"killed after the step-{resumes[0]} checkpoint, resumed to step {last}"
            + (f"; {speed:.0f} images/s" if speed else "")
            + (f"; val top-1 {top1:.2f}" if top1 is not None else "")
        )

    def step_times(self) -> str:
        """One training step of the float model and of the LSQ+ W4A4 model: ms, peak memory."""
        import timm

        from lsq.calibrate import calibrate
        from lsq.config import make_config
        from lsq.convert import quantize_model
        from lsq.models import load_model
        from lsq.quantizers import set_kernels

        size, dev = self.size, self.device
        before = torch.cuda.max_memory_allocated() / 2**30 if self.cuda else math.nan
        n, res = size.step_batch, size.step_resolution
        with torch.random.fork_rng(devices=[dev] if self.cuda else []):  # the caller's RNG kept
            torch.manual_seed(0)
            if size.step_model == "bundled":
                float_model = load_model().model
            else:
                float_model = timm.create_model(size.step_model, pretrained=False)
            float_model = float_model.to(dev).eval()
            x = torch.randn(n, 3, res, res, device=dev)
            y = torch.randint(0, float_model.num_classes, (n,), device=dev)
        config = make_config("lsq+", *LOW_BITS, act_init="minmax")  # the init changes no speed
        quantized = copy.deepcopy(float_model)
        quantize_model(quantized, config)
        calibrate(quantized, [x[: min(n, 16)]], config)
        kernels = set_kernels(quantized, "compiled" if size.compile else "eager")
        benchmark = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = self.cuda
        try:
            args = (x, y, dev, self.cuda, size.step_warmup, size.step_steps)
            t_float, peak_float = step_time(float_model, *args)
            t_qat, peak_qat = step_time(quantized, *args)
        finally:
            torch.backends.cudnn.benchmark = benchmark
            del float_model, quantized
            if self.cuda:
                torch.cuda.empty_cache()
        amp = "bf16 autocast" if self.cuda else "fp32"
        ratio = t_float / t_qat
        self.lines.append(
            f"QAT step vs float step ({size.step_model}, batch {n}, {res} px, {amp}): "
            f"float {t_float * 1e3:.1f} ms, QAT LSQ+ W4A4 ({kernels} quantizer kernels) "
            f"{t_qat * 1e3:.1f} ms per step: QAT at {ratio:.2f}x the float throughput"
            + (f" (target: {QAT_TARGET}x or more)" if self.cuda else "")
        )
        if self.cuda:
            self.lines.append(
                f"peak GPU memory: QAT step {peak_qat:.2f} GiB, float step {peak_float:.2f} GiB, "
                f"the paths before in this process {before:.2f} GiB"
            )
        else:
            self.lines.append("peak GPU memory: - (cpu)")
        return f"float {t_float * 1e3:.1f} ms, QAT {t_qat * 1e3:.1f} ms: {ratio:.2f}x throughput"


#: Each path's method of ``Checks``, in ``PATHS``' order.
METHODS = dict(
    zip(
        PATHS,
        ("default_flow", "lowbit_recipe", "export", "torchrun_resume", "step_times"),
        strict=True,
    )
)


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def run_doctor(
    device: str = "auto",
    tiny: bool = False,
    out: Callable[[str], None] = print,
    progress: Callable[[str], None] = _stderr,
) -> Report:
    """Check every path on ``device`` (auto: CUDA when present); the CPU always runs ``TINY``.

    ``out`` gets the device line first and, at the end, the table, the step-time lines and the
    total; ``progress`` a line as each path starts. Asking for CUDA without one raises
    ``LSQError`` before any work.
    """
    t0 = time.perf_counter()
    dev = resolve_device(device)
    size = TINY if tiny or dev.type == "cpu" else FULL
    report = Report(device_line(dev), size.name)
    out(f"lsq doctor: {report.device}, torch {torch.__version__}, {size.name} size")
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory(prefix="lsq-doctor-") as tmp:
        checks = Checks(dev, size, Path(tmp))
        for i, path in enumerate(PATHS, 1):
            progress(f"[{i}/{len(PATHS)}] {path} ...")
            t = time.perf_counter()
            try:
                notes = getattr(checks, METHODS[path])()
                row = Row(path, True, time.perf_counter() - t, notes)
            except Exception as e:  # one path's failure is its row, never the others'
                row = Row(path, False, time.perf_counter() - t, error=first_line(e))
            report.rows.append(row)
            progress(f"[{i}/{len(PATHS)}] {path}: {row.status} ({row.seconds:.1f} s)")
        report.lines = list(checks.lines)
    if not report.rows[PATHS.index("QAT step vs float step")].ok:
        report.lines = ["QAT step vs float step: - (the path failed)", "peak GPU memory: -"]
    report.seconds = time.perf_counter() - t0
    out("")
    out(report.table())
    out("")
    for line in report.lines:
        out(line)
    out(f"total {report.seconds:.0f} s: {'every path ok' if report.ok else 'some path failed'}")
    return report


__all__ = [
    "FULL",
    "PATHS",
    "TINY",
    "Checks",
    "Report",
    "Row",
    "Size",
    "first_line",
    "markdown_table",
    "run_doctor",
    "step_time",
]
