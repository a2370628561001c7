"""One render at a time: a worker thread with a job queue, and typed events out to whoever waits.

For: serialising GPU work between browser sessions and API clients. A caller submits a story,
gets a `Job`, and reads the job's events (the engine's Progress / Preview / ShotDone / Finished /
Stopped, plus this module's Queued / Started / Failed) as they happen. Stop sets the job's flag,
which the engine's sampler checks every step, so a running job ends within one sampling step and
a queued one never starts.
Not for: Gradio (server.py turns events into UI updates) or rendering (engine/engine.py).

The design follows FramePack's demo: the UI thread and the worker only share a queue of typed
events; the worker never touches UI state and the UI never touches the engine.
"""

from __future__ import annotations

import itertools
import logging
import queue
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from engine.engine import ResourceError
from engine.ranks import RanksOutOfStep
from engine.events import Finished, Preview, Progress, RenderStopped, Stopped
from engine.story import Story, StoryError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Queued:
    position: int  # 1 = next to run; sent whenever the place in the queue changes


@dataclass(frozen=True)
class Started:
    job_id: int


@dataclass(frozen=True)
class Failed:
    message: str  # readable, one or two sentences; the traceback goes to the server log only


TERMINAL = (Finished, Stopped, Failed)
KEEP_JOB_DIRS = 32  # finished jobs' output folders kept (Gradio serves its own copies of the videos)


class BusyError(RuntimeError):
    """The session already has a job queued or running."""


@dataclass
class Job:
    id: int
    owner: str  # session hash of the browser tab or API client that submitted it
    story: Story
    regenerate: int | None  # None: render the whole story; i: regenerate shot i only
    out_dir: Path
    both_sides: bool | None = None  # regenerate: later shots as context (None: whenever possible)
    take: str | None = None  # with regenerate: make this cached take current instead of sampling one
    events: "queue.Queue[Any]" = field(default_factory=queue.Queue)
    stop_flag: threading.Event = field(default_factory=threading.Event)
    started: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    progress: tuple[int, int] = (0, 0)  # (run, step) of the last Progress the engine sent
    stop_progress: tuple[int, int] | None = None  # `progress` when Stop was pressed

    def stop(self) -> None:
        if not self.stop_flag.is_set():
            self.stop_progress = self.progress
        self.stop_flag.set()

    def steps_after_stop(self) -> int | None:
        """Sampling steps that finished after Stop was pressed (the sampler checks every step: <= 1)."""
        if self.stop_progress is None:
            return None
        (run, step), (stop_run, stop_step) = self.progress, self.stop_progress
        return step - stop_step if run == stop_run else step


class Worker:
    """A daemon thread that runs `engine.render` for one job at a time, in submission order.
    engine: a StoryEngine, or anything with its `render` and `make_current` (across several
    processes, engine.ranks.Leader: every job rendered on all of them)."""

    def __init__(self, engine, out_root: str | Path):
        self.engine = engine
        self.out_root = Path(out_root)
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._pending: list[Job] = []  # waiting, in order
        self._running: Job | None = None
        self._wake = threading.Condition(self._lock)
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="render-worker", daemon=True)
        self._thread.start()

    # -- what the UI and the API call -------------------------------------------------------------

    def submit(self, owner: str, story: Story, regenerate: int | None = None,
               both_sides: bool | None = None, take: str | None = None) -> Job:
        """Queue a render for `owner`; one unfinished job per owner (raises BusyError otherwise)."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the worker is shut down")
            if any(j.owner == owner for j in self._unfinished()):
                raise BusyError("A render of yours is already queued or running. Stop it first or wait.")
            job_id = next(self._ids)
            job = Job(job_id, owner, story, regenerate, self.out_root / f"job_{job_id:05d}", both_sides, take)
            self._pending.append(job)
            self._wake.notify_all()
        return job

    def position(self, job: Job) -> int:
        """0 while running or finished, n >= 1 while n-th in line."""
        with self._lock:
            return self._pending.index(job) + 1 if job in self._pending else 0

    def stop(self, owner: str) -> bool:
        """Stop the owner's queued or running job; True if there was one."""
        with self._lock:
            jobs = [j for j in self._unfinished() if j.owner == owner]
        for job in jobs:
            job.stop()
        return bool(jobs)

    def busy(self) -> int:
        """How many jobs are queued or running."""
        with self._lock:
            return len(self._unfinished())

    def close(self, timeout: float = 5.0) -> None:
        with self._lock:
            self._closed = True
            for job in self._unfinished():
                job.stop()
            self._wake.notify_all()
        self._thread.join(timeout)

    def stream(self, job: Job, poll_s: float = 0.2) -> Iterator[Any]:
        """Events of `job` in order, with Queued(position) while it waits; ends after the last one."""
        last_position = None
        while True:
            if not job.started.is_set():
                position = self.position(job)
                if position and position != last_position:
                    last_position = position
                    yield Queued(position)
            try:
                batch = [job.events.get(timeout=poll_s)]
            except queue.Empty:
                continue
            while not isinstance(batch[-1], TERMINAL):  # what else is waiting: a reader slower than
                try:  # the sampler (a busy browser, a slow client) catches up instead of lagging
                    batch.append(job.events.get_nowait())
                except queue.Empty:
                    break
            for event in coalesce(batch):
                yield event
                if isinstance(event, TERMINAL):
                    return

    # -- the thread -------------------------------------------------------------------------------

    def _unfinished(self) -> list[Job]:
        return self._pending + ([self._running] if self._running else [])

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._pending and not self._closed:
                    self._wake.wait()
                if self._closed and not self._pending:
                    return
                job = self._pending.pop(0)
                self._running = job
            try:
                self._run(job)
            finally:
                with self._lock:
                    self._running = None
                job.done.set()
                self._prune(keep_after=job.id - KEEP_JOB_DIRS)

    def _prune(self, keep_after: int) -> None:
        """Delete output folders of jobs numbered <= keep_after (older renders)."""
        for folder in self.out_root.glob("job_*"):
            number = folder.name.removeprefix("job_")
            if number.isdigit() and int(number) <= keep_after:
                shutil.rmtree(folder, ignore_errors=True)

    def _run(self, job: Job) -> None:
        job.started.set()
        if job.stop_flag.is_set():
            job.events.put(Stopped("Stopped before it started."))
            return
        job.events.put(Started(job.id))
        sent_terminal = threading.Event()

        def on_event(event: Any) -> None:
            if isinstance(event, Progress):
                job.progress = (event.run, event.step)
            if isinstance(event, TERMINAL):
                sent_terminal.set()
            job.events.put(event)

        started = time.perf_counter()
        try:
            if job.take is not None:
                result = self.engine.make_current(job.story, job.regenerate, job.take, out_dir=job.out_dir,
                                                  on_event=on_event, stop=job.stop_flag)
            else:
                result = self.engine.render(job.story, regenerate=job.regenerate, out_dir=job.out_dir,
                                            on_event=on_event, stop=job.stop_flag, both_sides=job.both_sides)
        except RenderStopped as stopped:
            if not sent_terminal.is_set():
                job.events.put(Stopped(str(stopped) or "Stopped.", tuple(stopped.finished_shots)))
            return
        except StoryError as error:
            job.events.put(Failed(f"The story is not valid: {error}"))
            return
        except Exception as error:  # noqa: BLE001 - any engine failure becomes a message, never a dead worker
            log.exception("render of job %d failed", job.id)
            job.events.put(Failed(readable_error(error)))
            return
        log.info("job %d (%s) finished in %.1f s", job.id, job.owner[:8], time.perf_counter() - started)
        if not sent_terminal.is_set():
            job.events.put(Finished(result))


def coalesce(events: list) -> list:
    """Events in order, where a Progress or Preview that a later one of the same kind supersedes
    (with no other event between them) is dropped: shot results and the end are never dropped."""
    out: list = []
    for event in events:
        if isinstance(event, (Progress, Preview)):
            for j in range(len(out) - 1, -1, -1):
                if not isinstance(out[j], (Progress, Preview)):
                    break
                if type(out[j]) is type(event):
                    del out[j]
                    break
        out.append(event)
    return out


def readable_error(error: BaseException) -> str:
    """One line a user can act on, for errors the engine did not phrase itself."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if isinstance(error, (ResourceError, RanksOutOfStep)):
        return text  # phrased by the engine: names the settings to lower, or that the app must restart
    if isinstance(error, MemoryError) or "out of memory" in text.lower():
        return "Out of memory: try fewer or shorter shots, fewer steps, or a smaller resolution."
    if isinstance(error, OSError) and "No space left" in text:
        return "The disk is full: free some space or point --cache-dir somewhere larger."
    if isinstance(error, ValueError):
        return f"Invalid settings: {text}"
    return f"Generation failed ({type(error).__name__}): {text}"
