"""Example stories load, validate and fit the default model; the shipped default model renders."""

from pathlib import Path

import pytest

from engine.engine import StoryEngine
from engine.story import Story

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.json"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_is_valid_for_the_default_geometry(path, make_engine):
    story = Story.load(path)
    make_engine().check(story)  # the tiny test model shares the default's codec and patch size


def test_examples_include_the_default_four_shot_story():
    story = Story.load(Path(__file__).resolve().parents[2] / "examples" / "default_story.json")
    assert len(story.shots) == 4


def test_shipped_default_model_renders_the_default_story(tmp_path):
    engine = StoryEngine.load(None, device="cpu", cache_dir=tmp_path)
    assert not engine.model.trained  # random until the trained default ships
    story = Story.load(Path(__file__).resolve().parents[2] / "examples" / "default_story.json").with_settings(steps=1)
    result = engine.render(story, out_dir=tmp_path / "out")
    assert [s.status for s in result.shots] == ["generated"] * 4
    assert result.story_video.is_file()
