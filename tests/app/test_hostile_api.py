"""A hostile client against a running app: 1,000 random bad requests through every named
endpoint and raw HTTP get readable errors (never the generic 'upstream app raised an exception'),
the file routes serve nothing the app did not make, a login is enforced when set, and afterwards
the app still generates."""

from __future__ import annotations

import json
import random
import time
import urllib.error
import urllib.request

import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

from .conftest import free_port, tiny_story

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")]

GENERIC = "has not enabled verbose error reporting"  # what Gradio says for an exception the app did not phrase
NAMED_REQUESTS = 800  # sent or attempted (a few lone surrogates cannot leave the client)
RAW_REQUESTS = 300


def _odd_string(rng: random.Random) -> str:
    pool = ["", " ", "\x00", "\ud800", "💥" * 50, "../../etc/passwd", "<script>alert(1)</script>", "NaN",
            "{" * 40, "x" * rng.choice((10, 3000, 200_000)), "\u202eevil", "%s%n", "null", "-1", "1e309"]
    return rng.choice(pool)


def _odd_value(rng: random.Random, depth: int = 0):
    kind = rng.randrange(9 if depth < 3 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice([0, -1, 1, 2**31, -2**63, 10**30, 7])
    if kind == 3:
        return rng.choice([0.5, -0.0, 1e308, -1e-308, 3.0])
    if kind in (4, 5):
        return _odd_string(rng)
    if kind == 6:
        return [_odd_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {_odd_string(rng)[:20]: _odd_value(rng, depth + 1) for _ in range(rng.randrange(4))}


def _bad_story(rng: random.Random):
    """A valid story with one field replaced, a field added, or something else entirely."""
    story = tiny_story("hostile").to_dict()
    r = rng.random()
    if r < 0.15:
        return _odd_value(rng)
    if r < 0.25:
        return json.dumps(story)[: rng.randrange(1, 200)]  # truncated JSON text
    paths = [("global_caption",), ("shots",), ("settings",), ("version",), ("shots", 0), ("shots", 0, "caption"),
             ("shots", 0, "frames"), ("shots", 0, "seed"), ("shots", 1, "locked"), ("settings", "steps"),
             ("settings", "guidance"), ("settings", "mode"), ("settings", "height"), ("settings", "moc"),
             ("settings", "moc", "top_k"), ("settings", "moc", "backend"), ("settings", "context_noise")]
    path = rng.choice(paths)
    target = story
    for part in path[:-1]:
        target = target[part]
    bad = _odd_value(rng)
    while isinstance(bad, (int, float)) and not isinstance(bad, bool) and path[-1] in ("seed",) and 0 <= bad < 2**32:
        bad = -7
    target[path[-1]] = bad
    if rng.random() < 0.2:
        story[_odd_string(rng)[:10] or "extra"] = 1
    return story


def _still_valid(story) -> bool:
    """A mutation can leave a story valid (e.g. a caption replaced by another string)."""
    from engine.story import Story, StoryError
    try:
        Story.from_json(story) if isinstance(story, str) else Story.from_dict(story)
        return True
    except StoryError:
        return False


def test_a_thousand_bad_requests_then_it_still_generates(app_url):
    rng = random.Random(20261128)
    client = Client(app_url, verbose=False)
    outcomes = {"readable_error": 0, "accepted": 0, "unsendable": 0}
    messages: dict[str, int] = {}
    started = time.monotonic()
    while sum(outcomes.values()) < NAMED_REQUESTS:
        endpoint = rng.choice(["/generate", "/regenerate", "/save_story", "/load_story", "/example_story",
                               "/takes", "/make_current", "/recall"])
        story = _bad_story(rng)
        if endpoint in ("/generate", "/regenerate") and _still_valid(story):
            continue  # a valid story would render: not a bad request
        either = tiny_story("h").to_dict() if rng.random() < 0.5 else story
        args = {"/generate": (story,), "/regenerate": (either, _odd_value(rng)),
                "/save_story": (story,), "/load_story": (None if rng.random() < 0.5 else _odd_string(rng)[:50],),
                "/example_story": (_odd_string(rng)[:50],), "/takes": (either, _odd_value(rng)),
                "/make_current": (either, _odd_value(rng), _odd_value(rng)),  # never a cached take's key
                "/recall": (either, _odd_value(rng), _odd_value(rng), _odd_value(rng), rng.random() < 0.5)}[endpoint]
        index = args[1] if endpoint == "/regenerate" else None
        if (isinstance(index, (int, float)) and float(index).is_integer()  # the Number input takes true as 1
                and 0 <= index < 3 and _still_valid(args[0])):  # a valid index of a valid story: make it bad
            args = (args[0], 99)
        try:
            client.predict(*args, api_name=endpoint)
            # e.g. /save_story of a story the mutation left valid; the takes of a valid story's shot
            # (an empty list); /recall where a random shot, layer and frame happened to be valid
            outcomes["accepted"] += 1
            assert endpoint in ("/save_story", "/example_story", "/takes", "/recall"), (endpoint, args)
        except AppError as err:
            assert GENERIC not in str(err) and "Traceback" not in str(err), (endpoint, str(args)[:300], str(err))
            messages[str(err)[:60]] = messages.get(str(err)[:60], 0) + 1
            outcomes["readable_error"] += 1
        except UnicodeEncodeError:  # a lone surrogate the client cannot send (raw HTTP below sends it escaped)
            outcomes["unsendable"] += 1
        except ValueError as err:  # the client refusing to upload a non-existent file
            assert endpoint == "/load_story", err
            outcomes["readable_error"] += 1
    # raw HTTP: malformed bodies, wrong methods, traversal in the file route
    for i in range(RAW_REQUESTS):
        kind = i % 4
        try:
            if kind == 0:
                body = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 400)))
                req = urllib.request.Request(app_url + "gradio_api/call/generate", data=body, method="POST",
                                             headers={"Content-Type": "application/json"})
            elif kind == 1:
                body = json.dumps({"data": [_bad_story(rng)]}, allow_nan=True).encode()
                req = urllib.request.Request(app_url + "gradio_api/queue/join", data=body, method="POST",
                                             headers={"Content-Type": "application/json"})
            elif kind == 2:
                nested = "[" * 100_000 + "]" * 100_000
                req = urllib.request.Request(app_url + "gradio_api/call/save_story", data=nested.encode(),
                                             method="POST", headers={"Content-Type": "application/json"})
            else:
                target = rng.choice(["/etc/passwd", "../../../../etc/passwd", "%2e%2e/%2e%2e/etc/passwd",
                                     str(__file__), "/proc/self/environ"])
                req = urllib.request.Request(app_url + "gradio_api/file=" + target)
            with urllib.request.urlopen(req, timeout=30) as resp:
                data = resp.read()
                assert kind != 3 or b"root:" not in data and b"import" not in data, target
        except urllib.error.HTTPError as err:
            assert err.code < 500 or kind in (0, 1, 2), err  # a 5xx only for bodies the framework rejects
    seconds = time.monotonic() - started
    # afterwards the app generates normally
    video, shot_videos, result = client.predict(tiny_story(shots=2).to_dict(), api_name="/generate")
    assert result["state"] == "finished" and len(shot_videos) == 2
    sent = sum(outcomes.values()) - outcomes["unsendable"] + RAW_REQUESTS
    print(f"{sent} bad requests sent in {seconds:.1f} s: {outcomes}, {RAW_REQUESTS} raw HTTP")
    for text, count in sorted(messages.items(), key=lambda kv: -kv[1])[:12]:
        print(f"  {count:4d}  {text}")
    assert sent >= 1000 and outcomes["readable_error"] >= 600


def test_uploads_are_size_capped_and_parsed_as_data(app_url, tmp_path):
    from gradio_client import handle_file
    client = Client(app_url, verbose=False)
    big = tmp_path / "big.json"
    big.write_text(json.dumps({**tiny_story("big").to_dict(), "global_caption": "x" * (2 << 20)}))
    with pytest.raises(Exception) as err:  # refused at upload, before any parsing
        client.predict(handle_file(str(big)), api_name="/load_story")
    assert GENERIC not in str(err.value)
    code = tmp_path / "story.json"
    code.write_text("__import__('os').system('touch " + str(tmp_path / "pwned") + "')")
    with pytest.raises(AppError, match="not valid JSON"):
        client.predict(handle_file(str(code)), api_name="/load_story")
    assert not (tmp_path / "pwned").exists()


def test_login_is_enforced_when_set(story_engine, tmp_path):
    from app.server import StoryboardApp
    app = StoryboardApp(story_engine, out_root=tmp_path / "out")
    port = free_port()
    app.launch(host="127.0.0.1", port=port, prevent_thread_lock=True, quiet=True, auth=("ada", "s3cret"))
    try:
        url = f"http://127.0.0.1:{port}/"
        with pytest.raises(Exception):
            Client(url, verbose=False).predict(api_name="/info")
        info = Client(url, auth=("ada", "s3cret"), verbose=False).predict(api_name="/info")
        assert info["model"]
    finally:
        app.close()


def test_out_of_memory_is_a_message_and_the_app_keeps_serving(app_url, monkeypatch):
    import torch
    from engine.sampler import StorySampler
    client = Client(app_url, verbose=False)
    real = StorySampler.sample

    def oom(self, run, run_index=0, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")
    monkeypatch.setattr(StorySampler, "sample", oom)
    with pytest.raises(AppError, match=r"Out of CPU memory: lower settings\.height x settings\.width"):
        client.predict(tiny_story("oom").to_dict(), api_name="/generate")
    monkeypatch.setattr(StorySampler, "sample", real)
    *_, result = client.predict(tiny_story("oom").to_dict(), api_name="/generate")
    assert result["state"] == "finished"


def test_two_sessions_generate_at_once_and_both_are_right(app_url):
    """Two clients submit different stories at the same moment: both finish, and rendering each
    again serves every shot from the cache under the same keys (what each stored is its own)."""
    stories = [tiny_story("left", shots=2), tiny_story("right", shots=3)]
    clients = [Client(app_url, verbose=False) for _ in stories]
    jobs = [c.submit(s.to_dict(), api_name="/generate") for c, s in zip(clients, stories)]
    results = [job.result(timeout=300)[2] for job in jobs]
    assert [r["state"] for r in results] == ["finished", "finished"]
    assert [len(r["shots"]) for r in results] == [2, 3]
    for client, story, first in zip(clients, stories, results):
        *_, again = client.predict(story.to_dict(), api_name="/generate")
        assert [s["status"] for s in again["shots"]] == ["cached"] * len(story.shots)
        assert [s["key"] for s in again["shots"]] == [s["key"] for s in first["shots"]]


def test_memory_pins_through_the_api(app_url):
    story = tiny_story("pins", shots=3)
    story.shots[2].pins, story.shots[2].blocks = [0], [1]
    *_, result = Client(app_url, verbose=False).predict(story.validate().to_dict(), api_name="/generate")
    assert result["state"] == "finished"
    assert result["routing"]["pins"] == [[2, 0]] and result["routing"]["blocks"] == [[2, 1]]
    bad = story.to_dict()
    bad["shots"][1]["pins"] = [1]
    with pytest.raises(AppError, match=r"Shot 2 › pins: must name earlier shots"):
        Client(app_url, verbose=False).predict(bad, api_name="/generate")
