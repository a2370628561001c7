"""The app across 2 gloo processes (engine/ranks.py): rank 0 leads, rank 1 follows, on the CPU.

Each torchrun launch (tests/engine/ranks_worker.py, tests/engine/ranks_app.py) plays a scenario
and saves what rank 0 saw; the renders are compared with the same jobs in this process (latents
within float32 tolerance, routing reports to 1e-6, the same statuses and take keys). A hang fails:
the launch has a timeout, and the render collectives one of their own.
"""

import json
import threading
from pathlib import Path

import pytest
import torch

from engine.engine import StoryEngine
from engine.events import Progress, RenderStopped
from engine.parallel import SequenceParallel
from engine.ranks import Jobs, Leader, follow, outcome_of
from engine.shot_cache import ShotCache
from engine.story import StoryError
from tests.engine import ranks_worker
from tests.engine.conftest import tiny_story
from tests.engine.test_parallel import close_reports, torchrun


@pytest.fixture(scope="module")
def served(tiny_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ranks")
    proc = torchrun("tests/engine/ranks_worker.py", tiny_model_dir, out, "renders")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def alone(tiny_model, tmp_path_factory) -> dict:
    """The jobs of the renders scenario, in one process, in the same order."""
    root = tmp_path_factory.mktemp("alone")
    engine = StoryEngine(tiny_model, ShotCache(root / "shots"), root)
    stop = threading.Event()
    with pytest.raises(RenderStopped) as stopped:
        engine.render(ranks_worker.stop_story(), stop=stop,
                      on_event=lambda e: stop.set() if isinstance(e, Progress) and e.step >= 1 else None)
    story = tiny_story("joint")
    first = ranks_worker.saved(engine, engine.render(story))
    regenerated = ranks_worker.saved(engine, engine.render(story, regenerate=1))
    take = engine.takes(story, 1)[0].key
    current = ranks_worker.saved(engine, engine.make_current(story, 1, take))
    return {"stop": str(stopped.value), "render": first, "regenerate": regenerated,
            "make_current": {**current, "take": take}}


def same_render(got: dict, want: dict) -> None:
    assert got["status"] == want["status"]
    for shot, (a, b) in enumerate(zip(got["latents"], want["latents"], strict=True)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"shot {shot}: {m}")
    close_reports(got["routing"], want["routing"])


def test_a_render_sent_to_the_other_rank_renders_what_one_process_renders(served, alone):
    got = torch.load(served / "render.pt", weights_only=False)
    assert got["status"] == ["generated"] * 3
    same_render(got, alone["render"])
    assert all(Path(v).is_file() for v in got["videos"])  # rank 0 wrote the MP4s


def test_a_regeneration_sent_to_the_other_rank(served, alone):
    got = torch.load(served / "regenerate.pt", weights_only=False)
    assert got["status"] == ["cached", "generated", "cached"]  # shot 0 and 2 served by rank 0's cache
    assert got["summary"]["both_sides"]  # shot 2 was context on both ranks
    same_render(got, alone["regenerate"])


def test_make_current_sent_to_the_other_rank(served, alone):
    got = torch.load(served / "make_current.pt", weights_only=False)
    assert got["take"] == alone["make_current"]["take"]
    same_render(got, alone["make_current"])


def test_stop_after_the_first_step_stops_both_ranks_at_the_next(served, alone):
    got = torch.load(served / "stop.pt", weights_only=False)
    assert got["steps"] == [1]  # Stop was pressed once, after step 1
    assert got["message"] == alone["stop"] == "stopped by request at step 2/6 of shots 1, 2, 3"
    assert got["outcomes"] == [f"stopped: {got['message']}"] * 2  # rank 1 stopped at the same step


def test_a_story_rank0_rejects_is_never_sent(served):
    got = torch.load(served / "rejected.pt", weights_only=False)
    assert got["message"].startswith("settings.moc.backend: backend='triton' is unavailable")
    assert got["outcomes"] == ["ok", "ok"]  # the make_current before it, the last job both ranks ran
    assert json.loads((served / "follow.json").read_text()) == {"jobs": 4, "broken": False}  # stop, render, regenerate, make_current


def test_the_quit_job_ends_the_other_rank(served):
    assert (served / "follow.json").is_file()  # written after `follow` returned (the launch exited 0)


def test_the_other_rank_writes_no_files(served):
    assert list((served / "rank0" / "cache" / "renders").rglob("story.mp4"))
    assert list((served / "rank0" / "cache" / "shots" / "entries").rglob("meta.json"))
    assert not (served / "rank1").exists()  # its cache folder: no takes, MP4s, reports, nor folders


def test_idle_waits_outlast_the_render_timeout_and_failures_keep_or_report_the_step(tiny_model_dir, tmp_path):
    """Idle longer than a render collective may wait; a full disk on rank 0 fails every rank alike
    (they stay in step); a failure on rank 1 alone puts them out of step, which rank 0 reports."""
    proc = torchrun("tests/engine/ranks_worker.py", tiny_model_dir, tmp_path, "failures")
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(tmp_path / "failures.pt", weights_only=False)
    (first, waited), (again, at_once) = got["errors"]
    assert "rank 1: error: RuntimeError: rank 1 failed on purpose" in first
    assert first.startswith("The 2 processes did not end the render alike") and "restart the app" in first
    assert waited < 4 * ranks_worker.COLLECTIVE_TIMEOUT_S  # rank 0 waited for its collective timeout, no more
    assert again == first and at_once < 1  # refused at once, never sent
    full = torch.load(tmp_path / "disk_full.pt", weights_only=False)
    assert full["message"].startswith("The disk is full")
    assert full["outcomes"] == [f"error: ResourceError: {full['message']}"] * 2  # rank 1 raised it too: in step
    after = torch.load(tmp_path / "after_disk_full.pt", weights_only=False)
    assert after["status"] == ["generated"] * 3
    assert json.loads((tmp_path / "follow.json").read_text()) == {"jobs": 4, "broken": True}  # the refused job never came
    for rank in (0, 1):  # both knew they were out of step, and ended without tearing the group down
        assert f"rank {rank} ends without tearing down the process group: The 2 processes" in proc.stderr
    assert not (tmp_path / "rank1").exists()


def test_launch_under_torchrun_without_a_story_serves_from_rank0(tiny_model_dir, tmp_path):
    proc = torchrun("tests/engine/ranks_app.py", tmp_path, "--model", tiny_model_dir, "--cache-dir",
                    tmp_path / "cache", "--device", "cpu", "--port", "7861")
    assert proc.returncode == 0, proc.stderr[-3000:]  # rank 1 left `follow` after the app closed
    assert "sequence parallel: 2 processes, 1 heads each, on cpu; rank 0 serves the app" in proc.stdout
    seen = json.loads((tmp_path / "app.json").read_text())
    assert seen["port"] == 7861 and "Sequence parallel</th><td>2 processes" in seen["engine_html"]
    assert seen["stop"] == ["Stopped", "stopped by request at step 2/6 of shots 1, 2, 3"]
    assert seen["render"] == "Finished"
    assert seen["videos"] == ["shot_00.mp4", "shot_01.mp4", "shot_02.mp4", "story.mp4"]
    assert len(list((tmp_path / "cache" / "shots" / "entries").rglob("meta.json"))) == 3


def test_outcomes_name_how_a_job_ended():
    assert outcome_of(None) == "ok"
    assert outcome_of(RenderStopped("stopped by request at step 2/6")) == "stopped: stopped by request at step 2/6"
    assert outcome_of(StoryError("shots[1].frames", "too long")) == "error: StoryError: shots[1].frames: too long"


def test_leader_and_follower_refuse_the_wrong_rank(tiny_model, tmp_path):
    jobs = Jobs(SequenceParallel(rank=1, world=2), group=None)
    alone = StoryEngine(tiny_model, ShotCache(tmp_path / "shots"), tmp_path)
    with pytest.raises(ValueError, match="rank 0 with a sequence-parallel engine"):
        Leader(alone, jobs)
    with pytest.raises(ValueError, match="ranks other than 0"):
        follow(alone, jobs)
    with pytest.raises(RuntimeError, match="only rank 0 sends jobs"):
        jobs.send(None)
    with pytest.raises(ValueError, match="only a rank other than 0"):
        StoryEngine(tiny_model, None, tmp_path)
