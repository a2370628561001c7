"""Story model: JSON round trip, validation errors that name the field, atomic save."""

import json

import pytest

from engine.story import STORY_VERSION, GenerationSettings, MoCSettings, Shot, Story, StoryError


def good() -> dict:
    return Story("g", [Shot("a", 3), Shot("b", 2, seed=7, locked=True)]).to_dict()


def test_round_trip(tmp_path):
    story = Story("g", [Shot("a", 3), Shot("b", 2, seed=7, locked=True)],
                  GenerationSettings(mode="shot_by_shot", moc=MoCSettings(top_k=3, chunking="subframe", chunk_size=7)))
    path = story.save(tmp_path / "s.json")
    assert Story.load(path) == story
    assert json.loads(path.read_text())["version"] == STORY_VERSION
    assert [p.name for p in tmp_path.iterdir()] == ["s.json"]  # no temp files left behind


@pytest.mark.parametrize("edit, field", [
    (lambda d: d.update(shots=[]), "shots"),
    (lambda d: d["shots"][0].update(frames=0), "shots[0].frames"),
    (lambda d: d["shots"][1].update(frames=1000), "shots[1].frames"),
    (lambda d: d["shots"][0].update(seed=-2), "shots[0].seed"),
    (lambda d: d["shots"][0].update(seed=2**40), "shots[0].seed"),
    (lambda d: d["shots"][0].update(caption="  "), "shots[0].caption"),
    (lambda d: d["shots"][0].update(caption=5), "shots[0].caption"),
    (lambda d: d["shots"][0].update(locked="yes"), "shots[0].locked"),
    (lambda d: d["shots"][0].update(colour="red"), "shots[0].colour"),
    (lambda d: d["settings"].update(steps=0), "settings.steps"),
    (lambda d: d["settings"].update(guidance=float("nan")), "settings.guidance"),
    (lambda d: d["settings"].update(height=100), "settings.height"),
    (lambda d: d["settings"].update(mode="both"), "settings.mode"),
    (lambda d: d["settings"].update(context_noise=1.5), "settings.context_noise"),
    (lambda d: d["settings"]["moc"].update(top_k=0), "settings.moc.top_k"),
    (lambda d: d["settings"]["moc"].update(chunking="fixed", chunk_size=0), "settings.moc.chunk_size"),
    (lambda d: d["settings"]["moc"].update(backend="cuda"), "settings.moc.backend"),
    (lambda d: d.update(version=STORY_VERSION + 1), "version"),
    (lambda d: d.pop("global_caption"), "global_caption"),
    (lambda d: d.update(settings=[]), "settings"),
])
def test_bad_input_names_the_field(edit, field):
    d = good()
    edit(d)
    with pytest.raises(StoryError) as err:
        Story.from_dict(d)
    assert err.value.field == field
    assert str(err.value).startswith(field)


def test_bad_json_and_missing_file(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(StoryError, match="json"):
        Story.load(tmp_path / "bad.json")
    with pytest.raises(StoryError, match="not a story file"):
        Story.load(tmp_path / "missing.json")
    with pytest.raises(StoryError):
        Story.from_dict([1, 2])


def test_defaults_fill_missing_settings():
    story = Story.from_dict({"global_caption": "", "shots": [{"caption": "a", "frames": 2}]})
    assert story.settings == GenerationSettings()
    assert story.shots[0].seed == -1 and not story.shots[0].locked


def test_ui_floats_are_normalised():
    story = Story("g", [Shot("a", 3.0, seed=4.0)]).validate()
    assert isinstance(story.shots[0].frames, int) and isinstance(story.shots[0].seed, int)


def test_to_config():
    cfg = MoCSettings(top_k=3, anchor="window", window=2, causal=False).to_config()
    assert (cfg.top_k, cfg.anchor, cfg.window, cfg.causal) == (3, "window", 2, False)


# ---- hostile input: anything JSON can hold gives a Story or a StoryError, nothing else -------------

from hypothesis import given, settings, strategies as st  # noqa: E402

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=20)


def mutated_story():
    """A valid story dict with one field replaced by an arbitrary JSON value."""
    paths = [("global_caption",), ("shots",), ("settings",), ("version",), ("shots", 0), ("shots", 0, "caption"),
             ("shots", 0, "frames"), ("shots", 0, "seed"), ("shots", 0, "locked"), ("settings", "steps"),
             ("settings", "guidance"), ("settings", "mode"), ("settings", "moc"), ("settings", "moc", "top_k"),
             ("settings", "moc", "chunking"), ("settings", "context_noise"), ("settings", "height")]
    return st.tuples(st.sampled_from(paths), json_values)


@settings(max_examples=300, deadline=None)
@given(mutated_story())
def test_fuzzed_story_gives_story_or_story_error(case):
    path, value = case
    d = good()
    target = d
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value
    try:
        story = Story.from_dict(d)
    except StoryError:
        return
    assert Story.from_json(story.to_json()) == story  # whatever passes round-trips


@settings(max_examples=200, deadline=None)
@given(json_values)
def test_fuzzed_top_level_gives_story_or_story_error(value):
    try:
        Story.from_dict(value)
    except StoryError:
        pass


@pytest.mark.parametrize("orjson_installed", [True, False])
def test_json_text_reads_back_as_the_standard_library_writes_it(monkeypatch, orjson_installed):
    """json_text (routing.json): orjson where installed, else json; either way the same values."""
    import builtins

    from engine.story import json_text
    report = {"shot_frames": [3, 2], "density": [[0.1234, 1e-05], [0.0, 1.0]], "steps": [],
              "frame_selection": {"all": [[0.5]], "3": {"all": [[0.25]], "0": [[1.0]]}}, "sparsity": 0.75,
              "backends": {"gather": 30}, "note": "shot 1 \u2192 shot 2", "routed_shots": [True, False], "none": None}
    if not orjson_installed:
        real_import = builtins.__import__

        def no_orjson(name, *args, **kwargs):
            if name == "orjson":
                raise ImportError("no orjson here")
            return real_import(name, *args, **kwargs)
        monkeypatch.setattr(builtins, "__import__", no_orjson)
    text = json_text(report)
    assert json.loads(text) == report and ", " not in text  # compact either way
    # a non-finite number is null on both paths (strict JSON: `NaN` would not parse in a browser)
    odd = json_text({"a": [1.5, float("nan")], "b": {"c": float("inf")}, "d": (float("-inf"), 2)})
    assert odd == '{"a":[1.5,null],"b":{"c":null},"d":[null,2]}'
    json.loads(odd, parse_constant=lambda c: pytest.fail(f"{c} in the JSON"))
