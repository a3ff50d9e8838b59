"""One status vocabulary for background jobs, saved runs and training events.

A ``StrEnum`` compares equal to its string, so ``status == "done"`` and JSON files written with
plain strings keep working. Which values each thing takes:

- a job (``lsq.jobs``): queued, running, then done, stopped or failed;
- a saved run (``lsq.runs``): running, then complete, stopped or failed; a run whose writer died
  is reported (never written) as incomplete;
- a training event (``lsq.train``): step, eval, then done, stopped or error.
"""

from __future__ import annotations

from enum import StrEnum


class Status(StrEnum):
    """Where a job, a run or a training stands, or how it ended."""

    QUEUED = "queued"
    RUNNING = "running"
    STEP = "step"
    EVAL = "eval"
    DONE = "done"
    COMPLETE = "complete"
    STOPPED = "stopped"
    FAILED = "failed"
    ERROR = "error"
    INCOMPLETE = "incomplete"


#: A job in one of these has not ended yet.
ACTIVE = (Status.QUEUED, Status.RUNNING)
#: What a saved run can be marked with (``incomplete`` is only ever reported).
RUN_STATUSES = (Status.RUNNING, Status.COMPLETE, Status.FAILED, Status.STOPPED)
#: How a training (or a whole method result) ended, from its last event's kind.
ENDINGS = {
    Status.DONE: Status.COMPLETE,
    Status.STOPPED: Status.STOPPED,
    Status.ERROR: Status.FAILED,
}
