"""Crashes and two writers, with real processes: SIGKILL a headless render at random moments
(mid-sampling, mid-cache-write, mid-save) and restart; two processes render different stories
into one size-capped cache at once. Nothing partial is ever served, every finished shot is
served afterwards, saved stories stay whole, and the cap holds."""

import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from engine.shot_cache import ShotCache
from engine.story import GenerationSettings, MoCSettings, Shot, Story

ROOT = Path(__file__).resolve().parents[2]
KILLS = 12
pytestmark = pytest.mark.slow


def crash_story(tag: str, steps: int = 24) -> Story:
    shots = [Shot(f"{c} ({tag})", 3, 11 + i) for i, c in enumerate(
        ["a red square slides left", "a blue circle grows", "the red square returns", "both rest"])]
    return Story(f"shapes on grey [{tag}]", shots, GenerationSettings(
        steps=steps, guidance=2.0, height=48, width=80, fps=4, mode="shot_by_shot",
        moc=MoCSettings(top_k=2))).validate()


def _consistent(root: Path) -> set[str]:
    """Every entry on disk loads whole and decodes to its stated shape; returns the keys."""
    cache = ShotCache(root)
    keys = set()
    for folder in (root / "entries").glob("*/*"):
        take = cache.get(folder.name)
        assert take is not None, f"an entry that does not load: {folder}"
        assert take.frames.dtype == torch.uint8 and take.frames.shape[1:] == (48, 80, 3)
        assert json.loads((folder / "meta.json").read_text())["key"] == folder.name
        keys.add(folder.name)
    return keys


def _cli(story_path: Path, model: Path, cache: Path, out: Path, stderr=subprocess.PIPE) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "launch.py", "--story", str(story_path), "--model", str(model),
                             "--cache-dir", str(cache), "--out", str(out), "--device", "cpu"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)


def _lines(proc: subprocess.Popen) -> queue.Queue:
    """Each line `proc` prints as (time printed, line), then None (a thread reads its stdout)."""
    lines: queue.Queue = queue.Queue()

    def pump() -> None:
        for line in proc.stdout:
            lines.put((time.perf_counter(), line))
        lines.put(None)
    threading.Thread(target=pump, daemon=True).start()
    return lines


def _drain(lines: queue.Queue) -> list[tuple[float, str]]:
    out = []
    while (item := lines.get(timeout=300)) is not None:
        out.append(item)
    return out


def _shot_lines(lines) -> dict[int, str]:
    """{shot: status} from the CLI's `shot NN: status  S s ...` lines."""
    return {int(w[1].rstrip(":")): w[2] for w in (line.split() for line in lines)
            if len(w) > 2 and w[0] == "shot" and w[1].endswith(":")}


def _shot_wall_seconds(story_path: Path, model: Path, root: Path) -> float:
    """The longest time on this machine from a shot's first sampling step to its finished take (sampling,
    decoding, the cache write and the video): one whole render into a scratch cache, timed by its output."""
    proc = _cli(story_path, model, root / "cache", root / "out", stderr=subprocess.DEVNULL)
    timed = _drain(_lines(proc))
    assert proc.wait(timeout=60) == 0
    starts = [t for t, line in timed if "step 1/" in line]
    ends = [t for t, line in timed if line.startswith("shot ")]
    assert len(starts) == len(ends) == 4, timed
    return max(end - start for start, end in zip(starts, ends))


def test_sigkill_at_random_moments_loses_nothing(tiny_model_dir, tmp_path):
    """Each run is killed at a random moment measured from its first sampling step, a random fraction
    (up to 1.25) of the time one shot takes on this machine, so the kills land mid-sampling,
    mid-decode, mid-cache-write and mid-save on a fast machine and a slow one alike."""
    story_path = crash_story("kill").save(tmp_path / "story.json")
    saved = story_path.read_bytes()
    shot_s = _shot_wall_seconds(story_path, tiny_model_dir, tmp_path / "calibration")
    cache, rng = tmp_path / "cache", random.Random(7)
    finished: set[int] = set()  # shots a killed run reported done: they must be served afterwards
    kills = 0
    for attempt in range(KILLS):
        proc = _cli(story_path, tiny_model_dir, cache, tmp_path / f"out{attempt}", stderr=subprocess.DEVNULL)
        lines, seen = _lines(proc), []
        while (item := lines.get(timeout=300)) is not None and "step 1/" not in item[1]:
            seen.append(item[1])
        if item is not None:  # sampling has begun: kill somewhere in or just after this shot
            time.sleep(rng.uniform(0.0, 1.25) * shot_s)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
            seen += [line for _, line in _drain(lines)]
        proc.wait(timeout=60)
        finished |= set(_shot_lines(seen))
        _consistent(cache)
        assert story_path.read_bytes() == saved
    assert kills >= KILLS // 2, (f"only {kills} of {KILLS} runs were killed mid-render: "
                                 "the test means little unless most are")
    proc = _cli(story_path, tiny_model_dir, cache, tmp_path / "final")
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err
    status = _shot_lines(out.splitlines())
    assert sorted(status) == [0, 1, 2, 3]
    assert all(status[s] == "cached" for s in finished), (finished, status)
    assert not list((cache / "tmp").iterdir()) or all(
        time.time() - p.stat().st_mtime < 3600 for p in (cache / "tmp").iterdir())  # only staging of killed writers
    print(f"{kills} SIGKILLs (a shot takes {shot_s:.2f} s); shots finished before a kill: "
          f"{sorted(finished)}; final: {status}")


SAVER = """
import sys, itertools
from engine.story import Story
a, b, path = Story.load(sys.argv[1]), Story.load(sys.argv[2]), sys.argv[3]
for i in itertools.count():
    (a if i % 2 else b).save(path)
"""


def test_sigkill_mid_save_leaves_one_whole_story(tmp_path):
    a = crash_story("a").save(tmp_path / "a.json")
    b = crash_story("b", steps=7).save(tmp_path / "b.json")
    target, rng = tmp_path / "story.json", random.Random(3)
    allowed = {a.read_bytes(), b.read_bytes()}
    for _ in range(KILLS):
        proc = subprocess.Popen([sys.executable, "-c", SAVER, str(a), str(b), str(target)], cwd=ROOT)
        time.sleep(rng.uniform(0.3, 1.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        if target.exists():
            assert target.read_bytes() in allowed
            Story.load(target)
    assert target.exists()


WRITER = """
import sys, json
from engine.engine import StoryEngine
from engine.model import StoryModel
from engine.shot_cache import ShotCache
from engine.story import Story
model, story, cache, out, cap = sys.argv[1:6]
engine = StoryEngine(StoryModel.load(model, device="cpu"), ShotCache(cache, max_bytes=int(cap)), out)
result = engine.render(Story.load(story), out_dir=out)
print(json.dumps([[r.key, r.status] for r in result.shots]))
"""


def test_two_processes_render_into_one_capped_cache(tiny_model_dir, tiny_model, tmp_path):
    from engine.engine import StoryEngine
    stories = [crash_story("left", steps=6), crash_story("right", steps=5)]
    paths = [s.save(tmp_path / f"s{i}.json") for i, s in enumerate(stories)]
    cap = 5 * 48 * 80 * 3 * 3  # about five takes' frames: the eight takes cannot all stay
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(tiny_model_dir), str(p), str(tmp_path / "cache"),
                               str(tmp_path / f"out{i}"), str(cap)], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for i, p in enumerate(paths)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert all(status == "generated" for r in results for _, status in r)
    keys = _consistent(tmp_path / "cache")
    cache = ShotCache(tmp_path / "cache", max_bytes=cap)
    assert cache.stats().bytes <= cap + max(p.stat().st_size for p in (tmp_path / "cache" / "entries").rglob("*"))
    # each process wrote what a process alone writes: compare the surviving takes with a solo render
    solo = StoryEngine(tiny_model, ShotCache(tmp_path / "solo"), tmp_path / "solo-out")
    for story, r in zip(stories, results):
        alone = solo.render(story)
        for (key, _), shot in zip(r, alone.shots):
            assert key == shot.key
            if key in keys:
                assert torch.equal(cache.get(key).frames, solo.cache.get(key).frames)
