"""Takes on the shot cards: browse a shot's earlier takes, compare two side by side, make one
current; and the gradio_client endpoints /takes and /make_current (docs/API.md).

For: the Takes section of every shot card (`_build_takes`), the compare panel under the shot grid
(`_build_compare`), their events (`_wire_takes`), showing the takes an opened story remembers
(`_show_takes`), and the two endpoints. The takes themselves are the engine's:
`StoryEngine.takes` lists them, `make_current` (run by the render worker, like a regeneration)
switches, `take_video` writes one as an MP4.
Not for: which take a render shows (engine/engine.py) or the rest of the card (layout.py).
"""

from __future__ import annotations

import html
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

import gradio as gr

from engine.engine import TakeInfo
from engine.story import Story, StoryError

from .state import Board, ShotView, fingerprint, with_takes
from .views import readable_story_error

TAKES_CSS = """
.shot-takes .takes-label { font-size: 12px; color: var(--body-text-color-subdued); }
.shot-takes .takes-label b { color: var(--color-accent); }
#takes-compare { border: 1px solid var(--border-color-primary); border-radius: 14px; padding: 8px; }
"""


def takes_label(takes: list[TakeInfo], shown: TakeInfo | None) -> str:
    """'take 2 of 4 · seed 5 · 14:02:11 · current', with the same facts as data attributes."""
    if shown is None:
        return '<div class="takes-label" data-count="0">No takes yet: generate this shot.</div>'
    when = time.strftime("%H:%M:%S", time.localtime(shown.created)) if shown.created else "?"
    current = " · <b>current</b>" if shown.current else ""
    return (f'<div class="takes-label" data-number="{shown.number}" data-count="{len(takes)}" '
            f'data-current="{str(shown.current).lower()}" data-key="{html.escape(shown.key)}" '
            f'title="{html.escape(shown.caption)}">take {shown.number} of {len(takes)} · seed {shown.seed} · '
            f'{when}{current}</div>')


def take_choices(takes: list[TakeInfo]) -> list[tuple[str, str]]:
    return [(f"take {t.number} · seed {t.seed}" + (" (current)" if t.current else ""), t.key) for t in takes]


def _pick(takes: list[TakeInfo], key: str | None) -> TakeInfo | None:
    """The take with `key`, else the current one, else the newest."""
    return (next((t for t in takes if t.key == key), None) or next((t for t in takes if t.current), None)
            or (takes[-1] if takes else None))


def remembered(story: Story, shots: list) -> dict:
    """`story` as a dict whose shots remember the takes a render showed (its ShotResults)."""
    d = story.to_dict()
    for shot, result in zip(d["shots"], shots):
        shot["take"] = result.key
    return d


class Takes:
    """StoryboardApp's takes methods (a mixin: the state lives on StoryboardApp)."""

    # -- layout -----------------------------------------------------------------------------------

    def _build_takes(self, i: int) -> dict[str, Any]:
        """The Takes section of card i: which take is shown, its video, prev/next, make current, compare."""
        slot: dict[str, Any] = {}
        with gr.Accordion("Takes", open=False, elem_id=f"shot-takes-{i}", elem_classes="shot-takes") as slot["takes"]:
            slot["take_key"] = gr.State(None)  # the key of the take browsed
            slot["take_label"] = gr.HTML(takes_label([], None), elem_id=f"take-label-{i}")
            slot["take_video"] = gr.Video(show_label=False, interactive=False, loop=True, height=120,
                                          elem_id=f"take-video-{i}", buttons=["download"])
            with gr.Row(elem_classes="shot-actions"):
                slot["take_prev"] = gr.Button("◀", size="sm", min_width=0, scale=1, elem_id=f"take-prev-{i}")
                slot["take_next"] = gr.Button("▶", size="sm", min_width=0, scale=1, elem_id=f"take-next-{i}")
                slot["take_compare"] = gr.Button("Compare", size="sm", min_width=0, scale=2,
                                                 elem_id=f"take-compare-{i}")
            slot["take_current"] = gr.Button("Make current", size="sm", variant="primary",
                                             elem_id=f"take-current-{i}")
        return slot

    def _build_compare(self) -> None:
        """Two takes of one shot side by side (hidden until a card's Compare is clicked)."""
        with gr.Group(visible=False, elem_id="takes-compare") as self.compare_panel:
            self.compare_shot = gr.State(None)  # the shot whose takes are compared
            self.compare_title = gr.HTML("", elem_id="compare-title")
            with gr.Row():
                with gr.Column(min_width=200):
                    self.compare_left = gr.Dropdown([], label="Left", elem_id="compare-left")
                    self.compare_left_video = gr.Video(show_label=False, interactive=False, loop=True, height=220,
                                                       elem_id="compare-left-video")
                with gr.Column(min_width=200):
                    self.compare_right = gr.Dropdown([], label="Right", elem_id="compare-right")
                    self.compare_right_video = gr.Video(show_label=False, interactive=False, loop=True, height=220,
                                                        elem_id="compare-right-video")
            self.compare_close = gr.Button("Close", size="sm", elem_id="compare-close")

    # -- what the Takes section shows -------------------------------------------------------------

    def _shot_takes(self, board: Board, i: int) -> list[TakeInfo]:
        """Shot i's takes as this session's story sees them ([] while the story is not valid)."""
        if not 0 <= i < len(board.story.shots):
            return []
        try:
            return self.engine.takes(with_takes(board.story, board.views), i)
        except StoryError:
            return []

    def _take_path(self, board: Board, i: int, take: TakeInfo | None) -> str | None:
        """An MP4 of `take`: the card's own video where it is the one shown, else one written once."""
        if take is None:
            return None
        view = board.views[i]
        if view.video and view.key == take.key:
            return view.video
        return self._take_file(take.key, board.story.settings.fps)

    def _take_file(self, key: str, fps: int) -> str | None:
        """The take's MP4 under the output folder, written on first use (None: evicted since listed)."""
        path = Path(self.out_root) / "takes" / f"{key}-{fps}fps.mp4"
        if not path.is_file() and self.engine.take_video(key, path, fps) is None:
            return None
        return str(path)

    def _takes_outputs(self, i: int) -> list:
        slot = self.slots[i]
        return [slot["take_key"], slot["take_label"], slot["take_video"]]

    def _takes_updates(self, board: Board, i: int, key: str | None = None) -> dict:
        takes = self._shot_takes(board, i)
        shown = _pick(takes, key)
        slot = self.slots[i]
        return {slot["take_key"]: shown.key if shown else None, slot["take_label"]: takes_label(takes, shown),
                slot["take_video"]: self._take_path(board, i, shown)}

    def _show_takes(self, board: Board) -> tuple[Board, list[str]]:
        """A just-opened story: the takes it remembers that the cache still holds are shown without
        rendering ("from cache", or "stale" where their context changed); the ones gone are named."""
        story = board.story
        if not any(shot.take for shot in story.shots):
            return board, []
        try:
            now = self.engine.current_takes(story)
        except StoryError:
            return board, []  # Generate will say what is wrong
        views, notes = list(board.views), []
        for i, (status, key) in enumerate(now):
            if status == "gone":
                notes.append(f"Shot {i + 1}: its take {story.shots[i].take[:10]}… is no longer in the shot cache; "
                             "Generate makes a new one.")
            take = next((t for t in self.engine.takes(story, i) if t.key == key), None) if key else None
            path = self._take_path(board, i, take)
            if path is not None:
                views[i] = ShotView(status=status, video=path, seed=take.seed, key=key)
        for i, view in enumerate(views):
            if view.status == "cached":
                views[i] = replace(view, fingerprint=fingerprint(story, tuple(views), i))
        return replace(board, views=tuple(views)), notes

    # -- events -----------------------------------------------------------------------------------

    def _wire_takes(self) -> None:
        quiet = dict(show_progress="hidden", api_visibility="private")
        inputs = {self.board, self.both_sides, *self.form}
        compare = [self.compare_panel, self.compare_shot, self.compare_title, self.compare_left,
                   self.compare_left_video, self.compare_right, self.compare_right_video]
        for i, slot in enumerate(self.slots):
            outputs = self._takes_outputs(i)
            refresh = lambda board, i=i: self._takes_updates(board, i)  # noqa: E731  (shows the current take)
            slot["takes"].expand(refresh, [self.board], outputs, **quiet)
            slot["video"].change(refresh, [self.board], outputs, **quiet)  # the card shows another take
            for button, delta in ((slot["take_prev"], -1), (slot["take_next"], +1)):
                button.click(lambda board, key, i=i, delta=delta: self._step_take(board, i, key, delta),
                             [self.board, slot["take_key"]], outputs, **quiet)
            slot["take_compare"].click(lambda board, key, i=i: self._compare(board, i, key),
                                       [self.board, slot["take_key"]], compare, **quiet)
            chosen = {slot["take_key"], self.compare_shot, self.compare_left, self.compare_right}
            slot["take_current"].click(self._make_current_handler(i), inputs | chosen,
                                       self.editor_outputs + self.result_outputs + outputs + compare,
                                       concurrency_limit=None, **quiet)
        sides = ((self.compare_left, self.compare_left_video), (self.compare_right, self.compare_right_video))
        for side, video in sides:
            side.input(self._compare_video, [self.board, self.compare_shot, side], video, **quiet)
        self.compare_close.click(lambda: gr.Group(visible=False), None, self.compare_panel, **quiet)

        # Named endpoints for gradio_client (see docs/API.md).
        with gr.Column(visible=False):
            self.api_take = gr.Textbox(label="take")
        api = dict(show_progress="hidden", api_visibility="public")
        self.api_trigger.click(self._api_takes, [self.api_story, self.api_shot],
                               [self.api_shot_videos, self.api_result], api_name="takes", **api)
        self.api_trigger.click(self._api_make_current, [self.api_story, self.api_shot, self.api_take],
                               [self.api_video, self.api_shot_videos, self.api_result], api_name="make_current",
                               concurrency_limit=None, **api)

    def _step_take(self, board: Board, i: int, key: str | None, delta: int) -> dict:
        takes = self._shot_takes(board, i)
        shown = _pick(takes, key)
        if shown is None:
            return self._takes_updates(board, i)
        number = min(max(shown.number + delta, 1), len(takes))
        return self._takes_updates(board, i, takes[number - 1].key)

    def _compare(self, board: Board, i: int, key: str | None, right_key: str | None = None) -> dict:
        """The compare panel for shot i: the browsed take on the left, on the right `right_key` or
        the current one (or, when the current one is browsed, the take before it)."""
        takes = self._shot_takes(board, i)
        if len(takes) < 2:
            gr.Info(f"Shot {i + 1} has {len(takes)} take{'s' * (len(takes) != 1)}: "
                    "regenerate it to have two to compare.")
            return {}
        left = _pick(takes, key)
        right = (next((t for t in takes if t.key == right_key and t is not left), None)
                 or next((t for t in takes if t.current and t is not left), None)
                 or takes[left.number - 2 if left.number > 1 else 1])
        choices = take_choices(takes)
        return {self.compare_panel: gr.Group(visible=True), self.compare_shot: i,
                self.compare_title: f'<div class="compare-title"><b>Shot {i + 1}</b>: two takes side by side</div>',
                self.compare_left: gr.Dropdown(choices=choices, value=left.key),
                self.compare_left_video: self._take_path(board, i, left),
                self.compare_right: gr.Dropdown(choices=choices, value=right.key),
                self.compare_right_video: self._take_path(board, i, right)}

    def _compare_video(self, board: Board, i: int | None, key: str | None):
        if i is None:
            return None
        return self._take_path(board, i, next((t for t in self._shot_takes(board, i) if t.key == key), None))

    def _make_current_handler(self, i: int):
        def handler(request: gr.Request, data: dict) -> Iterator[dict]:
            key, board = data[self.slots[i]["take_key"]], data[self.board]
            if not key:
                gr.Warning(f"Shot {i + 1} has no take to make current yet.")
                yield {}
                return
            for out in self._render(request, data, i, take=key):  # a render job, like Regenerate
                board = out.get(self.board, board)
                yield out
            out = self._takes_updates(board, i, key)
            if data[self.compare_shot] == i:  # the compare panel shows this shot: which take is current now
                out.update(self._compare(board, i, data[self.compare_left], data[self.compare_right]))
            yield out
        return handler

    # -- API endpoints ----------------------------------------------------------------------------

    def _api_takes(self, story: Any, shot: float) -> tuple[list[str] | None, dict]:
        """Shot `shot`'s takes (oldest first) with their videos; `current` marks the one `story` shows."""
        story = self._api_story(story)
        index = self._api_shot(story, shot)  # the one shot check of every endpoint
        try:
            takes = self.engine.takes(story, index)
        except StoryError as error:
            raise gr.Error(readable_story_error(error), print_exception=False) from None
        videos = [self._take_file(t.key, story.settings.fps) for t in takes]
        listed = [{"key": t.key, "number": t.number, "seed": t.seed, "caption": t.caption, "created": t.created,
                   "generated_with": t.generated_with, "both_sides": t.both_sides, "current": t.current,
                   "video": Path(v).name if v else None} for t, v in zip(takes, videos)]
        return [str(v) for v in videos if v] or None, {"shot": index, "takes": listed}

    def _api_make_current(self, story: Any, shot: float, take: str, request: gr.Request):
        """Make take `take` (a key from /takes) shot `shot`'s current take; streams like /regenerate."""
        story = self._api_story(story)
        index = self._api_shot(story, shot)
        try:
            known = [t.key for t in self.engine.takes(story, index)]
        except StoryError as error:
            raise gr.Error(readable_story_error(error), print_exception=False) from None
        if take not in known:
            raise gr.Error(f"take {str(take)[:80]!r} is not a cached take of shot {index + 1}; its takes: {known}",
                           print_exception=False)
        yield from self._api_render(story, index, request, take=take)

