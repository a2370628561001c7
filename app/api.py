"""The gradio_client endpoints: /generate, /regenerate, /stop, /save_story, /load_story,
/example_story and /info (documented in docs/API.md; /recall lives with its view in app/recall.py,
/takes and /make_current in app/takes.py).

For: the hidden components the endpoints are named on (`_build_api`) and their handlers; every
bad input becomes a gr.Error with a readable message.
Not for: the UI's own events (events.py).
"""

from __future__ import annotations

from typing import Any

import gradio as gr

from engine.events import Finished, Progress, ShotDone, Stopped
from engine.story import Story, StoryError

from .takes import remembered
from .worker import BusyError, Failed, Queued
from .views import _int_or_raw, _jsonable, _session, readable_story_error, routing_summary, shot_dict


class Api:
    """StoryboardApp's API methods (a mixin: the state lives on StoryboardApp)."""

    def _build_api(self) -> None:
        """Components for the named endpoints only; never shown."""
        with gr.Column(visible=False):
            self.api_trigger = gr.Button("api")
            self.api_story = gr.JSON(label="story")
            self.api_shot = gr.Number(label="shot")  # no rounding: 0.5 is an error, not shot 0
            self.api_both_sides = gr.Checkbox(True, label="both_sides")
            self.api_file_in = gr.File(label="story_file", file_types=[".json"])
            self.api_video = gr.File(label="story_video")
            self.api_shot_videos = gr.File(label="shot_videos", file_count="multiple")
            self.api_result = gr.JSON(label="result")
            self.api_file_out = gr.File(label="story_file")
            self.api_story_out = gr.JSON(label="story")
            self.api_message = gr.Textbox(label="message")
            self.api_info = gr.JSON(label="info")

    # -- API endpoints ----------------------------------------------------------------------------

    def _api_story(self, story: Any) -> Story:
        try:
            if isinstance(story, str):
                return Story.from_json(story)
            return Story.from_dict(story)
        except StoryError as error:
            raise gr.Error(f"The story is not valid: {readable_story_error(error)}", print_exception=False) from None

    @staticmethod
    def _api_shot(story: Story, shot: Any) -> int:
        """A shot index (0-based) of `story` from an API number, or a readable error."""
        index = _int_or_raw(shot)
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(story.shots):
            raise gr.Error(f"shot must be a shot index in [0, {len(story.shots) - 1}], got {shot!r}"[:200],
                           print_exception=False)
        return index

    def _api_generate(self, story: Any, request: gr.Request):
        """Render a whole story. Streams progress dicts as `result`; the last yield carries the videos."""
        yield from self._api_render(self._api_story(story), None, request)

    def _api_regenerate(self, story: Any, shot: float, both_sides: bool, request: gr.Request):
        """Regenerate shot `shot` (0-based) with the other shots as fixed context: the earlier ones,
        and with both_sides (default) the later ones too, which keep their takes (not stale)."""
        story = self._api_story(story)
        index = self._api_shot(story, shot)
        yield from self._api_render(story, index, request, None if both_sides is not False else False)

    def _api_render(self, story: Story, regenerate: int | None, request: gr.Request, both_sides: bool | None = None,
                    take: str | None = None):
        try:
            job = self.worker.submit(_session(request), story, regenerate, both_sides=both_sides, take=take)
        except BusyError as error:
            raise gr.Error(str(error), print_exception=False) from None
        shots: dict[int, dict] = {}
        for event in self._events(job):
            if isinstance(event, Queued):
                yield None, None, {"state": "queued", "position": event.position}
            elif isinstance(event, Progress):
                yield None, None, {"state": "running", "shot": event.shot, "step": event.step,
                                   "total": event.total, "run": event.run, "runs": event.runs,
                                   "message": event.message, "context": event.context,
                                   "context_shots": list(event.context_shots)}
            elif isinstance(event, ShotDone):
                shots[event.index] = shot_dict(event.result)
            elif isinstance(event, Finished):
                result = event.result
                videos = [str(r.video_path) for r in result.shots if r.video_path]
                yield (str(result.story_video) if result.story_video else None, videos or None, {
                    "state": "finished", "shots": [shot_dict(r) for r in result.shots],
                    "story": remembered(story, result.shots),
                    "summary": _jsonable(result.summary), "routing": routing_summary(result.routing)})
            elif isinstance(event, Stopped):
                yield None, None, {"state": "stopped", "message": event.message,
                                   "finished_shots": list(event.finished_shots),
                                   "steps_after_stop": job.steps_after_stop(),
                                   "shots": [shots[i] for i in sorted(shots)]}
            elif isinstance(event, Failed):
                raise gr.Error(event.message, print_exception=False)

    def _api_stop(self, request: gr.Request) -> str:
        """Stop this client's queued or running render (within one sampling step)."""
        return "stopping" if self.worker.stop(_session(request)) else "nothing to stop"

    def _api_save(self, story: Any) -> str:
        """Validate a story and return it as a JSON file."""
        return str(self._write_story(self._api_story(story)))

    def _api_load(self, story_file) -> dict:
        """Read and validate a story JSON file; returns the story as a dict."""
        path = getattr(story_file, "name", story_file)
        if not path:
            raise gr.Error("No file given.", print_exception=False)
        try:
            return Story.load(path).to_dict()
        except StoryError as error:
            raise gr.Error(f"The story is not valid: {readable_story_error(error)}", print_exception=False) from None

    def _api_example(self, name: str) -> dict:
        """An example story by name ("" for the first one); see /info for the names."""
        if not name:
            return self.initial_story().to_dict()
        if name not in self.examples:
            raise gr.Error(f"No example named {name!r}; examples: {sorted(self.examples)}", print_exception=False)
        return self.examples[name].to_dict()

    def _api_info(self) -> dict:
        """Model, device, attention backends, example names, cache statistics, renders in the queue."""
        return {"model": str(getattr(self.engine, "model_name", "")), "device": self._device(),
                "backends": self._available_backends(), "examples": sorted(self.examples),
                "cache": _jsonable(self._cache_stats()), "queue": self.worker.busy(),
                "processes": getattr(getattr(self.engine, "parallel", None), "world", 1)}


