"""Typed events and results that the engine hands to its caller (the app's queue, the CLI).

For: what a render reports while it runs (`Progress`, `Preview`, `ShotDone`) and when it ends
(`Finished`, `Stopped`), the per-shot and whole-story results, and `RenderStopped`.
Not for: producing them (engine.py) or showing them (app/). Imports numpy only.

A render emits, in order: Progress/Preview events during sampling, a ShotDone for every shot
as soon as its frames are final (cached shots first, in story order), then exactly one of
Finished (render returned) or Stopped (render raised RenderStopped).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Union

import numpy as np

ShotStatus = Literal["cached", "generated", "stale"]


@dataclass(frozen=True)
class ShotResult:
    index: int  # position of the shot in the story
    status: ShotStatus  # "cached": served from the shot cache; "generated": sampled in this render;
    #                     "stale": an older take kept although its context shots changed since
    video_path: Path | None  # the shot's MP4 (None when the render wrote no files)
    seconds: float  # wall time spent on this shot in this render (0 for cache hits)
    density: float  # mean attention density of the run that generated this take (1.0 = dense)
    seed: int  # the seed actually used for this take's initial noise
    key: str  # the take's content address in the shot cache
    frames: int = 0  # video frames in the take
    generated_with: str = ""  # "joint" | "context" (alone, against fixed context shots) | "single"


@dataclass(frozen=True)
class RenderResult:
    shots: list[ShotResult]  # one per story shot, in story order
    story_video: Path | None  # the whole story as one MP4
    routing: dict  # the routing report (schema in engine/routing_report.py)
    summary: dict  # per-shot status/seconds/density plus totals (what summary.json holds)


@dataclass(frozen=True)
class Progress:
    shot: int | None  # the shot being sampled (None: several shots denoised jointly)
    step: int  # 1-based step within the current run (0 before the first step)
    total: int  # steps in the current run
    message: str  # human-readable, e.g. "shot 2/4 · step 3/12"
    run: int = 0  # index of the current sampling run in this render
    runs: int = 1  # sampling runs this render needs
    shots: tuple[int, ...] = ()  # every shot the current run samples
    density: float = 1.0  # attention density of the last step (1.0 = dense)
    context: int | None = None  # a context pass (step 0) before the run's sampling: its first shot
    context_shots: tuple[int, ...] = ()  # every shot that context pass reads (consecutive)


@dataclass(frozen=True)
class Preview:
    shot: int | None  # the shot shown (None: the whole run, shots concatenated in time)
    frames: np.ndarray  # (T, H, W, 3) uint8 preview of the current clean estimate
    step: int = 0  # step the preview belongs to
    shots: tuple[int, ...] = ()  # shots covered by `frames`, in order


@dataclass(frozen=True)
class ShotDone:
    index: int  # the shot
    result: ShotResult  # its final result


@dataclass(frozen=True)
class Finished:
    result: RenderResult


@dataclass(frozen=True)
class Stopped:
    message: str  # why (e.g. "stopped by the user at step 3/12 of shot 2")
    finished_shots: tuple[int, ...] = field(default=())  # shots whose takes are final and cached


Event = Union[Progress, Preview, ShotDone, Finished, Stopped]
EventCallback = Callable[[Event], None]


class RenderStopped(Exception):
    """Raised by StoryEngine.render when its stop flag was set. Every finished shot stays cached."""

    def __init__(self, message: str, finished_shots: tuple[int, ...] = ()):
        super().__init__(message)
        self.finished_shots = finished_shots

    def __reduce__(self):  # pickled whole (a rank's outcome travels to rank 0: engine/ranks.py)
        return RenderStopped, (str(self), self.finished_shots)


__all__ = ["ShotStatus", "ShotResult", "RenderResult", "Progress", "Preview", "ShotDone",
           "Finished", "Stopped", "Event", "EventCallback", "RenderStopped"]
