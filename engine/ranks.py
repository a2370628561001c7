"""The app across several processes: rank 0 serves it, the other ranks render each of its jobs in step.

For: `Jobs.open(parallel)` (the channel every rank opens once), `Leader` (rank 0: what the app's
render worker calls `render` / `make_current` on) and `follow` (ranks 1..N-1: the loop that
receives a job, renders it and waits for the next, until the quit job).
Not for: the collectives inside a render (engine/parallel.py), Gradio (app/), arguments (launch.py).

The protocol. A job is a `RenderJob`: StoryEngine.render's arguments (the story as a dict, the
shot to regenerate, both_sides, the take to make current), small and picklable, never tensors of
results; or QUIT. For each job:
  1. rank 0 checks it (`StoryEngine.check`; make_current's take lookup): a job rank 0 rejects is
     never sent, so no other rank starts it;
  2. rank 0 sends it; every other rank, waiting in `follow`, receives it;
  3. every rank calls `StoryEngine.render` with it. Inside, rank 0 decides (plan, cache hits,
     seeds, and Stop at every sampler step, through `SequenceParallel.on_rank0`: all ranks stop at
     the same step) and does the file work; each forward is spread over the ranks;
  4. every rank sends its outcome ("ok", "stopped: ...", "error: ...") and every rank gets all of
     them. Ranks that ended alike are still in step (an error raised by `on_rank0` reaches every
     rank at the same point). Outcomes that differ mean a rank failed where the others did not:
     their collectives no longer pair up, so rank 0 raises `RanksOutOfStep` (naming each rank's
     outcome) for this job and every later one (restart the app), and the others keep waiting for
     the quit job.
When the app closes, rank 0 sends QUIT (after the job in progress, which the app stops first) and
every `follow` returns.

Idle waits and timeouts. Between jobs the other ranks wait in a broadcast for as long as the app
is idle: hours, days. The jobs and outcomes travel on a gloo group of their own whose timeout is
IDLE_TIMEOUT (a year), while the collectives of a render keep the default group's
DEFAULT_TIMEOUT_S (10 minutes). No heartbeats and no polling: a wait ends when rank 0 sends, and
if rank 0 dies its sockets close and the waiting broadcast fails at once (torchrun then stops every
process). Gloo (CPU) also keeps the idle wait out of NCCL, whose watchdog would end it. A rank that
raises alone mid-render leaves the others in a render collective until its 10-minute timeout (or
at once, if it died); then they raise too and step 4 tells rank 0 what happened.

Ending. Every rank ends through `leave(jobs)`: in step, it tears the process group down. Out of
step, a collective of the default group was left unmatched (rank 0 timed out sending to a rank
that never received), and gloo's teardown of such a group can abort the process (SIGABRT,
"terminate called without an active exception", seen once in CI on the CPU), so `leave` ends the
process at once instead, skipping the teardown: the files were all written by then (only rank 0
writes, and each write is atomic).
"""

from __future__ import annotations

import datetime
import logging
import os
import sys
import threading
from dataclasses import dataclass

import torch.distributed as dist

from engine.engine import StoryEngine
from engine.events import RenderResult, RenderStopped
from engine.parallel import SequenceParallel
from engine.story import Story

log = logging.getLogger(__name__)

IDLE_TIMEOUT = datetime.timedelta(days=365)  # how long a rank waits for rank 0's next job
CLOSE_WAIT_S = 60.0  # how long closing waits for the job in progress (stopped by then) to end


@dataclass(frozen=True)
class RenderJob:
    """One call of StoryEngine.render, as rank 0 sends it to the other ranks."""

    story: dict  # Story.to_dict() of the story rank 0 checked and renders
    regenerate: int | None = None  # render(regenerate=...): the shot sampled anew, or None
    both_sides: bool | None = None  # render(both_sides=...)
    take: str | None = None  # render(take=...): the cached take made current (with regenerate)


QUIT = None  # the job that ends `follow`


class RanksOutOfStep(RuntimeError):
    """The ranks ended a render differently: their collectives no longer pair up. Restart the app."""


class Jobs:
    """The channel: rank 0 sends jobs, every rank sends its outcome, on a gloo group of its own."""

    def __init__(self, parallel: SequenceParallel, group):
        self.parallel = parallel
        self.group = group  # torch.distributed ProcessGroup (gloo, timeout IDLE_TIMEOUT)
        self.broken = ""  # why the ranks are out of step ("" while they are in step); every rank knows

    @staticmethod
    def open(parallel: SequenceParallel, timeout: datetime.timedelta = IDLE_TIMEOUT) -> "Jobs":
        """Every rank calls this once, after `engine.parallel.start` (it is a collective)."""
        return Jobs(parallel, dist.new_group(backend="gloo", timeout=timeout))

    def send(self, job: RenderJob | None) -> None:
        """Rank 0: the next job (QUIT: none)."""
        if self.parallel.rank != 0:
            raise RuntimeError("only rank 0 sends jobs; the other ranks receive them (engine.ranks.follow)")
        dist.broadcast_object_list([job], src=0, group=self.group)

    def receive(self) -> RenderJob | None:
        """Ranks 1..N-1: wait (up to IDLE_TIMEOUT) for rank 0's next job."""
        payload = [None]
        dist.broadcast_object_list(payload, src=0, group=self.group)
        return payload[0]

    def outcomes(self, outcome: str) -> list[str]:
        """Every rank's outcome of the job just rendered, in rank order; sets `broken` where they differ."""
        try:
            out = [None] * self.parallel.world
            dist.all_gather_object(out, outcome, group=self.group)
        except RuntimeError as lost:  # a rank died: its sockets closed
            out = [outcome if r == self.parallel.rank else f"unreachable ({lost})" for r in range(self.parallel.world)]
        if any(o != outcome for o in out) and not self.broken:
            ranks = "; ".join(f"rank {r}: {o}" for r, o in enumerate(out))
            self.broken = (f"The {len(out)} processes did not end the render alike ({ranks}), so their "
                           "collectives are out of step: restart the app (torchrun ... launch.py).")
        return out


def outcome_of(error: BaseException | None) -> str:
    """How a rank ended a job, as the ranks compare it."""
    if error is None:
        return "ok"
    if isinstance(error, RenderStopped):
        return f"stopped: {error}"
    return f"error: {type(error).__name__}: {error}"


class Leader:
    """Rank 0: `render` and `make_current` as StoryEngine has them, each sent to the other ranks
    and rendered in step with them. The app reads everything else (takes, the cache) from the engine."""

    def __init__(self, engine: StoryEngine, jobs: Jobs):
        if engine.parallel is None or engine.parallel.rank != 0:
            raise ValueError("the Leader runs on rank 0 with a sequence-parallel engine "
                             "(StoryEngine.load(..., parallel=engine.parallel.start()[0]))")
        self.engine = engine
        self.jobs = jobs
        self.outcomes: list[str] = []  # every rank's outcome of the last job, in rank order
        self.closed = False  # QUIT was sent
        self._lock = threading.Lock()  # one job at a time; close() waits for it

    def render(self, story: Story, *, regenerate: int | None = None, out_dir=None, on_event=None,
               stop: threading.Event | None = None, both_sides: bool | None = None,
               take: str | None = None) -> RenderResult:
        """StoryEngine.render across every rank (the same arguments and result)."""
        job = RenderJob(story.to_dict(), regenerate, both_sides, take)
        story = Story.from_dict(job.story)  # every rank renders the same round trip of the story
        self.engine.check(story)  # a story rank 0 rejects is never sent
        with self._lock:
            if self.closed:
                raise RuntimeError("the other ranks have quit: the app is closing")
            if self.broken:
                raise RanksOutOfStep(self.broken)
            self.jobs.send(job)
            try:
                result = self.engine.render(story, regenerate=regenerate, out_dir=out_dir, on_event=on_event,
                                            stop=stop, both_sides=both_sides, take=take)
            except Exception as error:
                self._settle(outcome_of(error), error)
                raise
            self._settle("ok")
            return result

    def make_current(self, story: Story, index: int, key: str, **render_kwargs) -> RenderResult:
        """StoryEngine.make_current across every rank: rank 0 finds the take in its cache, then all
        render it (render_kwargs: out_dir, on_event, stop)."""
        return self.render(story, **self.engine.make_current_args(story, index, key), **render_kwargs)

    def close(self, wait_s: float = CLOSE_WAIT_S) -> None:
        """Send the quit job once the job in progress (stop it first) has ended."""
        if not self._lock.acquire(timeout=wait_s):
            log.warning("a render still runs after %.0f s: the other ranks are not told to quit "
                        "(they end when this process does)", wait_s)
            return
        try:
            if not self.closed:
                self.closed = True
                self.jobs.send(QUIT)
        except RuntimeError as error:  # they are gone already (Ctrl-C reaches every process)
            log.warning("the other ranks could not be told to quit: %s", error)
        finally:
            self._lock.release()

    @property
    def broken(self) -> str:
        """Why the ranks are out of step ("" while they are in step)."""
        return self.jobs.broken

    def _settle(self, mine: str, error: BaseException | None = None) -> None:
        """Compare this job's outcomes over the ranks; raise RanksOutOfStep where they differ."""
        self.outcomes = self.jobs.outcomes(mine)
        if all(o == mine for o in self.outcomes):
            return
        log.error(self.broken)
        raise RanksOutOfStep(self.broken) from error


def follow(engine: StoryEngine, jobs: Jobs) -> int:
    """Ranks 1..N-1: render every job rank 0 sends, in step with it, until QUIT. Returns the number
    of jobs received. Writes no files (`StoryEngine.writes` is False off rank 0)."""
    if engine.parallel is None or engine.parallel.rank == 0:
        raise ValueError("follow runs on the ranks other than 0 of a sequence-parallel engine; rank 0 leads")
    count = 0
    while (job := jobs.receive()) is not QUIT:
        count += 1
        error = None
        try:
            engine.render(Story.from_dict(job.story), regenerate=job.regenerate, both_sides=job.both_sides,
                          take=job.take)
        except RenderStopped as stopped:  # rank 0 decided: every rank stopped at this step
            error = stopped
        except Exception as failed:  # reported to rank 0, which shows it; this rank waits on
            log.exception("rank %d: job %d failed", engine.parallel.rank, count)
            error = failed
        jobs.outcomes(outcome_of(error))
    return count


def leave(jobs: Jobs | None) -> None:
    """End this rank's part: tear the process group down while the ranks are in step (or before
    `Jobs.open`: jobs None). Out of step, flush the output and end the process at once, exit status
    0 (the app already showed the error; see "Ending" above): the teardown of the unmatched group
    could abort it."""
    if jobs is None or not jobs.broken:
        dist.destroy_process_group()
        return
    log.warning("rank %d ends without tearing down the process group: %s", jobs.parallel.rank, jobs.broken)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    logging.shutdown()
    os._exit(0)


__all__ = ["Jobs", "Leader", "RenderJob", "RanksOutOfStep", "QUIT", "IDLE_TIMEOUT", "follow", "leave", "outcome_of"]
