"""Opening a story that remembers its takes (app/takes.py `_show_takes`), with the real engine on
the CPU: remembered takes come back from the cache without rendering; a lost one is named."""

from __future__ import annotations

import pytest

from app.state import new_board

from .conftest import tiny_story

pytestmark = [pytest.mark.slow]


@pytest.fixture
def app(story_engine, tmp_path):
    from app.server import StoryboardApp

    app = StoryboardApp(story_engine, examples_dir=tmp_path / "no-examples", out_root=tmp_path / "outputs")
    try:
        yield app
    finally:
        app.close()


def test_an_opened_story_shows_its_takes_and_names_a_lost_one(app, story_engine):
    story = tiny_story(shots=3)
    result = story_engine.render(story)
    for shot, shown in zip(story.shots, result.shots):
        shot.take = shown.key

    board, notes = app._show_takes(new_board(story))
    assert [v.status for v in board.views] == ["cached"] * 3 and notes == []
    assert [v.key for v in board.views] == [s.key for s in result.shots]
    assert all(v.video and v.fingerprint for v in board.views)  # a video to show, and not stale

    assert story_engine.cache.invalidate(result.shots[1].key)
    board, notes = app._show_takes(new_board(story))
    # shot 2 is lost; shot 3 (joint) was made with it as context, so it is sampled anew too
    assert [v.status for v in board.views] == ["cached", "new", "new"]
    assert len(notes) == 1 and notes[0].startswith("Shot 2: its take") and "no longer in the shot cache" in notes[0]

    board, notes = app._show_takes(new_board(tiny_story(shots=2)))  # remembers nothing: nothing to show
    assert [v.status for v in board.views] == ["new", "new"] and notes == []


def test_the_story_remembers_the_take_each_card_shows():
    from dataclasses import replace

    from app.state import ShotView, move_shot, with_takes

    board = new_board(tiny_story(shots=3))
    board = replace(board, views=(ShotView("cached", "a.mp4", key="aa"), ShotView(), ShotView("stale", "c.mp4", key="cc")))
    assert [s.take for s in with_takes(board.story, board.views).shots] == ["aa", "", "cc"]
    moved = move_shot(board, 2, -2)  # the take moves with its shot
    assert [s.take for s in with_takes(moved.story, moved.views).shots] == ["cc", "aa", ""]
