"""Example stories load, validate, fit the default model and speak ShapeStory (the default
model's world: a character's look is stated once, later shots name it alone); the shipped
default model renders."""

import re
from pathlib import Path

import pytest

from engine.engine import StoryEngine
from engine.model import DEFAULT_MODEL_DIR
from engine.shapestory.world import (ACTION_WORDS, COLOURS, FRAMING_WORDS, MAX_CHARACTERS, NAMES, PATTERN_WORDS,
                                     SHAPES, SIZE_WORDS, WORLDS)
from engine.story import Story

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.json"))
GLUE = {"a", "the", "called", "and", "while", "seen", "up", "close", "is", "story", "on", "shapes", "somewhere",
        "world"}  # the words the ShapeStory captions put around the vocabulary
LOOK = (rf"(?:{'|'.join(w for words in SIZE_WORDS.values() for w in words)}) "
        rf"({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})")  # "small red triangle" -> (colour, shape)


def shapestory_words() -> set[str]:
    phrases = [*COLOURS, *SHAPES, *(w for words in SIZE_WORDS.values() for w in words),
               *(w for words in ACTION_WORDS.values() for w in words),
               *(w for words in FRAMING_WORDS.values() for w in words),
               *(w for words in PATTERN_WORDS.values() for w in words), *(w for v in WORLDS.values() for w in v[2])]
    return GLUE | {word for phrase in phrases for word in re.findall(r"[a-z]+", phrase.lower())}


def look_in(caption: str, name: str) -> tuple[str, str] | None:
    """(colour, shape) if `caption` states `name`'s look in one of ShapeStory's three forms."""
    for form in (rf"{name}, an? {LOOK}", rf"\ban? {LOOK} called {name}", rf"{name} (?:the|is an?) {LOOK}"):
        match = re.search(form, caption, re.IGNORECASE)
        if match:
            return match.groups()
    return None


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_is_valid_for_the_default_geometry(path, make_engine):
    story = Story.load(path)
    make_engine().check(story)  # the tiny test model shares the default's codec and patch size


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_speaks_shapestory_and_needs_memory(path):
    story = Story.load(path)
    vocabulary, looks, named_alone = shapestory_words(), {}, 0
    for i, caption in enumerate([story.global_caption] + [s.caption for s in story.shots]):
        unknown = [w for w in re.findall(r"[A-Za-z]+", caption) if w.lower() not in vocabulary and w not in NAMES]
        assert not unknown, f"{caption!r}: not ShapeStory words: {unknown}"
        for name in sorted({w for w in re.findall(r"[A-Z][a-z]+", caption) if w in NAMES}):
            look = look_in(caption, name)
            if look is not None:
                assert looks.setdefault(name, look) == look, f"{name} changes its look in {caption!r}"
            else:
                assert name in looks, f"{name} is named in {caption!r} before its look is stated"
                named_alone += i > 0
    assert 1 <= len(looks) <= MAX_CHARACTERS
    assert len({colour for colour, _ in looks.values()}) == len(looks)  # a colour names one character
    assert named_alone, "no shot names a character alone: nothing for MoC memory to do"


def test_examples_include_the_default_four_shot_story():
    story = Story.load(Path(__file__).resolve().parents[2] / "examples" / "default_story.json")
    assert len(story.shots) == 4 and all(s.frames == 8 and s.seed >= 0 for s in story.shots)
    s = story.settings
    assert (s.height, s.width, s.steps, s.guidance, s.fps, s.mode) == (128, 192, 12, 4.0, 8, "joint")


def test_shipped_default_model_renders_the_default_story(tmp_path):
    engine = StoryEngine.load(None, device="cpu", cache_dir=tmp_path)
    assert engine.model.trained and engine.model.caveat  # an early trained model that says what it lacks
    assert (DEFAULT_MODEL_DIR / "MODEL_CARD.md").is_file()
    size = sum(f.stat().st_size for f in DEFAULT_MODEL_DIR.rglob("*.safetensors"))
    assert size <= 32 * 2**20, f"the default model's weights are {size / 2**20:.1f} MiB (at most 32)"
    story = Story.load(Path(__file__).resolve().parents[2] / "examples" / "default_story.json").with_settings(steps=1)
    result = engine.render(story, out_dir=tmp_path / "out")
    assert [s.status for s in result.shots] == ["generated"] * 4
    assert result.story_video.is_file()
