"""The session's story edits (app/state.py) and the app's pure helpers, without a server."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest

from app import plots
from app.server import (fallback_story, is_default_model, model_note, preview_strip, readable_story_error,
                        shot_header, status_html)
from app.state import (MAX_SHOTS, Board, ShotView, add_shot, apply_shot, duplicate_shot,
                       mark_queued, move_shot, new_board, refresh, remove_shot, set_story, settle)
from engine.events import ShotResult
from engine.model import DEFAULT_MODEL_DIR, model_identity
from engine.shapestory.world import ACTION_WORDS, ACTIONS, COLOURS, PATTERNS, SHAPES, SIZES, WORLDS
from engine.story import Shot, Story, StoryError

from .conftest import tiny_story


def captions(board: Board) -> list[str]:
    return [s.caption for s in board.story.shots]


def rendered(board: Board) -> Board:
    """The board as if every shot had just been generated (seed 100 + index)."""
    for i, _ in enumerate(board.story.shots):
        board = apply_shot(board, board.story, ShotResult(i, "generated", f"/tmp/shot_{i}.mp4", 1.0, 0.5, 100 + i, f"k{i}"))
    return board


def test_add_duplicate_remove_move_keep_views_aligned():
    board = rendered(new_board(tiny_story("t", shots=3)))
    names = captions(board)
    board = move_shot(board, 2, -1)
    assert captions(board) == [names[0], names[2], names[1]]
    assert [v.video for v in board.views] == ["/tmp/shot_0.mp4", "/tmp/shot_2.mp4", "/tmp/shot_1.mp4"]
    # moving changes the context of the moved shots: shot 0 keeps its take, the others are stale
    assert [v.status for v in board.views] == ["generated", "stale", "stale"]

    board = duplicate_shot(board, 0)
    assert captions(board)[:2] == [names[0], names[0]] and board.views[1].status == "new"
    board = add_shot(board)
    assert len(board.story.shots) == 5 and board.story.shots[-1].caption == ""
    assert board.story.shots[-1].frames == board.story.shots[-2].frames
    board = remove_shot(board, 1)
    assert captions(board)[:3] == [names[0], names[2], names[1]] and len(board.views) == 4


def test_edit_limits_are_readable_errors():
    board = new_board(tiny_story("t", shots=1))
    with pytest.raises(StoryError, match="at least one shot"):
        remove_shot(board, 0)
    with pytest.raises(StoryError, match="does not exist"):
        duplicate_shot(board, 3)
    for _ in range(MAX_SHOTS - 1):
        board = add_shot(board)
    with pytest.raises(StoryError, match=f"at most {MAX_SHOTS}"):
        add_shot(board)
    assert move_shot(board, 0, -1) is board  # already first: nothing to do


def test_editing_a_caption_makes_that_shot_and_later_ones_stale():
    board = rendered(new_board(tiny_story("t", shots=3)))
    assert [v.status for v in board.views] == ["generated"] * 3
    shots = list(board.story.shots)
    shots[1] = replace(shots[1], caption="something else")
    board = set_story(board, replace(board.story, shots=shots))
    assert [v.status for v in board.views] == ["generated", "stale", "stale"]


def test_widget_floats_do_not_make_shots_stale():
    board = rendered(new_board(tiny_story("t", shots=2)))
    floaty = board.story.with_settings(steps=float(board.story.settings.steps), guidance=1)
    assert [v.status for v in set_story(board, floaty).views] == ["generated", "generated"]


def test_random_seed_counts_as_the_seed_used():
    board = rendered(new_board(tiny_story("t", shots=2)))
    assert board.story.shots[0].seed == -1 and board.views[0].seed == 100
    # writing down the seed that was used changes nothing about the take; another seed does
    shots = [replace(board.story.shots[0], seed=100), board.story.shots[1]]
    assert [v.status for v in set_story(board, replace(board.story, shots=shots)).views] == ["generated"] * 2
    shots = [replace(board.story.shots[0], seed=7), board.story.shots[1]]
    assert [v.status for v in set_story(board, replace(board.story, shots=shots)).views] == ["stale"] * 2


def test_queued_then_stopped_restores_previous_status():
    board = rendered(new_board(tiny_story("t", shots=3)))
    board = mark_queued(board, 1)
    assert [v.status for v in board.views] == ["generated", "queued", "generated"]
    assert [v.status for v in settle(board).views] == ["generated"] * 3
    fresh = mark_queued(new_board(tiny_story("u", shots=2)), None)
    assert [v.status for v in settle(fresh).views] == ["new", "new"]


def test_refresh_ignores_shots_without_video():
    board = Board(story=tiny_story("t", shots=2), views=(ShotView(), ShotView(status="stale")))
    assert refresh(board).views == board.views


def test_readable_story_error_names_the_shot():
    story = tiny_story("t", shots=2)
    bad = replace(story, shots=[story.shots[0], Shot("", 2)])
    with pytest.raises(StoryError) as info:
        Story.from_dict(bad.to_dict())
    assert readable_story_error(info.value) == "Shot 2 › caption: must not be empty"
    with pytest.raises(StoryError) as info:
        Story.from_dict(story.with_settings(steps=0).to_dict())
    assert readable_story_error(info.value).startswith("Settings › steps: must be in [1, 200]")


def test_model_note_names_the_vocabulary_and_the_model_flag():
    note = model_note()
    action_words = [ACTION_WORDS[a][0].split()[-1] for a in ACTIONS]  # left ... grows ... still
    for word in [*SHAPES, *SIZES, *COLOURS, *WORLDS, *(p for p in PATTERNS if p != "none"), *action_words]:
        assert word in note, word
    assert "Kip, a small red triangle" in note and "python launch.py --model PATH" in note
    assert "untrained" not in note and "untrained" in model_note(trained=False)
    assert "soft blobs" in model_note(caveat="shapes are soft blobs") and "soft blobs" not in note
    # shown for the shipped default model only (a Wan checkpoint knows other things)
    assert is_default_model(SimpleNamespace(model=SimpleNamespace(identity=model_identity(DEFAULT_MODEL_DIR))))
    assert not is_default_model(SimpleNamespace(model=SimpleNamespace(identity="another model")))
    assert fallback_story().validate().shots[0].caption.startswith("Kip, a small red triangle")


def test_html_helpers_escape_user_text():
    shot = Shot("<script>alert(1)</script>", 2)
    assert "<script>" not in shot_header(0, None, shot)
    assert "&lt;b&gt;" in status_html("error", "<b>", "x")
    assert 'style="width:50.0%"' in status_html("running", "r", "d", 0.5)


@pytest.mark.parametrize("shape", [(1, 8, 12, 3), (7, 16, 24, 3), (40, 64, 96, 3)], ids=["one", "odd", "long"])
def test_preview_strip(shape):
    strip = preview_strip(np.zeros(shape, np.uint8))
    assert strip.dtype == np.uint8 and strip.ndim == 3
    assert strip.shape[0] >= min(112, shape[1])


def synthetic_routing(shot_frames=(3, 2, 4), layers=2, heads=3, steps=(0, 2)) -> dict:
    """A report shaped like engine/routing_report.py's, for drawing only."""
    rng = np.random.default_rng(0)
    F = sum(shot_frames)
    mat = lambda: rng.random((F, F)).round(3).tolist()  # noqa: E731
    table = {"all": mat()}
    for s in steps:
        table[str(s)] = {"all": mat(), **{str(l): mat() for l in range(layers)}}
    return {"shot_frames": list(shot_frames), "num_layers": layers, "num_heads": heads, "steps": list(steps),
            "frame_selection": table, "shot_recall": np.tril(rng.random((3, 3))).tolist(),
            "density": rng.random((layers, heads)).tolist(), "sparsity": 0.6,
            "attn_flops_moc": 2e9, "attn_flops_dense": 5e9, "time_saved_estimate_s": 1.5}


def test_plots_from_a_report():
    routing = synthetic_routing()
    assert plots.layer_choices(routing) == ["all", "0", "1"]
    assert plots.step_choices(routing) == ["all", "0", "2"]
    assert plots.shot_boundaries([3, 2, 4]) == [3, 5]
    fig = plots.frame_heatmap(routing, "1", "2")
    assert np.allclose(fig.data[0].z, routing["frame_selection"]["2"]["1"])
    assert len(fig.layout.shapes) == 4  # two boundaries, each drawn across and down
    layer_mean = plots.frame_selection(routing, "0", "all")
    expected = np.mean([routing["frame_selection"][s]["0"] for s in ("0", "2")], axis=0)
    assert np.allclose(layer_mean, expected)
    assert plots.frame_heatmap(routing, "7", "0").layout.annotations  # missing layer: a message, not a crash
    for figure in (plots.shot_recall, plots.density_heatmap, plots.flops_figure):
        assert figure(routing).data and not figure(None).data
    numbers = plots.headline_numbers(routing, {"shots": [{"status": "cached"}, {"status": "generated"}]})
    assert numbers == {"sparsity": "60%", "flops": "2.5× fewer", "time_saved": "1.5 s", "cache": "1 of 2 shots",
                       "cache_note": "reused, not re-rendered", "sparsity_note": "of attention skipped by MoC"}
    ran = plots.headline_numbers({**routing, "backends": {"triton": 3, "dense-auto": 9}}, None)
    assert ran["sparsity_note"].endswith("ran on dense (faster at this size), Triton")


def test_pins_follow_their_shots_through_edits():
    from app.state import add_shot, duplicate_shot, move_shot, new_board, remove_shot
    from engine.story import Shot, Story
    story = Story("g", [Shot("a", 2), Shot("b", 2), Shot("c", 2, pins=[0], blocks=[1]), Shot("d", 2, pins=[1, 2])])
    board = new_board(story.validate())
    b = add_shot(board, after=0)  # a, new, b, c, d
    assert [s.pins for s in b.story.shots] == [[], [], [], [0], [2, 3]] and b.story.shots[3].blocks == [2]
    b = remove_shot(board, 1)  # a, c, d: c's block on b and d's pin on b go
    assert [(s.pins, s.blocks) for s in b.story.shots] == [([], []), ([0], []), ([1], [])]
    b = move_shot(board, 2, -2)  # c, a, b, d: c can no longer pin a (now later)
    assert [(s.caption, s.pins, s.blocks) for s in b.story.shots] == [
        ("c", [], []), ("a", [], []), ("b", [], []), ("d", [0, 2], [])]
    b = duplicate_shot(board, 2)  # a, b, c, c', d
    assert [(s.pins, s.blocks) for s in b.story.shots] == [([], []), ([], []), ([0], [1]), ([0], [1]), ([1, 2], [])]
    for edited in (add_shot(board, after=0, caption="new"), remove_shot(board, 1), move_shot(board, 2, -2), duplicate_shot(board, 2)):
        edited.story.validate()  # every edit leaves a valid story


def test_a_slow_reader_gets_the_latest_progress_and_every_result():
    """The worker's stream drops progress and previews a later one supersedes, never shot
    results or the end, and keeps the order."""
    from app.worker import coalesce
    from engine.events import Finished, Preview, Progress, ShotDone

    def progress(step):
        return Progress(shot=0, step=step, total=9, message=f"step {step}", run=0, runs=1, shots=(0,))

    def preview(step):
        return Preview(shot=0, frames=np.zeros((1, 2, 2, 3), np.uint8), step=step, shots=(0,))
    done, end = ShotDone(0, SimpleNamespace(index=0)), Finished(SimpleNamespace())
    events = [progress(1), preview(1), progress(2), preview(2), progress(3), done, progress(4), preview(4), end]
    out = coalesce(events)
    assert [type(e).__name__ for e in out] == ["Preview", "Progress", "ShotDone", "Progress", "Preview", "Finished"]
    assert [e.step for e in out if isinstance(e, Progress)] == [3, 4] and out[0].step == 2
    assert coalesce([done, end]) == [done, end]
