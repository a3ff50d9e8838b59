"""Long work off the page: one background job at a time, whose progress any page can read.

The app keeps one ``JobManager`` per server process, so a job survives a browser refresh (a new
session finds it running or finished), and a second job is refused while one runs, rather than
two runs fighting over the CPU. A job's function gets the ``Job`` to report progress, add
events and check whether the user asked it to stop.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lsq.device import free_cached
from lsq.errors import LSQError
from lsq.status import ACTIVE, Status

log = logging.getLogger(__name__)


#: Seconds of estimated work after which the measured pace weighs as much as the estimate.
PACE_PRIOR_S = 30.0


@dataclass
class Job:
    """A unit of background work and everything a page needs to show it."""

    kind: str
    title: str
    params: dict[str, Any] = field(default_factory=dict)
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    status: Status = Status.QUEUED  # queued, running, done, failed, stopped
    stage: str = ""
    done: int = 0
    total: int = 0
    message: str = ""
    events: list[Any] = field(default_factory=list)
    result: Any = None
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    work: tuple[float, float] | None = None
    #: When the first progress came, and the fraction done then: the pace is measured from
    #: there (what came before, loading and compiling, is not work the rest will repeat).
    _first: tuple[float, float] | None = field(default=None, repr=False)
    _in_seconds: bool = field(default=False, repr=False)
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)

    def progress(
        self,
        stage: str,
        done: int,
        total: int,
        work: tuple[float, float] | None = None,
        seconds: bool = False,
    ) -> None:
        """``done`` of ``total`` steps (what the line shows); ``work``: (done, total) of the
        job's estimated cost, when its steps cost unequal times (the bar and the time left
        follow it); ``seconds``: that cost is an estimate in seconds, which the time left starts
        from until the pace is measured."""
        self.stage, self.done, self.total = stage, int(done), int(total)
        self.work = None if work is None or work[1] <= 0 else (float(work[0]), float(work[1]))
        self._in_seconds = seconds and self.work is not None
        if self._first is None and self.total:
            self._first = (time.time(), self.fraction)

    def add_event(self, event: Any) -> None:
        self.events.append(event)

    def request_stop(self) -> None:
        self._stop.set()

    def stop_requested(self) -> bool:
        return self._stop.is_set()

    @property
    def active(self) -> bool:
        return self.status in ACTIVE

    @property
    def fraction(self) -> float:
        """How much of the job is done, 0..1: by cost when the job gives it, else by steps."""
        if self.work is not None:
            return min(1.0, max(0.0, self.work[0] / self.work[1]))
        return min(1.0, self.done / self.total) if self.total else 0.0

    @property
    def elapsed(self) -> float:
        if self.started is None:
            return 0.0
        return (self.finished or time.time()) - self.started

    @property
    def remaining(self) -> float | None:
        """Seconds left at the pace since the first progress came (None before a second)."""
        done = self.fraction
        if self._first is None or not self.done or self.done >= self.total or done >= 1:
            return None
        since, at = self._first
        if self._in_seconds:  # the estimate, corrected by the pace as it is measured
            done_s, total_s = self.work
            worked = (done - at) * total_s
            pace = (time.time() - since + PACE_PRIOR_S) / (worked + PACE_PRIOR_S)
            return pace * (total_s - done_s)
        if done <= at:
            return None
        return (time.time() - since) * (1 - done) / (done - at)

    def describe(self) -> str:
        """One line for a progress bar: stage, steps done, time taken and time left."""
        text = f"{self.title}: {self.stage or 'starting'}"
        if self.total:
            text += f" — {self.done}/{self.total}"
        text += f" ({self.elapsed:.0f} s"
        left = self.remaining
        if left is not None:
            text += f", about {_duration(left)} left"
        return text + ")"


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


class JobManager:
    """Runs one job at a time in a daemon thread; keeps finished jobs for pages to read."""

    def __init__(self, keep: int = 20) -> None:
        self._lock = threading.Lock()
        self._jobs: dict[str, Job] = {}
        self._order: list[str] = []
        self._keep = keep

    def submit(self, job: Job, fn: Callable[[Job], Any]) -> Job:
        """Start ``fn(job)`` in the background; refused while another job is active."""
        with self._lock:
            running = self.active()
            if running is not None:
                raise LSQError(
                    f"'{running.title}' is still running ({running.stage or 'starting'}); wait for "
                    "it to finish or stop it first"
                )
            self._jobs[job.id] = job
            self._order.append(job.id)
            while len(self._order) > self._keep:
                self._jobs.pop(self._order.pop(self._oldest_expendable()), None)
            job.status = Status.RUNNING
            job.started = time.time()
        thread = threading.Thread(target=self._run, args=(job, fn), daemon=True, name=job.title)
        thread.start()
        return job

    def _run(self, job: Job, fn: Callable[[Job], Any]) -> None:
        try:
            job.result = fn(job)
            if job.status == Status.RUNNING:
                job.status = Status.STOPPED if job.stop_requested() else Status.DONE
        except LSQError as e:
            job.status, job.message = Status.FAILED, str(e)
        except Exception as e:  # a bug: keep the server alive, log the traceback, say what happened
            log.exception("job %r (%s) failed", job.title, job.id)
            job.status = Status.FAILED
            job.message = (
                f"unexpected error: {type(e).__name__}: {e} (the traceback is in the server log)"
            )
        finally:
            free_cached()  # the job's private model copies, on a GPU
            job.finished = time.time()

    def _oldest_expendable(self) -> int:
        """Where in ``_order`` the oldest job lies that is not its kind's newest done one (the
        results the pages show are never dropped for a run of failures)."""
        keep, kinds = set(), set()
        for jid in reversed(self._order):
            job = self._jobs[jid]
            if job.status == Status.DONE and job.kind not in kinds:
                keep.add(jid)
                kinds.add(job.kind)
        return next((i for i, jid in enumerate(self._order) if jid not in keep), 0)

    def active(self) -> Job | None:
        for jid in reversed(self._order):
            job = self._jobs.get(jid)
            if job is not None and job.active:
                return job
        return None

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def jobs(self, kind: str | None = None) -> list[Job]:
        """The kept jobs (of ``kind``), newest first."""
        with self._lock:
            found = [self._jobs[jid] for jid in reversed(self._order)]
        return [j for j in found if kind is None or j.kind == kind]

    def latest(self, kind: str | None = None) -> Job | None:
        return next(iter(self.jobs(kind)), None)

    def latest_done(self, kind: str) -> Job | None:
        """The newest job of ``kind`` that finished with its results: a later one that failed,
        was stopped or is still running does not hide them."""
        return next((j for j in self.jobs(kind) if j.status == Status.DONE), None)

    def wait(self, job: Job, timeout: float = 600.0) -> Job:
        """Block until ``job`` ends (tests and the CLI); raises LSQError on timeout."""
        end = time.time() + timeout
        while job.active:
            if time.time() > end:
                raise LSQError(f"'{job.title}' did not finish within {timeout:.0f} s")
            time.sleep(0.05)
        return job
