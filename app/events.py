"""The app's events: the form <-> story mapping, edits of the story, and one render streamed from
the worker to the UI, click by click.

For: `form` / `story_from_form` / `editor_updates` (components <-> Story), `_wire` (every UI event),
and `_render` (a click -> a worker job -> Queued / Started / Progress / Preview / ShotDone /
Finished events -> UI updates).
Not for: building components (layout.py) or the gradio_client endpoints (api.py).
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import gradio as gr

from engine.events import Finished, Preview, Progress, ShotDone, Stopped
from engine.story import Shot, Story, StoryError

from . import plots
from .state import (MAX_SHOTS, Board, add_shot, apply_result, apply_shot, duplicate_shot, load_story, mark_queued,
                    mark_rendering, move_shot, remove_shot, set_story, settle, with_takes)
from .worker import TERMINAL, BusyError, Failed, Queued, Started
from .views import (_card_classes, _int_or_raw, _session, _shot_list, cache_saved, earlier_shots, preview_strip,
                    readable_story_error, shot_dict, shot_header, status_html)


class Events:
    """StoryboardApp's event methods (a mixin: the state lives on StoryboardApp)."""

    # -- the form: components <-> story -----------------------------------------------------------

    @property
    def form(self) -> list[gr.components.Component]:
        """Every component whose value is part of the story, in a fixed order."""
        comps = [self.global_caption, *self.settings.values(), *self.moc_settings.values()]
        for slot in self.slots:
            comps += [slot["caption"], slot["frames"], slot["seed"], slot["locked"], slot["pins"], slot["blocks"]]
        return comps

    @property
    def editor_outputs(self) -> list:
        comps = [self.board, self.global_caption, *self.settings.values(), *self.moc_settings.values()]
        for slot in self.slots:
            comps += [slot["card"], slot["header"], slot["video"], slot["caption"], slot["frames"],
                      slot["seed"], slot["locked"], slot["pins"], slot["blocks"]]
        return comps

    @property
    def result_outputs(self) -> list:
        return [self.status, self.preview, self.story_video, self.render_stats, self.routing_stats, self.engine_info,
                self.layer, self.step, self.frame_plot, self.recall_plot, self.flops_plot, self.density_plot,
                *self.recall_outputs]

    def story_from_form(self, board: Board, data: dict) -> Story:
        """The story as the form shows it (not validated: an empty caption is fine while editing)."""
        settings = replace(board.story.settings,
                           **{k: _int_or_raw(data[c]) for k, c in self.settings.items()},
                           moc=replace(board.story.settings.moc,
                                       **{k: _int_or_raw(data[c]) for k, c in self.moc_settings.items()}))
        shots = [Shot(caption=data[slot["caption"]], frames=_int_or_raw(data[slot["frames"]]),
                      seed=_int_or_raw(data[slot["seed"]]), locked=bool(data[slot["locked"]]),
                      pins=_shot_list(data[slot["pins"]]), blocks=_shot_list(data[slot["blocks"]]))
                 for slot in self.slots[: len(board.story.shots)]]
        story = replace(board.story, global_caption=data[self.global_caption], shots=shots, settings=settings)
        return with_takes(story, board.views)  # each shot remembers the take its card shows

    def editor_updates(self, board: Board, before: Board | None = None) -> dict:
        """Everything in the editor that shows `board`; slots whose video did not change are skipped."""
        story = board.story
        out: dict = {self.board: board, self.global_caption: story.global_caption}
        out.update({c: getattr(story.settings, k) for k, c in self.settings.items()})
        out.update({c: getattr(story.settings.moc, k) for k, c in self.moc_settings.items()})
        for i, slot in enumerate(self.slots):
            if i >= len(story.shots):
                out[slot["card"]] = gr.Column(visible=False)
                continue
            shot, view = story.shots[i], board.views[i]
            old_video = before.views[i].video if before is not None and i < len(before.views) else "<unknown>"
            out[slot["card"]] = gr.Column(visible=True, elem_classes=_card_classes(view.status, shot.locked))
            out[slot["header"]] = shot_header(i, view, shot)
            if view.video != old_video:
                out[slot["video"]] = view.video
            out[slot["caption"]] = gr.Textbox(value=shot.caption, interactive=not shot.locked)
            out[slot["frames"]] = gr.Number(value=shot.frames, interactive=not shot.locked)
            out[slot["seed"]] = gr.Number(value=shot.seed, interactive=not shot.locked)
            out[slot["locked"]] = shot.locked
            choices = earlier_shots(story, i)
            out[slot["pins"]] = gr.Dropdown(choices=choices, value=list(shot.pins), interactive=not shot.locked)
            out[slot["blocks"]] = gr.Dropdown(choices=choices, value=list(shot.blocks), interactive=not shot.locked)
        return out

    def slot_updates(self, board: Board, indices=None, before: Board | None = None) -> dict:
        """The header, card style and video of some shots (default: all), nothing the user types in:
        during a render the user may keep editing, and the render must not overwrite that."""
        out: dict = {self.board: board}
        for i in range(len(board.views)) if indices is None else indices:
            if 0 <= i < len(board.views):
                view, shot = board.views[i], board.story.shots[i]
                out[self.slots[i]["header"]] = shot_header(i, view, shot)
                out[self.slots[i]["card"]] = gr.Column(elem_classes=_card_classes(view.status, shot.locked))
                old_video = before.views[i].video if before is not None and i < len(before.views) else None
                if view.video and view.video != old_video:
                    out[self.slots[i]["video"]] = view.video
        return out

    def routing_updates(self, board: Board) -> dict:
        routing, summary = board.routing, board.summary
        cards = plots.stat_cards(routing, summary)
        return {
            self.render_stats: cards, self.routing_stats: cards,
            self.layer: gr.Dropdown(choices=plots.layer_choices(routing), value=plots.ALL),
            self.step: gr.Dropdown(choices=plots.step_choices(routing), value=plots.ALL),
            self.frame_plot: plots.frame_heatmap(routing), self.recall_plot: plots.shot_recall(routing),
            self.flops_plot: plots.flops_figure(routing), self.density_plot: plots.density_heatmap(routing),
            **self.recall_updates(board),  # the last shot's recall, outlined on the frame heatmap
        }

    # -- events -----------------------------------------------------------------------------------

    def _wire(self) -> None:
        inputs = {self.board, self.both_sides, *self.form}
        editor = self.editor_outputs
        quiet = dict(show_progress="hidden", api_visibility="private")

        def edit(op):
            def handler(data):
                board = data[self.board]
                try:
                    current = set_story(board, self.story_from_form(board, data))
                    return self.editor_updates(op(current), before=board)
                except StoryError as error:
                    gr.Warning(readable_story_error(error))
                    return {}
            return handler

        for i, slot in enumerate(self.slots):
            slot["up"].click(edit(lambda b, i=i: move_shot(b, i, -1)), inputs, editor, **quiet)
            slot["down"].click(edit(lambda b, i=i: move_shot(b, i, +1)), inputs, editor, **quiet)
            slot["duplicate"].click(edit(lambda b, i=i: duplicate_shot(b, i)), inputs, editor, **quiet)
            slot["remove"].click(edit(lambda b, i=i: remove_shot(b, i)), inputs, editor, **quiet)
            slot["locked"].input(edit(lambda b: b), inputs, editor, **quiet)  # locked fields turn read-only
            slot["regenerate"].click(self._render_handler(i), inputs, editor + self.result_outputs,
                                     concurrency_limit=None, **quiet)
        self.add_btn.click(edit(lambda b: add_shot(b)), inputs, editor, **quiet)
        self.generate_btn.click(self._render_handler(None), inputs, editor + self.result_outputs,
                                concurrency_limit=None, **quiet)
        self.stop_btn.click(self._stop_ui, None, None, concurrency_limit=None, **quiet)
        self.example.input(self._load_example, [self.board, self.example], editor + self.result_outputs, **quiet)
        self.open_btn.upload(self._open_file, [self.board, self.open_btn], editor + self.result_outputs, **quiet)
        self.save_btn.click(self._save_ui, inputs, [self.saved_file], **quiet)

        # Named endpoints for gradio_client (see docs/API.md).
        api = dict(show_progress="hidden", api_visibility="public")
        self.api_trigger.click(self._api_generate, [self.api_story], [self.api_video, self.api_shot_videos,
                               self.api_result], api_name="generate", concurrency_limit=None, **api)
        self.api_trigger.click(self._api_regenerate, [self.api_story, self.api_shot, self.api_both_sides],
                               [self.api_video, self.api_shot_videos, self.api_result], api_name="regenerate",
                               concurrency_limit=None, **api)
        self.api_trigger.click(self._api_stop, None, [self.api_message], api_name="stop",
                               concurrency_limit=None, **api)
        self.api_trigger.click(self._api_save, [self.api_story], [self.api_file_out], api_name="save_story", **api)
        self.api_trigger.click(self._api_load, [self.api_file_in], [self.api_story_out], api_name="load_story",
                               **api)
        self.api_trigger.click(self._api_example, [self.api_message], [self.api_story_out],
                               api_name="example_story", **api)
        self.api_trigger.click(self._api_info, None, [self.api_info], api_name="info", **api)
        self._wire_recall()  # app/recall.py: the recall view, the layer / step selectors and /recall
        self._wire_takes()  # app/takes.py: the cards' Takes sections, the compare panel, /takes, /make_current

    def _load_example(self, board: Board, name: str | None) -> dict:
        if not name or name not in self.examples:
            return {}
        return self._show_loaded(board, Story.from_dict(self.examples[name].to_dict()), f"Loaded example “{name}”.")

    def _open_file(self, board: Board, file) -> dict:
        path = getattr(file, "name", file)
        try:
            story = Story.load(path)
        except StoryError as error:
            gr.Warning(f"Cannot open this story: {readable_story_error(error)}")
            return {}
        return self._show_loaded(board, story, f"Opened {Path(str(path)).name}.")

    def _show_loaded(self, board: Board, story: Story, message: str) -> dict:
        if len(story.shots) > MAX_SHOTS:
            gr.Warning(f"This story has {len(story.shots)} shots; the editor shows at most {MAX_SHOTS}. "
                       "Render it with `python launch.py --story FILE` instead.")
            return {}
        fresh, gone = self._show_takes(load_story(board, story))  # the takes it remembers, from the cache
        for note in gone:
            gr.Warning(note)
        out = self.editor_updates(fresh, before=None)
        out.update(self.routing_updates(fresh))
        out.update({self.status: status_html("idle", "Ready", message), self.story_video: None,
                    self.preview: None})
        return out

    def _save_ui(self, data: dict):
        board = data[self.board]
        try:
            story = self.story_from_form(board, data).validate()
            path = self._write_story(story)
        except StoryError as error:
            gr.Warning(f"Cannot save: {readable_story_error(error)}")
            return gr.File(visible=False)
        return gr.File(value=str(path), visible=True)

    def _write_story(self, story: Story) -> Path:
        folder = Path(tempfile.mkdtemp(prefix="story-", dir=self.out_root))
        return story.save(folder / "story.json")

    def _stop_ui(self, request: gr.Request) -> None:
        if self.worker.stop(_session(request)):
            gr.Info("Stopping after the current sampling step…", duration=3)
        else:
            gr.Info("Nothing is running.", duration=3)

    # -- one render: click -> worker -> events -> UI ----------------------------------------------

    def _render_handler(self, regenerate: int | None):
        def handler(request: gr.Request, data: dict) -> Iterator[dict]:
            yield from self._render(request, data, regenerate)
        return handler

    def _events(self, job):
        """The job's events; if the caller goes away (tab closed, client gone), the job is stopped."""
        ended = False
        try:
            for event in self.worker.stream(job):
                ended = isinstance(event, TERMINAL)
                yield event
        finally:
            if not ended:
                job.stop()

    def _render(self, request: gr.Request, data: dict, regenerate: int | None,
                take: str | None = None) -> Iterator[dict]:
        before = data[self.board]
        board = set_story(before, self.story_from_form(before, data))
        try:
            story = Story.from_dict(board.story.to_dict())  # a validated copy the worker owns
            both_sides = None if regenerate is None or data.get(self.both_sides, True) else False
            job = self.worker.submit(_session(request), story, regenerate, both_sides=both_sides, take=take)
            board = set_story(board, Story.from_dict(story.to_dict()))
        except StoryError as error:
            message = readable_story_error(error)
            gr.Warning(message)
            yield {self.board: board, self.status: status_html("error", "Check the story", message)}
            return
        except BusyError as error:
            gr.Warning(str(error))
            yield {}
            return
        board = mark_queued(board, regenerate)
        shown = before  # the board whose videos the page shows
        out = self.slot_updates(board, before=shown)
        out[self.status] = status_html("queued", "Queued", "Waiting for the renderer…", 0.0, job=job.id)
        yield out

        started = time.perf_counter()
        what = "the story" if regenerate is None else f"shot {regenerate + 1}"
        for event in self._events(job):
            if isinstance(event, Queued):
                ahead = event.position - 1
                detail = "You are next." if ahead == 0 else f"{ahead} render{'s' * (ahead > 1)} ahead of you."
                yield {self.status: status_html("queued", f"Queued: place {event.position}", detail, 0.0, job=job.id)}
            elif isinstance(event, Started):
                started = time.perf_counter()
                yield {self.status: status_html("running", f"Rendering {what}", "Starting…", 0.0, job=job.id)}
            elif isinstance(event, Progress):
                shots = list(event.shots) or ([event.shot] if event.shot is not None else [])
                changed = [i for i in shots if 0 <= i < len(board.views) and board.views[i].status != "rendering"]
                for i in changed:
                    board = mark_rendering(board, i)
                fraction = (event.run + event.step / max(event.total, 1)) / max(event.runs, 1)
                elapsed = time.perf_counter() - started
                out = self.slot_updates(board, changed) if changed else {}
                out[self.status] = status_html("running", f"Rendering {what}", f"{event.message} · {elapsed:.0f} s",
                                               fraction, job=job.id)
                yield out
            elif isinstance(event, Preview):
                yield {self.preview: preview_strip(event.frames)}
            elif isinstance(event, ShotDone):
                board = apply_shot(board, story, event.result)
                yield self.slot_updates(board, [event.index], before=shown)
                shown = board
            elif isinstance(event, Finished):
                board = apply_result(board, story, event.result)
                board = replace(board, summary={**board.summary,
                                                "shots": [shot_dict(r) for r in event.result.shots],
                                                "cache_saved_s": cache_saved(board, event.result)})
                out = self.slot_updates(board, before=shown)
                out.update(self.routing_updates(board))
                out[self.story_video] = board.story_video
                out[self.engine_info] = self._engine_html()
                elapsed = time.perf_counter() - started
                cached = sum(1 for r in event.result.shots if r.status == "cached")
                detail = f"{len(event.result.shots)} shots in {elapsed:.1f} s · {cached} from the cache"
                out[self.status] = status_html("done", "Done", detail, 1.0, job=job.id)
                yield out
            elif isinstance(event, Stopped):
                board = settle(board)
                out = self.slot_updates(board, before=shown)
                out[self.status] = status_html("stopped", "Stopped", event.message, job=job.id)
                yield out
            elif isinstance(event, Failed):
                board = settle(board)
                gr.Warning(event.message)
                out = self.slot_updates(board, before=shown)
                out[self.status] = status_html("error", "Render failed", event.message, job=job.id)
                yield out

