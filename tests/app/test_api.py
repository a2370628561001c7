"""The named endpoints, driven with gradio_client against a running app and the real engine.

Covers: generate a story; regenerate one shot while the others come from the shot cache; stop a
run within one sampling step; save and load a story; a second client waiting in the queue sees
its place; invalid stories come back as readable errors.
"""

from __future__ import annotations

import hashlib
import json
import time
import urllib.request
from pathlib import Path

import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

from engine.model import DEFAULT_MODEL_DIR
from engine.story import Story

from .conftest import long_story, tiny_story

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")]


def sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture
def client(app_url):
    return Client(app_url, verbose=False)


def test_endpoints_are_named(client):
    names = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert {"/generate", "/regenerate", "/stop", "/save_story", "/load_story", "/example_story", "/info",
            "/recall", "/takes", "/make_current"} <= names
    info = client.predict(api_name="/info")
    assert info["model"] and isinstance(info["backends"], list) and info["examples"] == ["tiny"]
    assert info["processes"] == 1  # one process (torchrun launch.py: N)


def test_the_editor_says_what_the_default_model_knows(app_url):
    config = json.loads(urllib.request.urlopen(app_url + "config", timeout=30).read())
    props = [c.get("props", {}) for c in config["components"]]
    note = next(p for p in props if p.get("elem_id") == "model-note")
    assert note["label"] == "What the default model knows" and note.get("visible", True)
    text = next(str(p["value"]) for p in props if "draws **ShapeStory**" in str(p.get("value", "")))
    assert "Kip, a small red triangle" in text and "--model PATH" in text
    caveat = json.loads((DEFAULT_MODEL_DIR / "storyboard.json").read_text()).get("caveat", "")
    assert caveat in text  # what the shipped model cannot do yet is said where its vocabulary is


def test_generate_then_regenerate_one_shot(client):
    story = tiny_story(shots=3)
    video, shot_videos, result = client.predict(story.to_dict(), api_name="/generate")
    assert result["state"] == "finished", result
    assert [s["status"] for s in result["shots"]] == ["generated"] * 3, result["shots"]
    assert Path(video).stat().st_size > 0 and len(shot_videos) == 3
    assert all(s["seed"] >= 0 for s in result["shots"])  # seed -1 resolved to the seed used
    routing = result["routing"]
    assert routing["shot_frames"] == [2, 2, 2] and 0.0 <= routing["sparsity"] <= 1.0
    first = [sha(p) for p in shot_videos]

    # The same request again: every shot from the cache, identical bytes.
    _, again_videos, again = client.predict(story.to_dict(), api_name="/generate")
    assert [s["status"] for s in again["shots"]] == ["cached"] * 3, again.get("shots", again)
    assert [sha(p) for p in again_videos] == first, (result["shots"], again["shots"])

    # Regenerate the middle shot with a new seed; shot 0 is served from the cache unchanged.
    story.shots[1].seed = result["shots"][1]["seed"] + 1
    job = client.submit(story.to_dict(), 1, api_name="/regenerate")
    _, regen_videos, regen = job.result(timeout=120)
    # before its steps, the stream named each context pass it ran: shot 0, then shot 2 (both sides)
    running = [r for _, _, r in job.outputs() if r and r.get("state") == "running"]
    assert [r["context"] for r in running if r["context"] is not None] == [0, 2], running
    assert [r["context_shots"] for r in running if r["context"] is not None] == [[0], [2]], running
    assert regen["summary"]["context_passes"] == {"run": 2, "kept": 0}
    context = f"first render {result['shots']}; regenerate {regen.get('shots', regen)}"  # for a failure report
    statuses = [s["status"] for s in regen["shots"]]
    assert statuses[0] == "cached" and statuses[1] == "generated" and statuses[2] != "generated", context
    by_index = {s["index"]: s for s in regen["shots"]}
    assert by_index[0]["key"] == result["shots"][0]["key"], context
    assert by_index[1]["key"] != result["shots"][1]["key"], context
    assert by_index[1]["seed"] == story.shots[1].seed, context
    regen_hashes = {Path(p).name: sha(p) for p in regen_videos}
    names = {s["index"]: s["video"] for s in regen["shots"]}
    assert regen_hashes[names[0]] == first[0], context
    assert regen_hashes[names[1]] != first[1], context
    # both sides as context (the default): the later shot kept its take, byte for byte, not stale
    assert regen["summary"]["both_sides"] is True and statuses[2] == "cached", context
    assert regen_hashes[names[2]] == first[2], context
    # one-sided on request: the later shot's take is kept but stale (its context changed)
    story.shots[1].seed += 1
    job = client.submit(story.to_dict(), 1, False, api_name="/regenerate")
    *_, one = job.result(timeout=120)
    assert [s["status"] for s in one["shots"]] == ["cached", "generated", "stale"], one["shots"]
    # its one context pass (shot 0) is the server's kept K/V of the regeneration before: not run again
    assert one["summary"]["context_passes"] == {"run": 0, "kept": 1}


def wait_for_step(job, at_least: int = 1, timeout: float = 120.0) -> dict:
    """Poll the job's streamed outputs until a progress update at step >= at_least."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for _, _, result in job.outputs()[::-1]:
            if result and result.get("state") == "running" and result.get("step", 0) >= at_least:
                return result
        if job.done():
            raise AssertionError(f"the run ended before step {at_least}: {job.outputs()[-1:]}")
        time.sleep(0.05)
    raise AssertionError(f"no progress within {timeout} s")


def test_stop_a_run_within_one_step(client):
    story = long_story()
    job = client.submit(story.to_dict(), api_name="/generate")
    seen = wait_for_step(job, at_least=2)
    asked = time.monotonic()
    assert client.predict(api_name="/stop") == "stopping"
    _, _, result = job.result(timeout=60)
    took = time.monotonic() - asked
    assert result["state"] == "stopped", result
    # The sampler checks the flag every step: at most the step in flight when Stop arrived
    # completes (counted on the server, where the flag is set and the steps happen).
    assert result["steps_after_stop"] is not None and 0 <= result["steps_after_stop"] <= 1, result
    steps = [r["step"] for _, _, r in job.outputs() if r and r.get("state") == "running"]
    assert seen["step"] <= max(steps) < story.settings.steps
    assert took < 30, took
    assert client.predict(api_name="/stop") == "nothing to stop"


def test_a_second_client_sees_its_place_in_the_queue(client, app_url):
    other = Client(app_url, verbose=False)
    first = client.submit(long_story().to_dict(), api_name="/generate")
    wait_for_step(first, at_least=1)
    second = other.submit(tiny_story().to_dict(), api_name="/generate")
    deadline = time.monotonic() + 30
    while not any(r and r.get("state") == "queued" for _, _, r in second.outputs()):
        assert time.monotonic() < deadline, second.outputs()
        time.sleep(0.05)
    queued = next(r for _, _, r in second.outputs() if r and r.get("state") == "queued")
    assert queued["position"] == 1
    client.predict(api_name="/stop")
    assert first.result(timeout=60)[2]["state"] == "stopped"
    assert second.result(timeout=120)[2]["state"] == "finished"


def test_save_and_load_a_story(client, tmp_path):
    story = tiny_story(shots=2)
    story.shots[1].seed, story.shots[1].locked = 1234, True
    saved = client.predict(story.to_dict(), api_name="/save_story")
    assert Story.load(saved).to_dict() == story.to_dict()
    loaded = client.predict(handle_file(saved), api_name="/load_story")
    assert loaded == story.to_dict()

    example = client.predict("tiny", api_name="/example_story")
    assert Story.from_dict(example).shots


def test_invalid_stories_are_readable_errors(client, tmp_path):
    story = tiny_story(shots=2).to_dict()
    story["shots"][1]["caption"] = "   "
    with pytest.raises(AppError, match="Shot 2 › caption: must not be empty"):
        client.predict(story, api_name="/generate")
    with pytest.raises(AppError, match="shot must be a shot index"):
        client.predict(tiny_story().to_dict(), 7, api_name="/regenerate")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"global_caption": "x", "shots": [{"caption": "a", "frames": 0}]}))
    with pytest.raises(AppError, match="Shot 1 › frames: must be in"):
        client.predict(handle_file(str(bad)), api_name="/load_story")
    with pytest.raises(AppError, match="not valid JSON"):
        client.predict("{not json", api_name="/save_story")


def test_recall_of_a_shot_as_json_with_thumbnails(client):
    """/recall: what the last shot of the story's current takes recalled, ranked, with pictures."""
    import base64
    import io

    from PIL import Image

    story = tiny_story(shots=3)
    with pytest.raises(AppError, match="has no take for this story yet"):
        client.predict(story.to_dict(), 2, None, None, True, api_name="/recall")
    *_, result = client.predict(story.to_dict(), api_name="/generate")
    assert result["state"] == "finished", result
    got = client.predict(story.to_dict(), 2, None, None, True, api_name="/recall")
    assert got["shot"] == 2 and got["layer"] is None and got["frame"] is None and got["recorded"]
    assert got["key"] == result["shots"][2]["key"] and got["shot_frames"] == [2, 2, 2]
    recalled = got["recalled"]
    assert recalled and all(r["shot"] < 2 and 0 <= r["frame"] < 2 for r in recalled), recalled
    assert sum(r["share"] for r in recalled) == pytest.approx(1.0, abs=1e-3)
    assert [r["share"] for r in recalled] == sorted((r["share"] for r in recalled), reverse=True)
    head, data = recalled[0]["thumbnail"].split(",", 1)
    assert head == "data:image/png;base64"
    assert Image.open(io.BytesIO(base64.b64decode(data))).size == (96, 64)  # 96x64 frames stay 96 wide
    # narrowed to one layer and one query frame: still a ranking over earlier shots, no pictures asked
    one = client.predict(story.to_dict(), 2, 1, 0, False, api_name="/recall")
    assert one["layer"] == 1 and one["frame"] == 0 and "thumbnail" not in one["recalled"][0]
    assert sum(r["share"] for r in one["recalled"]) == pytest.approx(1.0, abs=1e-3)
    assert client.predict(story.to_dict(), 0, None, None, False, api_name="/recall")["recalled"] == []
    with pytest.raises(AppError, match="frame must be an integer in \\[0, 1\\]"):
        client.predict(story.to_dict(), 2, None, 5, False, api_name="/recall")
    with pytest.raises(AppError, match="shot must be a shot index"):
        client.predict(story.to_dict(), 3, None, None, False, api_name="/recall")


def test_takes_list_and_make_an_earlier_one_current(client):
    story = tiny_story(shots=2)
    _, first_videos, first = client.predict(story.to_dict(), api_name="/generate")
    keys = [s["key"] for s in first["shots"]]
    assert [s["take"] for s in first["story"]["shots"]] == keys  # the story remembers what it showed
    _, _, again = client.predict(story.to_dict(), 1, False, api_name="/regenerate")
    assert again["shots"][1]["key"] != keys[1]

    videos, listed = client.predict(story.to_dict(), 1, api_name="/takes")
    takes = listed["takes"]
    assert [t["key"] for t in takes] == [keys[1], again["shots"][1]["key"]]  # oldest first
    assert [t["current"] for t in takes] == [False, True] and [t["number"] for t in takes] == [1, 2]
    assert len(videos) == 2 and sha(videos[0]) == sha(first_videos[1])  # take 1 is the first video

    _, shot_videos, switched = client.predict(again["story"], 1, keys[1], api_name="/make_current")
    assert switched["state"] == "finished", switched
    assert [s["key"] for s in switched["shots"]] == keys and switched["shots"][1]["status"] == "cached"
    assert sha(shot_videos[1]) == sha(first_videos[1])
    _, listed = client.predict(switched["story"], 1, api_name="/takes")
    assert [t["current"] for t in listed["takes"]] == [True, False]

    for take in (keys[0], "", "../../etc/passwd"):
        with pytest.raises(AppError, match="not a cached take of shot 2"):
            client.predict(story.to_dict(), 1, take, api_name="/make_current")
    for shot in (2, 0.5, -1):
        with pytest.raises(AppError, match=r"shot must be a shot index in \[0, 1\]"):
            client.predict(story.to_dict(), shot, api_name="/takes")
    bad = story.to_dict()
    bad["shots"][1]["take"] = "NOT-HEX"
    with pytest.raises(AppError, match="Shot 2 › take: must be"):
        client.predict(bad, 1, api_name="/takes")
