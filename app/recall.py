"""What a shot remembered, as pictures: the Routing tab's recall view and the /recall endpoint.

For: `RecallView` (a StoryboardApp mixin): pick a shot and see, next to its own video, the frames
of other shots its queries recalled most (thumbnails captioned "shot 2 · frame 3 · 18 %"); click
one of its own frames to narrow to that frame's queries, "All frames" to widen again; the Routing
tab's layer selector narrows to one layer. The frame heatmap below is linked: it draws the same
layer and outlines the same selection (the query rows, the recalled columns). The /recall endpoint
returns the same ranking for a story's current takes as JSON. Pure helpers (`caption`,
`highlight`, `summary_html`) take plain values, so tests call them without a server.
Not for: ranking (engine/recall.py) or the other plots (plots.py).

In the UI shots and frames are numbered from 1 (as on the shot cards); in the API from 0.
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import replace
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
import plotly.graph_objects as go

from engine.recall import Recall, RecalledFrame, recall, thumbnail, with_thumbnails
from engine.story import StoryError

from . import plots
from .state import Board
from .views import _int_or_raw, readable_story_error

RECALL_SHOWN = 12  # recalled frames shown as pictures and outlined on the heatmap
HIGHLIGHT = "#f59e0b"  # the recall selection on the heatmap (amber: apart from the violet scale)
# small pictures in a fixed grid (fit_columns would stretch two pictures over the whole row); a
# click selects (no preview), so a click on one of the shot's own frames narrows to it
PICTURES = dict(columns=6, fit_columns=False, allow_preview=False, format="png", object_fit="contain")


def caption(frame: RecalledFrame) -> str:
    """'shot 2 · frame 3 · 18 %' (shot and frame numbered from 1)."""
    return f"shot {frame.shot + 1} · frame {frame.frame + 1} · {round(frame.share * 100)} %"


def layer_of(value: Any) -> int | None:
    """The Routing tab's layer choice ("all" or "0".."L-1") as recall's layer (None = all)."""
    return None if value in (None, "", plots.ALL) else int(value)


def highlight(fig: go.Figure, routing: dict, result: Recall, shown: int = RECALL_SHOWN) -> go.Figure:
    """Outline the recall selection on the frame heatmap: the chosen query rows across the matrix
    (dashed) and, within those rows, the columns of the frames shown as pictures (solid)."""
    shot_frames = [int(n) for n in routing["shot_frames"]]
    starts = np.concatenate([[0], np.cumsum(shot_frames)]).astype(int)
    top = starts[result.shot] + (result.frame or 0)
    bottom = top + 1 if result.frame is not None else starts[result.shot + 1]
    line = dict(color=HIGHLIGHT, width=2)
    fig.add_shape(type="rect", x0=-0.5, x1=starts[-1] - 0.5, y0=top - 0.5, y1=bottom - 0.5,
                  line={**line, "dash": "dash"}, name="recall query")
    for f in result.frames[:shown]:
        column = starts[f.shot] + f.frame
        fig.add_shape(type="rect", x0=column - 0.5, x1=column + 0.5, y0=top - 0.5, y1=bottom - 0.5,
                      line=line, name=f"recall key S{f.shot + 1} F{f.frame + 1}")
    return fig


def summary_html(result: Recall | None, message: str = "") -> str:
    """One line over the pictures; data-* attributes say what is selected (tests read them)."""
    if result is None:
        return f'<div class="recall-summary" data-shot="" data-frame="" data-layer="">{html.escape(message)}</div>'
    where = f"frame {result.frame + 1}" if result.frame is not None else "all frames"
    layer = f"layer {result.layer}" if result.layer is not None else "all layers"
    head = f"<b>Shot {result.shot + 1}</b> · {where} · {layer} · all recorded steps"
    if not result.recorded:
        body = (f"this take was made before recall statistics were kept: regenerate shot {result.shot + 1} "
                "to see what it recalled.")
    elif not result.frames:
        body = ("no earlier shot to recall." if result.shot == 0 else
                "no routed pick landed in another shot (dense attention ran, or every link was forced).")
    else:
        body = (f"{result.routed_picks:.2f} routed picks per query token and head went to other shots; "
                f"the {min(len(result.frames), RECALL_SHOWN)} frames it recalled most, with their share of them:")
    links = []
    if result.pinned:
        links.append("pinned (always seen, not ranked): " + ", ".join(f"shot {s + 1}" for s in result.pinned))
    if result.blocked:
        links.append("blocked: " + ", ".join(f"shot {s + 1}" for s in result.blocked))
    tail = f'<div class="hint">{html.escape("; ".join(links))}</div>' if links else ""
    frame, layer = ("" if x is None else x for x in (result.frame, result.layer))
    return (f'<div class="recall-summary" data-shot="{result.shot}" data-frame="{frame}" data-layer="{layer}" '
            f'data-recalled="{len(result.frames)}">'
            f"{head}: {html.escape(body)}{tail}</div>")


def png_data_url(image: np.ndarray) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


class RecallView:
    """StoryboardApp's recall view and /recall endpoint (a mixin: the state lives on StoryboardApp)."""

    # -- layout (inside the Routing tab, under its layer and step selectors) --------------------

    def _build_recall(self) -> None:
        with gr.Group(elem_id="recall", elem_classes="recall"):
            gr.Markdown("### What each shot remembered\nThe frames of other shots a shot's queries recalled most "
                        "(routed top-k picks; pinned shots are always seen and not ranked). Click one of the "
                        "shot's own frames to see what that frame recalled.", elem_classes="muted")
            with gr.Row(equal_height=False):
                self.recall_shot = gr.Dropdown([], value=None, label="Shot", min_width=120, scale=1,
                                               elem_id="recall-shot")
                self.recall_all = gr.Button("All frames", size="sm", scale=0, min_width=110,
                                            elem_id="recall-all-frames")
                self.recall_summary = gr.HTML(summary_html(None, "Generate a story to see what each shot "
                                                                 "remembered."), elem_id="recall-summary",
                                              scale=4)
            with gr.Row(equal_height=False):
                with gr.Column(scale=2, min_width=260):
                    self.recall_video = gr.Video(label="The shot", interactive=False, loop=True, height=180,
                                                 elem_id="recall-video")
                    self.recall_strip = gr.Gallery(label="Its frames (click one to narrow)", height=130,
                                                   elem_id="recall-query-frames", **PICTURES)
                with gr.Column(scale=3, min_width=320):
                    self.recall_gallery = gr.Gallery(label="Frames it recalled most", height=300,
                                                     elem_id="recall-frames", **PICTURES)
            self.recall_frame = gr.State(None)  # the query frame narrowed to (within the shot), None = all

    @property
    def recall_outputs(self) -> list:
        return [self.recall_frame, self.recall_shot, self.recall_summary, self.recall_video, self.recall_strip,
                self.recall_gallery, self.frame_plot]

    # -- events ---------------------------------------------------------------------------------

    def _wire_recall(self) -> None:
        """The recall view's events, and the Routing tab's layer / step selectors (which redraw the
        heatmap with the recall selection outlined)."""
        quiet = dict(show_progress="hidden", api_visibility="private")
        inputs = [self.board, self.recall_shot, self.layer, self.step, self.recall_frame]

        def widen(board, shot, layer, step, frame):  # another shot, or "All frames": every query frame
            return self.recall_updates(board, shot, layer, step, None)

        def narrow(board, shot, layer, step, frame, event: gr.SelectData):  # a click on one of its frames
            return self.recall_updates(board, shot, layer, step, event.index)

        self.recall_shot.input(widen, inputs, self.recall_outputs, **quiet)
        self.recall_all.click(widen, inputs, self.recall_outputs, **quiet)
        self.recall_strip.select(narrow, inputs, self.recall_outputs, **quiet)
        for selector in (self.layer, self.step):  # the frame stays chosen
            selector.input(self.recall_updates, inputs, self.recall_outputs, **quiet)

        with gr.Column(visible=False):
            self.api_layer = gr.Number(None, label="layer")
            self.api_frame = gr.Number(None, label="frame")
            self.api_thumbnails = gr.Checkbox(True, label="thumbnails")
            self.api_recall = gr.JSON(label="recall")
        self.api_trigger.click(self._api_recall, [self.api_story, self.api_shot, self.api_layer, self.api_frame,
                                                  self.api_thumbnails], [self.api_recall], api_name="recall",
                               show_progress="hidden", api_visibility="public")

    def recall_updates(self, board: Board, shot: Any = None, layer: Any = plots.ALL, step: Any = plots.ALL,
                       frame: Any = None) -> dict:
        """Everything the recall view shows for a shot (None: the last one) of the board's last
        render, one layer or all, one query frame or all, and the heatmap linked to it."""
        routing = board.routing
        empty = {self.recall_frame: None, self.recall_shot: gr.Dropdown(choices=[], value=None),
                 self.recall_video: None, self.recall_strip: [], self.recall_gallery: []}
        if not routing or "frame_routed" not in routing:
            message = "Generate a story to see what each shot remembered."
            return {**empty, self.recall_summary: summary_html(None, message),
                    self.frame_plot: plots.frame_heatmap(routing, str(layer), str(step))}
        count = len(routing["shot_frames"])
        shot = count - 1 if shot is None or not 0 <= int(shot) < count else int(shot)
        frame = frame if frame is not None and 0 <= int(frame) < routing["shot_frames"][shot] else None
        result = recall(routing, shot, layer_of(layer), frame)
        pictures = self._pictures(routing.get("keys") or [None] * count)
        shown = with_thumbnails(replace(result, frames=result.frames[:RECALL_SHOWN]), pictures)
        own = pictures(shot, list(range(routing["shot_frames"][shot])))
        strip = [] if own is None else [(thumbnail(image), f"frame {i + 1}") for i, image in enumerate(own)]
        fig = plots.frame_heatmap(routing, str(layer), str(step))
        if fig.data:  # a heatmap (not the "nothing recorded" note): outline the same selection
            fig = highlight(fig, routing, result)
        return {
            self.recall_frame: frame,
            self.recall_shot: gr.Dropdown(choices=[(f"Shot {s + 1}", s) for s in range(count)], value=shot),
            self.recall_summary: summary_html(result),
            self.recall_video: self._shot_video(board, shot),
            self.recall_strip: gr.Gallery(value=strip, selected_index=frame),
            self.recall_gallery: [(f.thumbnail, caption(f)) for f in shown.frames if f.thumbnail is not None],
            self.frame_plot: fig,
        }

    def _pictures(self, keys: list[str | None]):
        """pictures(shot, latent_frames) for with_thumbnails: read from each shot's take."""
        return lambda shot, frames: self.engine.take_pictures(keys[shot], frames) if keys[shot] else None

    @staticmethod
    def _shot_video(board: Board, shot: int) -> str | None:
        """The shot's MP4 from the render the report came from (shot cards may have moved since)."""
        shots = board.summary.get("shots") or []
        if not board.story_video or shot >= len(shots) or not isinstance(shots[shot], dict) \
                or not shots[shot].get("video"):
            return None
        path = Path(board.story_video).with_name(str(shots[shot]["video"]))
        return str(path) if path.exists() else None

    # -- the /recall endpoint -------------------------------------------------------------------

    def _api_recall(self, story: Any, shot: Any, layer: Any, frame: Any, thumbnails: bool) -> dict:
        """What shot `shot` (0-based) of the story's current takes recalled: its recalled frames
        ranked by share, narrowed to `layer` and to query frame `frame` (None: all), with PNG
        thumbnails (data URLs) unless thumbnails is false. Renders nothing."""
        story = self._api_story(story)
        index, layer, frame = self._api_shot(story, shot), _int_or_raw(layer), _int_or_raw(frame)
        try:
            routing = self.engine.current_routing(story)
        except StoryError as error:
            raise gr.Error(f"The story is not valid: {readable_story_error(error)}", print_exception=False) from None
        keys = routing["keys"]
        if keys[index] is None:
            raise gr.Error(f"shot {index} has no take for this story yet: generate it first (/generate)",
                           print_exception=False)
        try:
            result = recall(routing, index, layer, frame)
        except ValueError as error:
            raise gr.Error(str(error)[:300], print_exception=False) from None
        if thumbnails is not False:
            result = with_thumbnails(result, self._pictures(keys))
        return {**result.to_dict(encode=png_data_url if thumbnails is not False else None), "key": keys[index],
                "shot_frames": routing["shot_frames"]}


__all__ = ["RecallView", "RECALL_SHOWN", "caption", "highlight", "layer_of", "png_data_url", "summary_html"]
