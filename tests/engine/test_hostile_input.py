"""Hostile input to the story loader, the CLI and model folders: every one ends in a StoryError /
ModelError naming the field, or on the CLI in one line on stderr with a non-zero exit, never a
traceback."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from engine.model import ModelError, StoryModel
from engine.story import MAX_JSON_DEPTH, MAX_STORY_BYTES, Story, StoryError, json_depth

ROOT = Path(__file__).resolve().parents[2]
GOOD = {"version": 1, "global_caption": "A story on the sky.",
        "shots": [{"caption": "Kip, a small red circle, bounces.", "frames": 2, "seed": 3}],
        "settings": {"steps": 2, "height": 32, "width": 48}}

# documents a hostile user might send, each with the field the error must name
HOSTILE = {
    "nested 5,000 deep": ("[" * 5000 + "]" * 5000, "nests 5000 levels"),
    "nested 100,000 deep (object)": ('{"a":' * 100_000 + "1" + "}" * 100_000, "nests"),
    "NaN": (json.dumps(GOOD).replace('"steps": 2', '"steps": NaN'), "NaN"),
    "Infinity": (json.dumps(GOOD).replace('"steps": 2', '"steps": Infinity'), "Infinity"),
    "-Infinity seed": (json.dumps(GOOD).replace('"seed": 3', '"seed": -Infinity'), "-Infinity"),
    "a 5,000-digit integer": (json.dumps(GOOD).replace('"seed": 3', '"seed": 1' + "0" * 5000), "json"),
    "a huge seed": (json.dumps(GOOD).replace('"seed": 3', '"seed": 1' + "0" * 30), "shots[0].seed"),
    "negative frames": (json.dumps(GOOD).replace('"frames": 2', '"frames": -4'), "shots[0].frames"),
    "zero steps": (json.dumps(GOOD).replace('"steps": 2', '"steps": 0'), "settings.steps"),
    "frames as text": (json.dumps(GOOD).replace('"frames": 2', '"frames": "2"'), "shots[0].frames"),
    "unknown field": (json.dumps({**GOOD, "colour": "red"}), "colour"),
    "missing shots": (json.dumps({"global_caption": ""}), "shots"),
    "version 0": (json.dumps({**GOOD, "version": 0}), "version"),
    "version 99": (json.dumps({**GOOD, "version": 99}), "version"),
    "lone surrogate": (json.dumps(GOOD).replace("Kip,", "Kip \\ud800,"), "shots[0].caption"),
    "NUL in a caption": (json.dumps(GOOD).replace("Kip,", "Kip\\u0000,"), "shots[0].caption"),
    "a list": ("[1, 2, 3]", "story"),
    "empty": ("", "json"),
    "truncated": (json.dumps(GOOD)[:40], "json"),
    "too large": (json.dumps({**GOOD, "global_caption": "x" * (MAX_STORY_BYTES + 10)}), "json"),
}
HOSTILE_BYTES = {
    "binary": (bytes(range(256)) * 8, "json"),
    "UTF-16": (json.dumps(GOOD).encode("utf-16"), "json"),
    "Latin-1 caption": (json.dumps(GOOD).replace("Kip", "K\u00efp").encode("latin-1"), "json"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_documents_are_named_errors(name):
    text, field = HOSTILE[name]
    with pytest.raises(StoryError) as err:
        Story.from_json(text)
    assert field in str(err.value) and len(str(err.value)) < 400 and "\n" not in str(err.value)


@pytest.mark.parametrize("name", sorted(HOSTILE_BYTES))
def test_hostile_bytes_are_named_errors(name, tmp_path):
    data, field = HOSTILE_BYTES[name]
    (tmp_path / "s.json").write_bytes(data)
    with pytest.raises(StoryError, match=field):
        Story.load(tmp_path / "s.json")


def test_odd_but_valid_input_is_accepted_and_round_trips(tmp_path):
    odd = dict(GOOD, global_caption="Ünïcødé 🌈 \u202eRTL\u202c e\u0301 \t tabs\nnew line")
    data = b"\xef\xbb\xbf" + json.dumps(odd, ensure_ascii=False).encode()  # with a UTF-8 byte-order mark
    (tmp_path / "s.json").write_bytes(data)
    story = Story.load(tmp_path / "s.json")
    assert story.global_caption == odd["global_caption"]
    assert Story.load(story.save(tmp_path / "again.json")) == story
    assert Story.from_json(json.dumps({**GOOD, "settings": {"steps": 2.0, "height": 32, "width": 48}})).settings.steps == 2


def test_json_depth_skips_strings():
    assert json_depth('{"a": "[[[[{{{{", "b": [1, {"c": "\\"]]"}]}') == 3
    assert json_depth("[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1)) == MAX_JSON_DEPTH + 1


def test_folder_and_missing_file_are_named(tmp_path):
    with pytest.raises(StoryError, match="not a story file"):
        Story.load(tmp_path)
    with pytest.raises(StoryError, match="not a story file"):
        Story.load(tmp_path / "nope.json")


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=300), st.binary(max_size=300),
                 st.text(alphabet="[]{}:,\"0123456789.eE-+ntrufalsNIy\\", max_size=200)))
def test_any_text_or_bytes_gives_story_or_story_error(doc):
    try:
        Story.from_json(doc)
    except StoryError as err:
        assert str(err)


# ---- the CLI: one line, a non-zero exit, no traceback ------------------------------------------------

def run_cli(*args, timeout=120):
    return subprocess.run([sys.executable, "launch.py", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout, env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1",
                                                          "PYTHONPATH": str(ROOT), "HOME": str(ROOT)})


def _one_line_error(proc, rc=2):
    assert proc.returncode == rc, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith(("usage:", " "))]
    assert len(lines) == 1 and "error" in lines[0], proc.stderr
    return lines[0]


@pytest.mark.parametrize("name", ["nested 5,000 deep", "NaN", "lone surrogate", "too large", "version 99"])
def test_cli_hostile_story_files(name, tmp_path):
    (tmp_path / "s.json").write_text(HOSTILE[name][0], encoding="utf-8", errors="surrogatepass")
    line = _one_line_error(run_cli("--story", tmp_path / "s.json", "--out", tmp_path / "o"))
    assert HOSTILE[name][1] in line


@pytest.mark.parametrize("flags,expected", [
    (["--port", "70000"], "--port"), (["--port", "http"], "--port"), (["--regenerate", "-1", "--story", "x"], "--regenerate"),
    (["--regenerate", "2"], "--story"), (["--auth", ":"], "--auth"), (["--no-such-flag"], "unrecognized"),
    (["--story", "examples/default_story.json", "--device", "tpu:9"], "device"),
    (["--story", "examples/default_story.json", "--regenerate", "99"], "--regenerate"),
])
def test_cli_bad_flags(flags, expected, tmp_path):
    line = _one_line_error(run_cli(*flags, "--cache-dir", tmp_path / "c"))
    assert expected in line


def _model_folder(tmp_path, tiny_model_dir, breakage):
    import shutil
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    shard = next((folder / "transformer").glob("*.safetensors"))
    if breakage == "truncated shard":
        shard.write_bytes(shard.read_bytes()[:1000])
    elif breakage == "random shard":
        shard.write_bytes(bytes(range(256)) * 64)
    elif breakage == "config not JSON":
        (folder / "transformer" / "config.json").write_text("{not json")
    elif breakage == "manifest a list":
        (folder / "storyboard.json").write_text("[]")
    elif breakage == "manifest not JSON":
        (folder / "storyboard.json").write_bytes(b"\xff\xfe")
    elif breakage == "no weights":
        shard.unlink()
    elif breakage == "pickle only":
        shard.rename(shard.with_suffix(".bin"))
    elif breakage == "no scheduler":
        shutil.rmtree(folder / "scheduler")
    return folder


BREAKAGES = ["truncated shard", "random shard", "config not JSON", "manifest a list", "manifest not JSON",
             "no weights", "pickle only", "no scheduler"]


@pytest.mark.parametrize("breakage", BREAKAGES)
def test_malformed_model_folders_are_model_errors(breakage, tmp_path, tiny_model_dir):
    folder = _model_folder(tmp_path, tiny_model_dir, breakage)
    with pytest.raises(ModelError) as err:
        StoryModel.load(folder, device="cpu")
    assert str(folder) in str(err.value) or "transformer" in str(err.value) or "scheduler" in str(err.value)


def test_cli_malformed_model_folder(tmp_path, tiny_model_dir):
    folder = _model_folder(tmp_path, tiny_model_dir, "truncated shard")
    line = _one_line_error(run_cli("--story", ROOT / "examples" / "default_story.json", "--model", folder,
                                   "--out", tmp_path / "o", "--cache-dir", tmp_path / "c"))
    assert "cannot load the model" in line


def test_non_loopback_host_warns_and_auth_is_parsed(tmp_path):
    import launch
    assert launch.is_loopback("127.0.0.1") and launch.is_loopback("::1") and launch.is_loopback("127.0.0.2")
    assert not launch.is_loopback("0.0.0.0") and not launch.is_loopback("192.168.1.5")
    (tmp_path / "auth").write_text("ada:pa:ss\n")
    assert launch.parse_auth(str(tmp_path / "auth")) == ("ada", "pa:ss")
    assert launch.parse_auth("bob:x") == ("bob", "x")
    for bad in ("nocolon", ":x", "x:"):
        with pytest.raises(launch.UsageError, match="--auth"):
            launch.parse_auth(bad)
    from tests.app.conftest import free_port
    proc = subprocess.Popen([sys.executable, "launch.py", "--host", "0.0.0.0", "--port", str(free_port()),
                             "--cache-dir", str(tmp_path / "c")], cwd=ROOT, stderr=subprocess.PIPE, text=True,
                            env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HOME": str(tmp_path)})
    try:
        line = proc.stderr.readline()
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert line.startswith("warning: serving on 0.0.0.0") and "--auth" in line


# ---- every setting, fuzzed: a story with one setting replaced is a Story or a StoryError naming it ----

def _setting_paths():
    from dataclasses import fields as dc_fields
    from engine.story import GenerationSettings, MoCSettings, Shot
    paths = [("settings", f.name) for f in dc_fields(GenerationSettings) if f.name != "moc"]
    paths += [("settings", "moc", f.name) for f in dc_fields(MoCSettings)]
    paths += [("shots", 0, f.name) for f in dc_fields(Shot)]
    return paths


ANY_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**64, 2**64) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=30),
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=8), kids, max_size=3), max_leaves=8)


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(_setting_paths()), ANY_JSON)
def test_every_setting_fuzzed(path, value):
    d = json.loads(json.dumps(GOOD))
    d["settings"].setdefault("moc", {})
    target = d
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value
    try:
        story = Story.from_json(json.dumps(d))
    except StoryError as err:
        dotted = ".".join(str(p) for p in path).replace("shots.0", "shots[0]")
        assert str(err).startswith(dotted) or str(err).startswith("settings"), (path, value, str(err))
        return
    assert Story.from_json(story.to_json()) == story
