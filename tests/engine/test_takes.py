"""A shot's takes on a tiny random model: every regeneration adds one, listing, making an earlier
one current (exact frames back, later shots follow), the story remembering it, evicted takes."""

import json

import pytest
import torch

from engine.story import STORY_VERSION, Story, StoryError
from tests.engine.conftest import tiny_story


def story_with(seeds=(3, -1, 7), takes=("", "", ""), mode="shot_by_shot") -> Story:
    story = tiny_story(mode, seeds=seeds)
    for shot, key in zip(story.shots, takes):
        shot.take = key
    return story.validate()


def test_regeneration_adds_a_take_and_the_first_one_comes_back(make_engine):
    engine = make_engine()
    story = story_with()
    first = engine.render(story)
    assert [t.key for t in engine.takes(story, 1)] == [first.shots[1].key]
    again = engine.render(story, regenerate=1, both_sides=False)
    assert again.shots[1].key != first.shots[1].key and again.shots[2].status == "stale"
    takes = engine.takes(story, 1)
    assert [t.key for t in takes] == [first.shots[1].key, again.shots[1].key]  # oldest first
    assert [t.current for t in takes] == [False, True] and [t.number for t in takes] == [1, 2]
    assert takes[0].seed == first.shots[1].seed and takes[0].caption == story.shots[1].caption
    assert takes[0].created <= takes[1].created and takes[1].generated_with == "context"

    back = engine.make_current(story, 1, takes[0].key)
    assert [s.status for s in back.shots] == ["cached"] * 3  # nothing sampled
    assert back.shots[1].key == first.shots[1].key
    assert torch.equal(engine.cache.get(back.shots[1].key).frames, engine.cache.get(first.shots[1].key).frames)
    assert back.shots[2].key == first.shots[2].key  # shot 3's take for this context is current again
    assert [t.current for t in engine.takes(story, 1)] == [True, False]
    assert [s.key for s in engine.render(story).shots] == [s.key for s in first.shots]  # and stays current


def test_making_a_take_current_makes_later_shots_stale_like_a_regeneration(make_engine):
    engine = make_engine()
    story = story_with()
    first = engine.render(story)
    second = engine.render(story, regenerate=1, both_sides=False)
    third = engine.make_current(story, 1, first.shots[1].key)
    assert third.shots[2].key == first.shots[2].key
    switched = engine.make_current(story, 1, second.shots[1].key)  # shot 3 has no take for this context
    assert [s.status for s in switched.shots] == ["cached", "cached", "stale"]
    regenerated = engine.render(story)
    assert [s.status for s in regenerated.shots] == ["cached", "cached", "generated"]


def test_make_current_refuses_a_key_that_is_not_a_take_of_the_shot(make_engine):
    engine = make_engine()
    story = story_with()
    result = engine.render(story)
    with pytest.raises(StoryError, match=r"shots\[1\].take.*not a cached take of shot 2"):
        engine.make_current(story, 1, result.shots[0].key)
    with pytest.raises(StoryError, match="shot"):
        engine.make_current(story, 3, result.shots[0].key)


def test_the_story_remembers_its_take_over_the_slot_pointer(make_engine, tmp_path):
    engine = make_engine()
    story = story_with()
    first = engine.render(story)
    engine.render(story, regenerate=1, both_sides=False)  # the slot now points at the new take
    remembered = story_with(takes=[s.key for s in first.shots])
    path = remembered.save(tmp_path / "story.json")
    assert json.loads(path.read_text())["shots"][1]["take"] == first.shots[1].key
    opened = Story.load(path)
    assert opened.version == STORY_VERSION and [s.take for s in opened.shots] == [s.key for s in first.shots]
    assert engine.current_takes(opened) == [("cached", s.key) for s in first.shots]
    shown = engine.render(opened)
    assert [s.key for s in shown.shots] == [s.key for s in first.shots]
    assert [s.status for s in shown.shots] == ["cached"] * 3 and shown.summary["takes_gone"] == []


def test_an_evicted_take_is_skipped_and_a_remembered_one_is_sampled_anew(make_engine):
    engine = make_engine()
    story = story_with()
    first = engine.render(story)
    second = engine.render(story, regenerate=1, both_sides=False)
    assert engine.cache.invalidate(first.shots[1].key)
    assert [t.key for t in engine.takes(story, 1)] == [second.shots[1].key]
    remembered = story_with(takes=[s.key for s in first.shots])
    assert [status for status, _ in engine.current_takes(remembered)] == ["cached", "gone", "generate"]
    result = engine.render(remembered)
    assert result.summary["takes_gone"] == [1]
    assert [s.status for s in result.shots] == ["cached", "generated", "generated"]
    assert result.shots[1].key not in (first.shots[1].key, second.shots[1].key)


def test_histories_are_bounded_and_skip_evicted_takes(make_engine):
    engine = make_engine()
    cache = engine.cache
    story = story_with()
    result = engine.render(story)
    keys = [s.key for s in result.shots]
    for key in keys:
        cache.remember("ab", key, limit=2)
    assert cache.history("ab") == keys[1:]
    cache.remember("ab", keys[1], limit=2)  # already there: keeps its place
    assert cache.history("ab") == keys[1:]
    cache.invalidate(keys[2])
    assert cache.history("ab") == keys[1:2]


@pytest.mark.parametrize("take, message", [
    ("XYZ", "lowercase hex"), ("../../etc", "lowercase hex"), ("a" * 65, "1 to 64"), (7, "got 7"), (None, "None")])
def test_a_bad_take_key_names_the_field(take, message):
    d = story_with().to_dict()
    d["shots"][1]["take"] = take
    with pytest.raises(StoryError, match=message) as error:
        Story.from_dict(d)
    assert error.value.field == "shots[1].take"


def test_older_story_versions_load_and_take_is_a_version_3_field():
    d = story_with().to_dict()
    for shot in d["shots"]:
        del shot["take"]
    assert [s.take for s in Story.from_dict({**d, "version": 2}).shots] == ["", "", ""]
    d["shots"][1]["take"] = "ab12"
    with pytest.raises(StoryError, match="version 3 field") as error:
        Story.from_dict({**d, "version": 2})
    assert error.value.field == "shots[1].take"
    assert Story.from_dict(d).shots[1].take == "ab12"


def test_a_take_made_with_both_sides_keeps_the_later_shots_when_made_current_again(make_engine):
    engine = make_engine()
    story = story_with(mode="joint")
    first = engine.render(story)
    both = engine.render(story, regenerate=1)  # later shots as context: shot 3 is kept, not stale
    assert both.summary["both_sides"] and both.shots[2].key == first.shots[2].key
    takes = engine.takes(story, 1)
    assert [t.both_sides for t in takes] == [False, True]
    back = engine.make_current(story, 1, takes[0].key)
    assert [s.key for s in back.shots] == [s.key for s in first.shots]
    again = engine.make_current(story, 1, takes[1].key)
    assert [s.status for s in again.shots] == ["cached"] * 3 and again.shots[2].key == first.shots[2].key
