"""What one browser session holds: its story and what it last rendered, edited by pure functions.

For: the storyboard's editing operations (add, remove, duplicate, move, edit a shot), keeping each
shot's last video aligned with the shot when shots move, marking shots whose video no longer
matches the story as stale, and folding engine events (ShotDone, Finished) into the session.
Every function takes a `Board` and returns a new one; nothing here knows about Gradio, so the
tests drive it directly.
Not for: validation rules (engine/story.py owns them; `Story.validate` is called at the edges) or
rendering.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from engine.story import Shot, Story, StoryError

MAX_SHOTS = 8  # shot slots in the UI; the editor refuses to add more
DEFAULT_FRAMES = 3  # latent frames of a new shot when there is no previous shot to copy

# The life of a shot's video, as the UI shows it.
STATUSES = {
    "new": "new",
    "queued": "queued",
    "rendering": "rendering",
    "cached": "from cache",
    "generated": "generated",
    "stale": "stale",
}


@dataclass(frozen=True)
class ShotView:
    """The last render of one shot, as far as this session knows."""

    status: str = "new"  # one of STATUSES
    video: str | None = None  # path of the shot's MP4
    seed: int | None = None  # the seed actually used (resolves seed = -1)
    seconds: float | None = None  # render time of this shot (0 or near it when cached)
    density: float | None = None  # fraction of keys attended, averaged over layers and heads
    key: str | None = None  # the engine's cache key of the shot
    fingerprint: str | None = None  # what the video was made from (see `fingerprint`)
    was: str | None = None  # the status before the shot was queued (restored if the render stops)


@dataclass(frozen=True)
class Board:
    """One session's story plus what it last rendered; shots and views stay the same length."""

    story: Story
    views: tuple[ShotView, ...] = ()
    story_video: str | None = None  # the whole story as one MP4
    routing: dict | None = None  # the engine's routing report of the last render
    summary: dict = field(default_factory=dict)  # the engine's summary of the last render

    def __post_init__(self):
        if len(self.views) != len(self.story.shots):
            views = tuple(self.views[: len(self.story.shots)])
            views += (ShotView(),) * (len(self.story.shots) - len(views))
            object.__setattr__(self, "views", views)


def new_board(story: Story) -> Board:
    return Board(story=story)


# -- editing the story --------------------------------------------------------------------------

def _with_shots(board: Board, shots: list[Shot], views: list[ShotView]) -> Board:
    story = replace(board.story, shots=list(shots))
    return refresh(replace(board, story=story, views=tuple(views)))


def _reorder(board: Board, order: list[int | None], new: dict[int, Shot] | None = None) -> Board:
    """The story's shots in a new order: order[p] is the old index of the shot now at p (None: a
    new shot, from `new`). Memory pins and blocks follow the shots they name; a link that would
    now point at a later shot (or at a removed one) is dropped: a shot pins earlier shots only."""
    old_shots, old_views = board.story.shots, board.views
    where: dict[int, int] = {}
    for p, o in enumerate(order):
        if o is not None:
            where.setdefault(o, p)
    shots, views = [], []
    for p, o in enumerate(order):
        if o is None:
            shots.append((new or {})[p])
            views.append(ShotView())
            continue
        shot = old_shots[o]
        links = {name: sorted(where[j] for j in getattr(shot, name) if j in where and where[j] < p)
                 for name in ("pins", "blocks")}
        copy = where[o] != p  # a duplicate: unlocked, no video of its own
        shots.append(replace(shot, locked=shot.locked and not copy, **links))
        views.append(ShotView() if copy else old_views[o])
    return _with_shots(board, shots, views)


def _check_index(board: Board, index: int) -> int:
    index = int(index)
    if not 0 <= index < len(board.story.shots):
        raise StoryError("shots", f"shot {index + 1} does not exist (the story has {len(board.story.shots)} shots)")
    return index


def add_shot(board: Board, after: int | None = None, caption: str = "") -> Board:
    """A new empty shot after `after` (default: at the end), as long as its neighbour."""
    shots = board.story.shots
    if len(shots) >= MAX_SHOTS:
        raise StoryError("shots", f"the editor holds at most {MAX_SHOTS} shots")
    at = len(shots) if after is None else _check_index(board, after) + 1
    frames = shots[at - 1].frames if at > 0 and shots else DEFAULT_FRAMES
    order: list[int | None] = list(range(len(shots)))
    order.insert(at, None)
    return _reorder(board, order, {at: Shot(caption=caption, frames=frames, seed=-1, locked=False)})


def remove_shot(board: Board, index: int) -> Board:
    index = _check_index(board, index)
    if len(board.story.shots) == 1:
        raise StoryError("shots", "a story needs at least one shot")
    return _reorder(board, [i for i in range(len(board.story.shots)) if i != index])


def duplicate_shot(board: Board, index: int) -> Board:
    """A copy of shot `index` right after it (unlocked; its video is not copied; same pins)."""
    index = _check_index(board, index)
    if len(board.story.shots) >= MAX_SHOTS:
        raise StoryError("shots", f"the editor holds at most {MAX_SHOTS} shots")
    order = list(range(len(board.story.shots)))
    order.insert(index + 1, index)
    return _reorder(board, order)


def move_shot(board: Board, index: int, delta: int) -> Board:
    """Move shot `index` by `delta` places (clamped to the ends); its video moves with it."""
    index = _check_index(board, index)
    target = min(max(index + int(delta), 0), len(board.story.shots) - 1)
    if target == index:
        return board
    order = list(range(len(board.story.shots)))
    order.insert(target, order.pop(index))
    return _reorder(board, order)


def set_story(board: Board, story: Story) -> Board:
    """Replace the story (an edit in the form, a loaded file); views follow by position."""
    return refresh(replace(board, story=story))


def load_story(board: Board, story: Story) -> Board:
    """A different story: forget the previous renders."""
    return Board(story=story)


# -- staleness ----------------------------------------------------------------------------------

def fingerprint(story: Story, views: tuple[ShotView, ...], index: int) -> str:
    """Everything shot `index`'s video depends on: the settings, the global caption, and every
    shot up to it (captions, lengths, seeds). A seed of -1 counts as the seed that was used."""
    shots = []
    for j, shot in enumerate(story.shots[: index + 1]):
        seed = shot.seed
        if seed == -1 and j < len(views) and views[j].seed is not None:
            seed = views[j].seed
        shots.append([shot.caption, shot.frames, seed])
    return json.dumps(_canonical([story.global_caption, asdict(story.settings), shots]), sort_keys=True,
                      default=str)


def _canonical(value: Any) -> Any:
    """4.0 and 4 are the same setting (UI widgets send floats, validation makes ints)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    return value


def refresh(board: Board) -> Board:
    """Mark as stale every rendered shot whose inputs (or an earlier shot's) changed since."""
    views = list(board.views)
    for i, view in enumerate(views):
        if view.video and view.fingerprint and view.status in ("cached", "generated"):
            if fingerprint(board.story, board.views, i) != view.fingerprint:
                views[i] = replace(view, status="stale")
    return replace(board, views=tuple(views))


# -- folding render events in -------------------------------------------------------------------

def mark_queued(board: Board, regenerate: int | None) -> Board:
    """Before a render: the shots it will touch show "queued"."""
    targets = range(len(board.views)) if regenerate is None else [int(regenerate)]
    views = list(board.views)
    for i in targets:
        views[i] = replace(views[i], status="queued", was=views[i].was or views[i].status)
    return replace(board, views=tuple(views))


def mark_rendering(board: Board, index: int) -> Board:
    if not 0 <= index < len(board.views) or board.views[index].status == "rendering":
        return board
    views = list(board.views)
    views[index] = replace(views[index], status="rendering")
    return replace(board, views=tuple(views))


def apply_shot(board: Board, story: Story, result: Any) -> Board:
    """Fold one ShotResult (from ShotDone or Finished) into the board; `story` is what was rendered."""
    index = int(result.index)
    if not 0 <= index < len(board.views):
        return board
    views = list(board.views)
    seed = int(result.seed) if result.seed is not None else None
    view = ShotView(status=result.status, video=str(result.video_path) if result.video_path else None,
                    seed=seed, seconds=result.seconds, density=result.density, key=result.key)
    views[index] = view
    fp = fingerprint(story, tuple(views), index)
    if result.status == "stale":
        fp = None  # a stale shot matches nothing until it is rendered again
    views[index] = replace(view, fingerprint=fp)
    return replace(board, views=tuple(views))


def apply_result(board: Board, story: Story, result: Any) -> Board:
    """Fold a finished RenderResult in: every shot, the story video, routing and summary."""
    for shot_result in result.shots:
        board = apply_shot(board, story, shot_result)
    board = replace(board, story_video=str(result.story_video) if result.story_video else None,
                    routing=result.routing or None, summary=dict(result.summary or {}))
    return refresh(board)


def settle(board: Board) -> Board:
    """After a stop or a failure: shots still "queued"/"rendering" go back to what they were."""
    views = [replace(v, status=v.was or "new", was=None) if v.status in ("queued", "rendering") else v
             for v in board.views]
    return refresh(replace(board, views=tuple(views)))


# -- takes --------------------------------------------------------------------------------------

def with_takes(story: Story, views: tuple[ShotView, ...]) -> Story:
    """`story` remembering, per shot, the take this session shows (`Shot.take`; "" where none)."""
    shots = [replace(shot, take=(view.key or "") if view.video else "") for shot, view in zip(story.shots, views)]
    return replace(story, shots=shots + list(story.shots[len(shots):]))
