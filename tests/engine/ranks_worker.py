"""Both ranks of the served-app tests (tests/engine/test_ranks.py starts it with torchrun).

argv: MODEL_DIR OUT SCENARIO. Rank 0 sends jobs through an engine.ranks.Leader, as the app's
render worker does; rank 1 runs engine.ranks.follow with its own folder OUT/rank1 (which must stay
absent: it writes nothing) and, after the quit job, writes OUT/follow.json (the jobs it received).
Rank 0 saves what each job gave to OUT/<job>.pt; the test compares with one process.

  renders   Stop after the first sampler step, a render, a regeneration (both sides), a take made
            current, and a story rank 0 rejects (never sent).
  failures  an idle wait longer than the render collectives' timeout; a full disk on rank 0 (its
            write fails on every rank at the same point: they stay in step); then a job that fails
            on rank 1 alone (the ranks fall out of step: RanksOutOfStep now and for the next job).
"""

import contextlib
import errno
import json
import sys
import threading
import time
from pathlib import Path

import torch

from engine.engine import ResourceError, StoryEngine
from engine.events import Progress, RenderStopped
from engine.parallel import start
from engine.ranks import Jobs, Leader, RanksOutOfStep, follow, leave
from engine.sampler import SamplerOptions
from engine.story import StoryError
from tests.engine.conftest import tiny_story

COLLECTIVE_TIMEOUT_S = 10  # the render collectives' timeout here (the app's is 10 minutes)
FAIL_TAG = "[rank 1 fails]"  # a global caption that rank 1 refuses (the failures scenario)


def stop_story():
    """Enough steps that a Stop after the first lands mid-run."""
    story = tiny_story("joint")
    story.settings.steps = 6
    return story.validate()


def saved(engine: StoryEngine, result) -> dict:
    return {"latents": [engine.cache.get(s.key).latents for s in result.shots],
            "status": [s.status for s in result.shots], "routing": result.routing,
            "videos": [str(s.video_path) for s in result.shots] + [str(result.story_video)]}


def renders(leader: Leader, out: Path) -> None:
    engine = leader.engine
    stop = threading.Event()
    steps = []

    def stop_after_first_step(event) -> None:
        if isinstance(event, Progress) and event.step >= 1:
            steps.append(event.step)
            stop.set()

    try:
        leader.render(stop_story(), on_event=stop_after_first_step, stop=stop)
        raise AssertionError("the render was not stopped")
    except RenderStopped as err:
        torch.save({"message": str(err), "outcomes": leader.outcomes, "steps": steps}, out / "stop.pt")
    story = tiny_story("joint")
    result = leader.render(story)
    torch.save(saved(engine, result), out / "render.pt")
    result = leader.render(story, regenerate=1)
    torch.save({**saved(engine, result), "summary": result.summary}, out / "regenerate.pt")
    first = engine.takes(story, 1)[0].key  # the joint render's take of shot 1
    result = leader.make_current(story, 1, first)
    torch.save({**saved(engine, result), "take": first}, out / "make_current.pt")
    bad = tiny_story("joint", backend="triton")  # a backend the CPU does not have
    try:
        leader.render(bad)
        raise AssertionError("rank 0 accepted a story it cannot render")
    except StoryError as err:
        torch.save({"message": str(err), "outcomes": leader.outcomes}, out / "rejected.pt")


def failures(leader: Leader, out: Path) -> None:
    time.sleep(COLLECTIVE_TIMEOUT_S + 2)  # rank 1 waits for a job longer than a render collective may
    story = tiny_story("shot_by_shot", frames=(1, 1, 1))
    leader.render(story)  # it is still there
    full = tiny_story("shot_by_shot", frames=(1, 1, 1), seeds=(4, 4, 4))
    with disk_full(leader.engine.cache):
        try:
            leader.render(full)
            raise AssertionError("a render into a full disk succeeded")
        except ResourceError as err:
            torch.save({"message": str(err), "outcomes": leader.outcomes}, out / "disk_full.pt")
    result = leader.render(full)  # still in step
    torch.save({"status": [s.status for s in result.shots]}, out / "after_disk_full.pt")
    story.global_caption += f" {FAIL_TAG}"
    errors = []
    for _ in range(2):
        started = time.perf_counter()
        try:
            leader.render(story)
            raise AssertionError("a job that failed on rank 1 succeeded")
        except RanksOutOfStep as err:
            errors.append((str(err), time.perf_counter() - started))
    torch.save({"errors": errors, "outcomes": leader.outcomes}, out / "failures.pt")


@contextlib.contextmanager
def disk_full(cache):
    """Rank 0's shot cache cannot store a take while inside."""
    def put(take) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(cache.root / "tmp"))
    cache.put = put
    try:
        yield
    finally:
        del cache.put


def refuse_tagged(engine: StoryEngine) -> None:
    """Rank 1 fails alone on stories tagged FAIL_TAG, before its first collective."""
    check = engine.check

    def failing_check(story) -> None:
        if FAIL_TAG in story.global_caption:
            raise RuntimeError("rank 1 failed on purpose")
        check(story)
    engine.check = failing_check


def main(model_dir: str, out: str, scenario: str) -> None:
    out = Path(out)
    parallel, device = start("cpu", timeout_s=COLLECTIVE_TIMEOUT_S)
    folder = out / f"rank{parallel.rank}"
    engine = StoryEngine.load(model_dir, device=device, cache_dir=folder / "cache", parallel=parallel,
                              options=SamplerOptions(preview=parallel.rank == 0))
    jobs = Jobs.open(parallel)
    if parallel.rank != 0:
        if scenario == "failures":
            refuse_tagged(engine)
        received = follow(engine, jobs)
        (out / "follow.json").write_text(json.dumps({"jobs": received, "broken": bool(jobs.broken)}))
    else:
        leader = Leader(engine, jobs)
        try:
            {"renders": renders, "failures": failures}[scenario](leader, out)
        finally:
            leader.close()
    leave(jobs)  # out of step (the failures scenario), this exits without tearing the group down


if __name__ == "__main__":
    main(*sys.argv[1:4])
